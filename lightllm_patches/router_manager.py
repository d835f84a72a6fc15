"""The router process of an instance: LightLLM's router with CaraServe's model worker.

`CaraRouterManager` overrides `lightllm.server.router.manager.RouterManager`:

- `wait_to_model_ready`: starts `CaraBackend` (in process: rank 0) with the instance config,
  and with `--tp N` ranks 1..N-1 (`tp_ranks.py`; a rank's failure stops the instance),
  and `CaraReqQueue` (adapter-aware admission); registers the adapters of `--adapters`.
- `loop_for_netio_req`: also serves `ControlRequest`s (typed calls: `AdapterCall`s on the
  worker's `AdapterManager`, `GetStats` -> `InstanceStats`, `GetSamples`, `Ping`) and answers
  them on the control-reply socket.
- `add_req`: refuses a request whose adapter was unloaded meanwhile; prefetches its adapter.
- `abort`: also drops a waiting request at once (upstream waits for the next batch formation,
  which does not come while the running batch is full).
- `_prefill_batch` / `_decode_batch`: a failed step fails its requests, not the router loop.
- `clean_up`: stops the CPU sidecar and releases shared memory.
- `_step`: with `--prefill-chunk-tokens` (chunked prefill), `_chunked_step` replaces
  upstream's step: waiting requests join the running batch at every step (upstream: every
  `router_max_wait_tokens` steps) without a prefill of their own, and every step is one
  mixed forward (decode rows + at most one chunk of prompt tokens; `CaraBackend._forward_mixed`).

`start_router_process` replaces upstream's function of the same name (the process target); the
process dies with the instance's HTTP process (`die_with_parent`), freeing the sidecar and the
instance's `/dev/shm` on the way.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback

import zmq
import zmq.asyncio

from lightllm.server.io_struct import AbortReq, ReqRunStatus
from lightllm.server.router.manager import RouterManager
from lightllm.server.router.pause_strategy import select_paused_reqs

from lightllm_patches.backend import CaraModelRpcClient
from caraserve_router.contracts.adapters import AdapterOp
from caraserve_router.contracts.configs import InstanceConfig
from caraserve_router.contracts.control import (
    AdapterCall, ControlReply, ControlRequest, GetSamples, GetStats, Ping, RequestFailed,
)
from caraserve_router.contracts.stats import InstanceStats, RequestView, ResidentAdapter
from caraserve_router.contracts.processes import die_with_parent, free_ports, remove_shm, stop_processes
from lightllm_patches import tp_ranks
from lightllm_patches.lightllm_args import lightllm_args
from caraserve_router.lora.adapter_store import AdapterError
from lightllm_patches.req_queue import CaraReqQueue

log = logging.getLogger("caraserve.router")


class CaraRouterManager(RouterManager):
    def __init__(self, config: InstanceConfig, router_port, detokenization_port, control_reply_port):
        self.config = config
        super().__init__(lightllm_args(config), router_port, detokenization_port, model_rpc_ports=[])
        context = zmq.asyncio.Context(1)
        self.send_control_reply = context.socket(zmq.PUSH)
        self.send_control_reply.connect(f"tcp://127.0.0.1:{control_reply_port}")
        self.started_at = time.time()
        self.steps = 0

    async def wait_to_model_ready(self):
        self.model_rpc = CaraModelRpcClient()
        self.model_rpcs = [self.model_rpc]
        # --tp N: ranks 1..N-1 are processes driven like upstream's model RPCs (tp_ranks.py);
        # rank 0 stays in process. They rendezvous while each builds its shard of the model.
        dist_port = free_ports(1)[0] if self.config.tp > 1 else 0
        ranks = tp_ranks.start_ranks(self.config, dist_port, self.eos_id, self._tp_fatal) if self.config.tp > 1 else []
        try:
            await self.model_rpc.init_model({
                "cara_config": self.config,
                "eos_id": self.eos_id,
                "shm_prefix": self.config.shm_prefix,
                "tp_rank": 0,
                "world_size": self.config.tp,
                "dist_port": dist_port,
            })
            clients = tp_ranks.wait_ready(ranks, self._tp_fatal) if ranks else []
        except BaseException:
            stop_processes([proc for _, proc, _ in ranks])
            raise
        self.tp_procs = [proc for _, proc, _ in ranks]
        self.model_rpcs += clients  # upstream's step code calls every rank (self.world_size = tp)
        self.lora = self.model_rpc.lora  # the worker's AdapterManager (in process, rank 0)
        if clients:
            self.lora = tp_ranks.TpLora(self.lora, clients)  # rank 0 decides, every rank applies
        self.req_queue = CaraReqQueue(self.args, self, admit_adapter=self.lora.admit,
                                      begin_admission=self.lora.begin_admission, chunked=self.config.chunked_prefill)
        if self.config.lora.adapters:
            self._register_adapter_dir(self.config.lora.adapters)

    def _register_adapter_dir(self, root: str) -> None:
        root = os.path.abspath(root)  # the server's own flag: relative to where it was started
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                info = self.lora.add(name, path)
                log.info("registered adapter %s (rank %s)", name, info["rank"])

    # ---- control calls -------------------------------------------------------------------

    def _stats(self) -> InstanceStats:
        """The instance's state (ids are LightLLM's; the HTTP process maps them to the front
        end's request ids)."""
        running = [] if self.running_batch is None else self.running_batch.reqs
        lora = self.lora.stats()
        ranks = {name: info["rank"] for name, info in self.lora.list().items()}
        return InstanceStats(
            name=self.config.display_name,
            healthy=True,
            lora_mode=self.config.lora.mode,
            kernel=self.config.lora.decode_kernel,
            device=lora.get("device_kind") or (str(self.model_rpc.backend.device) if self.model_rpc.backend else ""),
            max_batch=self.config.running_max_req_size,
            resident_adapters=[ResidentAdapter(e["name"], e["rank"]) for e in lora["resident"]],
            running=[_req_view(r, ranks) for r in running],
            queued=[_req_view(r, ranks) for r in self.req_queue.waiting_req_list],
            kv_tokens_used=int(self.get_used_tokens()),
            kv_tokens_total=int(self.max_total_token_num),
            steps=self.steps,
            uptime_s=time.time() - self.started_at,
            lora=lora,
        )

    def _control(self, call):
        if isinstance(call, Ping):
            return "pong"
        if isinstance(call, GetStats):
            return self._stats().to_dict()
        if isinstance(call, GetSamples):
            return self.model_rpc.backend.samples(call.clear)
        if isinstance(call, AdapterCall):
            return self._adapter_call(call)
        raise ValueError(f"unknown control call {type(call).__name__}")

    def _adapter_call(self, call: AdapterCall):
        lora = self.lora
        if call.op is AdapterOp.ADD:
            return lora.add(call.name, call.path)
        if call.op is AdapterOp.REMOVE:
            self._check_unused(call.name)
            return lora.remove(call.name)
        if call.op is AdapterOp.LIST:
            return lora.list()
        if call.op is AdapterOp.STATS:
            return lora.stats()
        if call.op is AdapterOp.RESOLVE:
            return lora.resolve(call.name)
        return {AdapterOp.PIN: lora.pin, AdapterOp.UNPIN: lora.unpin}[call.op](call.name)

    def _check_unused(self, adapter: str) -> None:
        running = [] if self.running_batch is None else self.running_batch.reqs
        users = [r for r in list(running) + list(self.req_queue.waiting_req_list)
                 if r.sample_params.adapter_name == adapter and not r.finish_status.is_finished()]
        if users:
            raise AdapterError(f"adapter {adapter!r} is in use by {len(users)} request(s)", 409)

    def add_req(self, prompt_ids, sampling_params, multimodal_params, group_req_id):
        """Upstream `add_req`, refusing a request whose adapter is gone (it raced an unload)
        and starting the adapter's load on arrival (prefetch)."""
        adapter = sampling_params.adapter_name
        if adapter is not None and not self.lora.is_known(adapter):
            self.send_control_reply.send_pyobj(
                RequestFailed(group_req_id, f"adapter {adapter!r} is not loaded on this instance", 404))
            return
        super().add_req(prompt_ids, sampling_params, multimodal_params, group_req_id)
        if adapter is not None:
            self.lora.prefetch(adapter)

    def _answer(self, req: ControlRequest) -> None:
        try:
            reply = ControlReply(req.call_id, True, self._control(req.call))
        except AdapterError as e:
            reply = ControlReply(req.call_id, False, error=str(e), status=e.status)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            log.error("control call %r failed: %s", req.call, traceback.format_exc())
            reply = ControlReply(req.call_id, False, error=f"{type(e).__name__}: {e}", status=500)
        self.send_control_reply.send_pyobj(reply)

    async def loop_for_netio_req(self):
        while True:
            msg = await self.recv_from_httpserver.recv_pyobj()
            if isinstance(msg, ControlRequest):
                self._answer(msg)
            elif isinstance(msg, AbortReq):
                await self.abort(msg.group_req_id)
                self.send_to_detokenization.send_pyobj(msg)
            elif isinstance(msg, tuple) and len(msg) == 4:
                self.add_req(*msg)
            else:
                log.error("router got an unknown message %r", type(msg))

    async def abort(self, group_req_id):
        """Upstream `abort` (marks the request aborted: a running one leaves the batch after
        its next step), and drops it at once if it is still waiting: upstream leaves that to
        the next batch formation, which does not come while the running batch is full."""
        await super().abort(group_req_id)
        queue = self.req_queue
        queue.waiting_req_list = [r for r in queue.waiting_req_list
                                  if not (r.finish_status.is_aborted() and r.req_status == ReqRunStatus.WAIT_IN_QUEUE)]

    async def _step(self):
        self.steps += 1
        if self.config.chunked_prefill:  # = upstream's is_splitfuse_mode (lightllm_args)
            await self._chunked_step()
        else:
            await super()._step()

    async def _chunked_step(self):
        """Upstream `_step` for chunked prefill. New requests are registered with the worker
        (`_prefill_batch` only initialises in splitfuse mode) and merged into the running
        batch at once; their prompts then run chunk by chunk inside the decode steps, so the
        running requests never wait for a whole prompt."""
        if self.req_queue.waiting_req_list:
            new_batch = self.req_queue.generate_new_batch(self.running_batch)
            if new_batch is not None:
                self.stats_tool.count_prompt_tokens(new_batch)
                await self._prefill_batch(new_batch)
                if not new_batch.is_clear():
                    if self.running_batch is None:
                        self.running_batch = new_batch
                    else:
                        await self._merge_batch(self.running_batch, new_batch)
                        self.running_batch.merge(new_batch)
        if self.running_batch is None:
            return
        if self._can_decode(self.running_batch):
            self.stats_tool.count_output_tokens(self.running_batch)
            await self._decode_batch(self.running_batch)
            self._filter_runing_batch()
            return
        paused = select_paused_reqs(self.running_batch, self.pause_strategy, self.req_queue, self.max_total_token_num)
        await self._pause_reqs(self.running_batch, paused)

    # A failed forward must not stop the router (upstream's loop task would die silently and
    # every request would hang): the batch's requests end with an error, the rest go on.

    async def _prefill_batch(self, batch):
        try:
            await super()._prefill_batch(batch)
        except Exception:  # noqa: BLE001
            self._fail_batch(batch, "prefill")

    async def _decode_batch(self, batch):
        try:
            await super()._decode_batch(batch)
        except Exception:  # noqa: BLE001
            self._fail_batch(batch, "decode")

    def _tp_fatal(self, reason: str) -> None:
        """A rank died or failed: the ranks are out of step, so the instance stops (exit 1; its
        supervisor restarts it). Runs on a rank's reader thread, maybe while this process's main
        thread waits in a collective that will never complete."""
        log.error("%s; stopping the instance", reason)
        stop_processes([p for p in getattr(self, "tp_procs", []) if p.is_alive()], grace_s=1.0)
        remove_shm(self.config.shm_prefix)
        os._exit(1)

    def _fail_batch(self, batch, phase: str) -> None:
        if self.config.tp > 1:  # the other ranks may have run the step, or be waiting in it
            self._tp_fatal(f"{phase} step failed on rank 0:\n{traceback.format_exc()}")
        log.error("%s step failed; failing its %d request(s):\n%s", phase, len(batch.reqs), traceback.format_exc())
        ids = [r.request_id for r in batch.reqs]
        try:
            self.model_rpc.backend.purge(batch.batch_id, ids)
        except Exception:  # noqa: BLE001
            log.exception("could not release the failed batch's state")
        for req in batch.reqs:
            self.send_control_reply.send_pyobj(
                RequestFailed(req.group_req_id, f"the instance failed to run this request ({phase})", 500))
            self.send_to_detokenization.send_pyobj(AbortReq(group_req_id=req.group_req_id))
        batch.reqs = []
        batch.id_to_reqs = {}
        batch.batch_decode_need_tokens = 0

    def clean_up(self):
        backend = self.model_rpc.backend if hasattr(self, "model_rpc") else None
        if backend is not None:
            backend.shutdown()
        for rpc in getattr(self, "model_rpcs", [])[1:]:
            rpc.close()  # EOF: the rank shuts its backend (and sidecar) down and exits

        for proc in getattr(self, "tp_procs", []):
            proc.join(5)
        stop_processes(getattr(self, "tp_procs", []))


