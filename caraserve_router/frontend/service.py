"""`FrontEnd`: the state behind the HTTP routes (cluster, dispatcher, tokenizer, adapters,
metrics), its start-up and shutdown, and one request's path through the dispatcher."""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Optional

from caraserve_router.contracts.adapters import resolvable
from caraserve_router.contracts.configs import InstanceConfig
from caraserve_router.contracts.stats import InstanceStats
from caraserve_router.frontend.config import FrontendConfig
from caraserve_router.scheduling.policies import make_policy, policy_class

log = logging.getLogger("caraserve.api")

# API role -> the role given to the chat template
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None


class FrontEnd:
    """Everything the HTTP handlers need: cluster, dispatcher, tokenizer, adapters, metrics."""

    def __init__(self, config: FrontendConfig, template: InstanceConfig):
        self.config = config
        self.template = template
        self.policy_cls = policy_class(config.policy)
        self.cluster = None
        self.dispatcher = None
        self.tokenizer = None
        self.registry = None
        self.session = None
        self.perf_model = None
        self.slo_tpot_ms = 0.0
        self.base_names: set = set()
        self.base_name = ""
        self.stats: dict[int, dict] = {}
        self.tasks: list = []
        self.started_at = int(time.time())
        self.profiling = False  # a background profile is being taken for the configured policy
        self.active_policy = config.policy
        self.tokenizer_pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")

    # ---- start / stop ---------------------------------------------------------------------

    async def start(self) -> None:
        import aiohttp
        from transformers import AutoTokenizer

        from caraserve_router.frontend.adapter_registry import AdapterRegistry
        from caraserve_router.frontend.metrics import ClusterMetrics

        self.template.model_dir = self.config.model_dir
        self.tokenizer = await asyncio.get_running_loop().run_in_executor(
            self.tokenizer_pool, AutoTokenizer.from_pretrained, self.config.model_dir)
        name = os.path.basename(self.config.model_dir.rstrip("/"))
        self.base_names = {name, "base", ""}
        self.base_name = name
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.metrics = ClusterMetrics(self.config.policy)
        self.cluster = self._build_cluster()
        self.registry = AdapterRegistry(self.cluster)
        handles = self.cluster.handles
        log.info("waiting for %d instance(s)...", len(handles))
        await self.cluster.wait_ready()
        await self.registry.collect()
        self.perf_model = await self._perf_model()
        loop = asyncio.get_running_loop()
        if self.policy_cls.needs_perf_model and self.perf_model is None:
            self.profiling = True
            self.active_policy = self.config.warmup_policy
            self.tasks.append(loop.create_task(self._profile_then_switch()))
        self._build_dispatcher()
        if self.config.perf_models_dir:
            from caraserve_router.frontend.perf_models import PerfModelCatalog, assign_from_cluster

            await assign_from_cluster(PerfModelCatalog.load_dir(self.config.perf_models_dir), self.cluster,
                                      self.dispatcher.state.instances)
        self.cluster.on_down = self._instance_down
        self.cluster.on_up = self._instance_up
        self.tasks += [loop.create_task(self.cluster.monitor(self.config.health_interval_s)),
                       loop.create_task(self._poll_stats())]
        log.info("serving %s on http://%s:%d with %d instance(s), policy %s", name, self.config.host,
                 self.config.port, len(handles), self.active_policy)

    def _build_cluster(self):
        """The instances, started: local processes (`--instances`) plus attached `--instance-urls`.
        (The one place another launcher, e.g. Ray, plugs in: it returns a started Cluster.)"""
        from caraserve_router.frontend.cluster import (
            Cluster, HandleClient, InstanceHandle, LocalLauncher, local_handles,
        )
        from caraserve_router.frontend.gpu_assignment import assign_gpus
        from caraserve_router.frontend.instance_auth import local_key, use_key
        from caraserve_router.frontend.instance_client import InstanceClient

        if self.config.cluster == "ray":
            from caraserve_router.frontend.ray_cluster import start_ray_cluster

            return start_ray_cluster(self.config, self.template, self.session)
        key = local_key()
        use_key(self.session, key)
        handles = local_handles(self.template, self.config.instances, self.config.instance_base_port,
                                "127.0.0.1", self.config.split_cores) if self.config.instances else []
        for handle, gpu in zip(handles, assign_gpus(len(handles), self.config.share_gpus,
                                                    per_instance=self.template.tp)):
            handle.gpu = gpu
        clients: list = [HandleClient(h, self.session, self.config.request_timeout_s) for h in handles]
        for url in self.config.urls:
            handles.append(InstanceHandle(index=len(handles), url=url))
            clients.append(InstanceClient(url, self.session, self.config.request_timeout_s))
        cluster = Cluster(handles, LocalLauncher(self.config.log_dir, self.config.shm_prefix, key), clients,
                          self.config.restart_dead, self.config.hung_after_s)
        cluster.start_local()
        return cluster

    def _build_dispatcher(self) -> None:
        from caraserve_router.frontend.dispatcher import Dispatcher
        from caraserve_router.scheduling.scheduler_state import ClusterState, InstanceState

        states = []
        for h in self.cluster.handles:
            cfg = h.config or self.template
            states.append(InstanceState(h.name, max_batch=cfg.running_max_req_size, lora_mode=cfg.lora.mode,
                                        kernel=cfg.lora.decode_kernel, healthy=h.healthy))
        capacity = sum(s.max_batch for s in states)
        self.dispatcher = Dispatcher(self.cluster, ClusterState(states), self._make_policy(), self.perf_model,
                                     self.metrics, self.config.wait_timeout_s,
                                     self.config.max_waiting or 4 * capacity)

    def _make_policy(self):
        from caraserve_router.scheduling.policies import PolicyConfig

        max_batch = max((h.config or self.template).running_max_req_size for h in self.cluster.handles)
        self.slo_tpot_ms = self.config.slo_tpot_ms or self._default_slo()
        return make_policy(self.active_policy, PolicyConfig(
            slo_tpot_ms=self.slo_tpot_ms, mean_output_len=self.config.mean_output_len, max_batch=max_batch,
            seed=self.config.seed))

    def _perf_cache_path(self):
        from caraserve_router.frontend.perf_bootstrap import cache_path

        if not self.config.perf_model_cache:
            return None
        device = str(self.stats.get(0, {}).get("device") or self.template.device)
        # the device kind the instance reports (`cpu:<model>`, `cuda:<GPU>`): one cache per kind
        return cache_path(self.config.perf_model_cache, self.config.model_dir, device,
                          self.template.lora.decode_kernel.value, self.template.lora.mode.value, self.template.tp)

    async def _profile_then_switch(self) -> None:
        """Profile instance 0 while the warm-up policy serves; then serve with the configured one."""
        from caraserve_router.frontend.perf_bootstrap import profile_instance, save_cached

        try:
            model = await profile_instance(self.cluster.clients[0], self.tokenizer, self.adapters,
                                           self.template.lora.decode_kernel)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the warm-up policy keeps serving
            log.error("the start-up profile failed (%s: %s); policy %s keeps serving (give --perf-model)",
                      type(e).__name__, e, self.active_policy)
            self.profiling = False
            return
        model.metadata["tp"] = self.template.tp  # profiled per TP size (perf_bootstrap.check_tp)
        save_cached(model, self._perf_cache_path())
        self.perf_model = model
        self.active_policy = self.config.policy
        self.dispatcher.set_policy(self._make_policy(), model)
        self.profiling = False
        log.info("policy %s now serves (SLO %.1f ms per token)", self.active_policy, self.slo_tpot_ms)

    def _default_slo(self) -> float:
        if self.perf_model is None:
            return 1000.0
        return 3.0 * self.perf_model.predict_decode_step_ms([0], self.template.lora.decode_kernel)

    async def _perf_model(self):
        """The model from --perf-model or the cache, else None (then profiled in the background)."""
        from caraserve_router.frontend.perf_bootstrap import load_cached


        from caraserve_router.scheduling.perf_model import PerfModel

        if self.config.perf_model:
            model = PerfModel.load(self.config.perf_model)  # its TP size was checked at start (lifecycle)
            log.info("perf model from %s: %s", self.config.perf_model, model.describe())
            return model
        if not self.policy_cls.needs_perf_model:
            return None
        try:
            self.stats[0] = await self.cluster.clients[0].stats()  # its device names the cache entry
        except Exception:  # noqa: BLE001 - without it the configured device names the entry
            pass
        return load_cached(self._perf_cache_path())

    @property
    def closing(self) -> bool:
        return self.dispatcher is not None and self.dispatcher.closing is not None

    async def abort_all(self, reason: str) -> None:
        """Shutdown: end every request with a 503 `reason` (streams get an error event)."""
        if self.dispatcher is not None:
            await self.dispatcher.abort_all(reason)

    async def stop(self, grace_s: float = 15.0) -> None:
        for task in self.tasks:
            task.cancel()
        if self.session is not None:
            await self.session.close()
        if self.cluster is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.stop, grace_s)
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def kill(self) -> None:
        """End every local instance now (second signal, shutdown deadline); safe from any thread."""
        if self.cluster is not None:
            self.cluster.kill()

    # ---- adapters and instances -----------------------------------------------------------

    @property
    def adapters(self) -> dict[str, dict]:
        """name -> {"rank", "target_modules", "path"} of every adapter served."""
        return {n: a.as_dict() for n, a in self.registry.adapters.items()}

    def _instance_down(self, index: int) -> None:
        asyncio.get_running_loop().create_task(self._mark(index, False))

    def _instance_up(self, index: int) -> None:
        asyncio.get_running_loop().create_task(self._restore(index))

    async def _mark(self, index: int, healthy: bool) -> None:
        # A health check or restore still in flight when the instance was removed must not
        # bring it back into the policy's view.
        if healthy and self.cluster.handles[index].removed:
            return
        self.dispatcher.state.instances[index].healthy = healthy
        await self.dispatcher.notify_capacity()

    async def _restore(self, index: int) -> None:
        try:
            await self.registry.restore(self.cluster.clients[index])
        except Exception:  # noqa: BLE001 - the instance still serves the base model and the others
            log.exception("could not restore adapters on instance %d", index)
        await self._mark(index, True)

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            for i, client in enumerate(self.cluster.clients):
                handle = self.cluster.handles[i]
                stats = {}
                # A removed instance drains without new requests: its stats ("healthy": true)
                # must not bring it back into the policy's view.
                if handle.healthy and not handle.removed:
                    try:
                        stats = await client.stats()
                        if not handle.removed:  # it may have been removed during the await
                            self.dispatcher.state.apply_stats(i, InstanceStats.from_dict(stats))
                    except Exception as e:  # noqa: BLE001 - one bad poll must not stop the loop
                        log.debug("stats of instance %d: %s", i, e)
                self.stats[i] = stats
                self.metrics.instance_stats(handle.name, stats, handle.healthy, handle.restarts)
            if self.dispatcher.policy.rebalances and self.dispatcher.rebalance():
                await self.dispatcher.notify_capacity()

    # ---- requests -------------------------------------------------------------------------

    def resolve_model(self, model: Optional[str]) -> tuple[Optional[str], int]:
        """(adapter, rank) for an API `model` value; raises KeyError if unknown, ValueError if it
        cannot name an adapter the resolver may look up.

        With a resolver directory (`--lora-adapter-dir`) an unregistered plain name goes to an
        instance, which registers DIR/<name> on first use and answers 400 / 404 itself; its rank is
        unknown here until then (0 for the policy)."""
        if model is None or model in self.base_names:
            return None, 0
        if model in self.registry:
            return model, self.registry.rank(model)
        on_use = getattr(self.cluster, "on_use", None)  # Ray: the resolver runs here (ray_adapters.py)
        info = on_use.resolve(model) if on_use is not None else None
        if info is not None:
            self.registry.adapters[model] = info
            return model, info.rank
        if self.template.lora.adapter_dir is None:
            raise KeyError(model)
        if not resolvable(model):
            raise ValueError(f"adapter name {model!r} is not a plain name (letters, digits, . _ -; no '..', "
                             "no '/'): the resolver does not look it up")
        return model, 0

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            _check_text(prompt, "the prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        vocab = len(self.tokenizer)
        if not ids or any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"the prompt must be non-empty text or token ids in [0, {vocab})")
        return ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat (messages: {"role", "content": str}) with the model's template."""
        if not messages:
            raise ValueError("messages must not be empty")
        turns = []
        for m in messages:
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"unknown message role {m['role']!r}; supported: {sorted(CHAT_ROLES)}")
            _check_text(m["content"], "a message")
            # OpenAI's `developer` role is the `system` role of models before o1; templates know the latter.
            turns.append({"role": CHAT_ROLES[m["role"]], "content": m["content"]})
        from jinja2 import TemplateError

        try:
            out = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        except TemplateError as e:
            # templates refuse what their model was not trained on (Mistral's: a system turn,
            # roles that do not alternate) with raise_exception: the client's error, not ours
            raise ValueError(f"the model's chat template refuses these messages: {e}") from None
        return list(out["input_ids"]) if isinstance(out, dict) or hasattr(out, "keys") else list(out)

    async def encode_async(self, prompt) -> list[int]:
        """`encode` on the tokenizer threads: a long prompt never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, self.encode, prompt)

    async def chat_ids_async(self, messages: list[dict]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, self.chat_ids, messages)

    async def generate(self, adapter, rank, prompt_ids, parameters: dict) -> AsyncIterator[tuple]:
        """Route one request; yields (text, event) per token and records its latencies."""
        from caraserve_router.frontend.dispatcher import Job

        job = Job(uuid.uuid4().hex, adapter, rank, prompt_ids, parameters)
        start = time.perf_counter()
        first = None
        count = 0
        instance = ""
        outcome = "ok"
        try:
            async for event in self.dispatcher.run(job):
                count += 1
                if first is None:
                    first = time.perf_counter()
                    index = self.dispatcher.state.instance_of(job.request_id)
                    instance = self.cluster.handles[index].name if index is not None else ""
                yield event["token"]["text"], event
        except asyncio.CancelledError:  # the client left (its handler was cancelled)
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            # Recorded here, however the request ends: the routes stop iterating at a stop string
            # or when the client leaves, and code after the loop would then never run.
            end = time.perf_counter()
            self.metrics.request_done(instance, adapter, None if first is None else first - start, end - start,
                                      (end - first) / (count - 1) if count > 1 else None, outcome)
