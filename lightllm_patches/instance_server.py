"""The HTTP server of one instance and its process lifecycle (replaces `lightllm.server.api_server`).

Upstream's api_server module builds its FastAPI app and uvicorn server at import time against
the APIs of older uvicorn/uvloop (`Server.install_signal_handlers`, removed), ignores SIGTERM in
its children and leaves shared memory behind. An instance instead:

1. validates its `InstanceConfig`, derives a unique shm prefix and free loopback ports;
2. starts the router (model worker inside) and LightLLM's detokenizer as spawned children,
   which die with this process (`die_with_parent`);
3. serves the API below with uvicorn (uvloop), until SIGINT/SIGTERM, or until a child dies:
   `ChildWatch` notices within `WATCH_PERIOD_S`, ends every request in flight with a 503
   error (event), and stops the server, so the instance exits (status 1) and whoever runs it
   (the front end's monitor) restarts it. Sidecar workers are restarted by the sidecar itself;
4. stops its children and removes every `/dev/shm` entry of its prefix.

A request whose client disconnects is aborted in the router (its slot frees within a step; a
queued one is dropped before it runs).

API (internal; the cluster front end `caraserve_router.api_server` is the public one):
`POST /generate`, `POST /generate_stream` (LightLLM format + `adapter`, `input_ids`, `seed`),
`GET /v1/models`, `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`,
`GET /stats`, `GET /health` (liveness: this process and its children, never the router loop),
`GET /ready` (readiness: the router loop answers), `GET /metrics`. Errors are OpenAI-shaped.
With `CARASERVE_INSTANCE_KEY` in its environment (its launchers set it) every route but
`/health` and `/metrics` needs that key (`contracts/instance_auth.py`); without one it serves
loopback only. It binds its port itself (port 0: any; taken: the next free one) and writes it to
`--port-file`, so no other process can take the port between a launcher's choice and the bind.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from typing import AsyncIterator, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from caraserve_router.contracts import sse
from caraserve_router.contracts.adapters import AdapterOp
from caraserve_router.contracts.control import AdapterCall, GetSamples, GetStats, Ping
from caraserve_router.contracts.instance_auth import INSTANCE_KEY_ENV, InstanceAuth, confined_path, is_loopback
from caraserve_router.contracts.stats import InstanceStats
from caraserve_router.contracts.protocol import (
    GenerateRequest, LoadAdapterRequest, UnloadAdapterRequest, error_kind, error_response, validation_message,
)

from lightllm_patches._global import set_log_level
from caraserve_router.contracts.configs import InstanceConfig, parse_cores
from lightllm_patches.detokenizer import start_detokenization_process
from lightllm_patches.httpserver_manager import CaraHttpServerManager, ClientGone, RequestError, check_text
from lightllm_patches.lightllm_args import lightllm_args
from caraserve_router.lora.adapter_store import AdapterError
from caraserve_router.contracts.host_segments import remove_idle
from lightllm_patches.metrics import InstanceMetrics
from caraserve_router.contracts.processes import (
    Terminated, bind_listening, free_ports, raise_terminated, remove_shm, start_children, stop_processes,
    write_port_file,
)
from lightllm_patches.router_manager import start_router_process
from lightllm_patches.sampling import CaraSamplingParams

log = logging.getLogger("caraserve.instance")


WATCH_PERIOD_S = 0.5  # how often the HTTP process checks that its children live
READY_TIMEOUT_S = 5.0  # /ready: the router loop must answer a ping within this
DEATH_GRACE_S = 1.0  # after a child died: time for the error events to reach the clients
CLIENT_CLOSED = 499  # nginx's status for "client closed the request" (nobody reads it)


def _sampling_params(req: GenerateRequest, manager: CaraHttpServerManager) -> CaraSamplingParams:
    p = req.parameters
    stops = p.stop_sequences if isinstance(p.stop_sequences, list) else [p.stop_sequences or ""]
    for stop in stops:
        check_text(stop, "stop_sequences")
    params = CaraSamplingParams(
        adapter=manager.adapter_request(req.adapter), seed=p.seed, do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p,
        top_k=p.top_k, ignore_eos=p.ignore_eos, max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
        stop_sequences=p.stop_sequences, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
        skip_special_tokens=p.skip_special_tokens,
    )
    params.verify()
    return params


class InstanceApp:
    """The FastAPI app of one instance around its `CaraHttpServerManager`."""

    def __init__(self, config: InstanceConfig, manager: CaraHttpServerManager, metrics: InstanceMetrics,
                 watch: "ChildWatch"):
        self.config = config
        self.manager = manager
        self.metrics = metrics
        self.watch = watch
        self.next_id = 0
        self.client_ids: dict[int, str] = {}  # LightLLM request id -> the front end's request id
        self.app = FastAPI(title=f"CaraServe instance {config.display_name}")
        self._routes()

    def _new_id(self) -> int:
        from lightllm.server.req_id_generator import MAX_BEST_OF

        self.next_id += MAX_BEST_OF
        return self.next_id

    def _routes(self) -> None:
        app = self.app
        app.exception_handler(RequestValidationError)(self._on_validation)
        app.exception_handler(StarletteHTTPException)(self._on_http_error)  # 404 / 405 in the OpenAI shape
        app.exception_handler(Exception)(self._on_crash)
        app.post("/generate")(self.generate)
        app.post("/generate_stream")(self.generate_stream)
        app.get("/v1/models")(self.models)
        app.post("/v1/load_lora_adapter")(self.load_adapter)
        app.post("/v1/unload_lora_adapter")(self.unload_adapter)
        app.get("/stats")(self.stats)
        app.get("/step_samples")(self.step_samples)
        app.get("/health")(self.health)
        app.get("/ready")(self.ready)
        app.get("/metrics")(self.prometheus)
        app.on_event("startup")(self._startup)

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        loop.create_task(self.manager.handle_loop())
        loop.create_task(self.manager.control_loop())
        self.watch.start(loop)
        await self.manager.refresh_adapters()

    async def _on_validation(self, request: Request, exc: RequestValidationError):
        return error_response(validation_message(exc), 400)

    async def _on_http_error(self, request: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code, error_kind(exc.status_code))

    async def _on_crash(self, request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return self._error(exc)

    def _error(self, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status", 400 if isinstance(exc, ValueError) else 500)
        self.metrics.error(error_kind(status))
        message = str(exc) if status < 500 or isinstance(exc, (RequestError, AdapterError)) else \
            f"internal error ({type(exc).__name__}); see the instance's log"
        return error_response(message, status, error_kind(status))

    async def _start(self, body: GenerateRequest, request: Request):
        prompt = body.prompt()
        await self.manager.resolve_adapter(body.adapter)  # the resolver's first use of a name
        params = _sampling_params(body, self.manager)
        req_id = self._new_id()
        if body.request_id is not None:
            self.client_ids[req_id] = body.request_id
        gen = self._tracked(self.manager.generate(prompt, params, req_id, request=request), req_id)
        first = await gen.__anext__()  # raises the request's validation errors before any byte is sent
        return gen, first

    async def _tracked(self, gen, req_id: int):
        try:
            async for item in gen:
                yield item
        finally:
            self.client_ids.pop(req_id, None)
            await gen.aclose()

    async def generate(self, body: GenerateRequest, request: Request):
        try:
            gen, first = await self._start(body, request)
            items = [first] + [item async for item in gen]
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except (RequestError, AdapterError, ValueError, RuntimeError) as e:
            return self._error(e)
        text = "".join(t for _, t, _, _ in items)
        result = {
            "generated_text": [text],
            "count_output_tokens": len(items),
            "finish_reason": items[-1][3].get_finish_reason(),
            "prompt_tokens": items[0][2]["prompt_tokens"],
        }
        if body.parameters.return_details:
            result["tokens"] = [{"id": m["id"], "text": t, "logprob": m["logprob"]} for _, t, m, _ in items]
        return JSONResponse(result)

    async def generate_stream(self, body: GenerateRequest, request: Request):
        try:
            gen, first = await self._start(body, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except (RequestError, AdapterError, ValueError, RuntimeError) as e:
            return self._error(e)
        return StreamingResponse(self._sse(gen, first), media_type=sse.MEDIA_TYPE)

    async def _sse(self, gen, first) -> AsyncIterator[bytes]:
        item = first
        try:
            while item is not None:
                _, text, meta, finish = item
                event = {
                    "token": {"id": meta["id"], "text": text, "logprob": meta["logprob"]},
                    "prompt_tokens": meta["prompt_tokens"],
                    "finished": finish.is_finished(),
                    "finish_reason": finish.get_finish_reason(),
                }
                yield sse.event(event)
                item = await gen.__anext__() if not finish.is_finished() else None
        except (StopAsyncIteration, ClientGone):
            return
        except (RequestError, AdapterError) as e:
            self.metrics.error(error_kind(e.status))
            yield sse.error_event(str(e), e.status)
        finally:
            await gen.aclose()

    async def models(self):
        adapters = await self.manager.refresh_adapters()
        data = [{"id": os.path.basename(self.config.model_dir.rstrip("/")), "object": "model", "base_model": True,
                 "rank": None, "target_modules": []}]
        data += [{"id": name, "object": "model", "base_model": False, **info} for name, info in adapters.items()]
        return {"object": "list", "data": data}

    async def load_adapter(self, body: LoadAdapterRequest):
        if self.config.roots:  # the front end's --adapter-roots, applied here too: the instance may be reached directly
            try:
                confined_path(body.lora_path, self.config.roots)
            except ValueError as e:
                return error_response(str(e), 400)
        try:
            info = await self.manager.control(AdapterCall(AdapterOp.ADD, body.lora_name, body.lora_path))
        except (AdapterError, RequestError) as e:
            return self._error(e)
        await self.manager.refresh_adapters()
        return {"lora_name": body.lora_name, **info}

    async def unload_adapter(self, body: UnloadAdapterRequest):
        deadline = time.monotonic() + body.wait_s
        while True:
            try:
                await self.manager.control(AdapterCall(AdapterOp.REMOVE, body.lora_name))
                break
            except AdapterError as e:
                if e.status != 409 or time.monotonic() >= deadline:
                    return self._error(e)
                await asyncio.sleep(0.1)
        await self.manager.refresh_adapters()
        return {"lora_name": body.lora_name, "unloaded": True}

    async def stats(self):
        stats = InstanceStats.from_dict(await self.manager.control(GetStats(), timeout=10.0))
        return stats.with_request_ids(lambda rid: self.client_ids.get(rid, str(rid))).to_dict()

    async def step_samples(self, clear: int = 0):
        return await self.manager.control(GetSamples(bool(clear)), timeout=10.0)

    async def health(self):
        """Liveness, answered here: never waits for the router loop (a long prefill holds it)."""
        dead = self.watch.dead()
        if dead:
            return error_response(f"unhealthy: {dead}", 503, "server_error")
        return {"status": "ok", "processes": self.watch.pids()}

    async def ready(self):
        """Readiness: the router loop answers a ping (it may be busy with a long step)."""
        try:
            await self.manager.control(Ping(), timeout=READY_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            return error_response(f"not ready: {e}", 503, "server_error")
        return {"status": "ready"}

    async def prometheus(self):
        try:
            self.metrics.update_from_stats(await self.manager.control(GetStats(), timeout=5.0))
        except Exception:  # noqa: BLE001 - still serve the histograms
            pass
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


def _prepare(config: InstanceConfig) -> InstanceConfig:
    config.validate()
    if config.cpu_cores:  # before any child starts: they inherit it (the sidecar pins within it)
        os.sched_setaffinity(0, parse_cores(config.cpu_cores))
    if not config.shm_prefix:
        config.shm_prefix = f"caraserve_{config.port}_{uuid.uuid4().hex[:8]}"
    return config


class ChildWatch:
    """Watches the instance's child processes from the HTTP process's event loop.

    When one dies: every request in flight ends with a 503 error, and `on_death` stops the
    server, so the instance exits (status 1) instead of serving requests that would hang."""

    def __init__(self, on_death):
        self.procs: dict[str, object] = {}  # name -> multiprocessing.Process
        self.on_death = on_death
        self.manager: Optional[CaraHttpServerManager] = None
        self.death: Optional[str] = None

    def pids(self) -> dict:
        return {"http": os.getpid(), **{name: p.pid for name, p in self.procs.items()}}

    def dead(self) -> Optional[str]:
        if self.death is None:
            for name, proc in self.procs.items():
                if not proc.is_alive():
                    self.death = f"the instance's {name} process (pid {proc.pid}) exited with code {proc.exitcode}"
        return self.death

    def start(self, loop) -> None:
        loop.create_task(self._run())

    async def _run(self) -> None:
        while not self.dead():
            await asyncio.sleep(WATCH_PERIOD_S)
        log.error("%s; failing requests in flight and stopping the instance", self.death)
        if self.manager is not None:
            self.manager.fail_all(RequestError(f"{self.death}; the instance is restarting", 503, "server_error"))
        self.on_death(self.death)


def serve(config: InstanceConfig) -> int:
    """Run one instance until SIGINT/SIGTERM (0) or the death of a child process (1); always
    stops its children and cleans /dev/shm."""
    # uvicorn captures SIGTERM during `run()` and re-raises it afterwards with the handler that
    # was installed before: make that one unwind the stack so the `finally` below runs.
    signal.signal(signal.SIGTERM, raise_terminated)
    # Read and dropped at once: the children need no key, and a core dump or /proc/PID/environ
    # of theirs then holds none.
    key = os.environ.pop(INSTANCE_KEY_ENV, "")
    if not key and not is_loopback(config.host):
        raise ValueError(f"an instance listening on {config.host} (beyond loopback) needs a key: set "
                         f"{INSTANCE_KEY_ENV} (the front end's launchers do)")
    config.validate()
    listener = bind_listening(config.host, config.port)  # bound here and kept: no other process can take it
    config.port = listener.getsockname()[1]
    config = _prepare(config)
    set_log_level(config.log_level)
    router_port, detok_port, http_port, control_port = free_ports(4)
    args = lightllm_args(config)
    procs, died = [], []
    try:
        from lightllm.server.metrics import monitor

        # LightLLM's SamplingParams.verify is timed into this (global-registry) monitor.
        monitor.init_api_server_monitor(args)
        metrics = InstanceMetrics(config.display_name, emulated_link=config.lora.link != "cuda",
                                  model_name=os.path.basename(config.model_dir.rstrip("/")),
                                  max_lora_rank=config.lora.max_rank)
        manager = CaraHttpServerManager(args, router_port, http_port, control_port, metrics)
        procs = start_children([
            (start_router_process, (config, router_port, detok_port, control_port)),
            (start_detokenization_process, (args, detok_port, http_port, config.log_level)),
        ])
        server: Optional[uvicorn.Server] = None

        def on_death(reason: str) -> None:
            died.append(reason)
            server.should_exit = True
            # the error events are out; don't wait the graceful period for idle keep-alives
            asyncio.get_running_loop().call_later(DEATH_GRACE_S, setattr, server, "force_exit", True)

        watch = ChildWatch(on_death)
        watch.procs = {"router": procs[0], "detokenizer": procs[1]}
        watch.manager = manager
        app = InstanceApp(config, manager, metrics, watch).app
        if key:
            app = InstanceAuth(app, key)
        log.info("instance %s serving on http://%s:%d%s", config.display_name, config.host, config.port,
                 " (instance key required)" if key else "")
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, loop="uvloop",
                                               log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=5))
        if config.port_file:  # the socket already queues connections: the launcher may use it now
            write_port_file(config.port_file, config.port)
        server.run(sockets=[listener])
    except Terminated:
        pass
    finally:
        listener.close()
        stop_processes(procs[:1])  # the router: SIGTERM stops its sidecar and frees its shm
        stop_processes(procs[1:], grace_s=0.0)  # the detokenizer holds nothing; upstream's waits on SIGTERM
        removed = remove_shm(config.shm_prefix) + remove_idle(config.adapter_store_prefix)
        log.info("instance %s stopped (removed %d shm files)", config.display_name, len(removed))
    if died:
        log.error("instance %s exits: %s", config.display_name, died[0])
        return 1
    return 0