def _req_view(req, ranks: dict) -> RequestView:
    adapter = req.sample_params.adapter_name
    return RequestView(request_id=req.request_id, adapter=adapter, rank=ranks.get(adapter, 0) if adapter else 0,
                       prompt_tokens=req.input_len, max_new_tokens=req.max_output_len,
                       generated=req.cur_output_len)


def start_router_process(config: InstanceConfig, router_port, detokenization_port, control_reply_port, pipe_writer):
    """Process target (replaces upstream `start_router_process`)."""
    import signal

    from lightllm_patches._global import set_log_level

    die_with_parent(signal.SIGTERM)  # -> _stop below once started: the sidecar and shm go too
    set_log_level(config.log_level)
    router = None
    try:
        router = CaraRouterManager(config, router_port, detokenization_port, control_reply_port)
        asyncio.run(router.wait_to_model_ready())
    except Exception:
        pipe_writer.send(traceback.format_exc())
        if router is not None:
            router.clean_up()
        raise

    def _stop(signum, frame):
        router.clean_up()
        remove_shm(config.shm_prefix)  # normally the HTTP process does it; it may be the one that died
        os._exit(0)

    signal.signal(signal.SIGTERM, _stop)
    pipe_writer.send("init ok")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.create_task(router.loop_for_fwd())
    loop.run_until_complete(router.loop_for_netio_req())
