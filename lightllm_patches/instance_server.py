"""The HTTP server of one instance and its process lifecycle (replaces `lightllm.server.api_server`).

Upstream's api_server module builds its FastAPI app and uvicorn server at import time against
the APIs of older uvicorn/uvloop (`Server.install_signal_handlers`, removed), ignores SIGTERM in
its children and leaves shared memory behind. An instance instead:

1. validates its `InstanceConfig`, derives a unique shm prefix and free loopback ports;
2. starts the router (model worker inside) and LightLLM's detokenizer as spawned children;
3. serves the API below with uvicorn (uvloop), until SIGINT/SIGTERM;
4. stops its children and removes every `/dev/shm` entry of its prefix.

API (internal; the cluster front end `caraserve_router.api_server` is the public one):
`POST /generate`, `POST /generate_stream` (LightLLM format + `adapter`, `input_ids`, `seed`),
`GET /v1/models`, `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`,
`GET /stats`, `GET /health`, `GET /metrics`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from caraserve_router.contracts.protocol import (
    GenerateRequest, LoadAdapterRequest, UnloadAdapterRequest, error_kind, error_response, validation_message,
)

from lightllm_patches._global import set_log_level
from caraserve_router.contracts.configs import InstanceConfig
from lightllm_patches.detokenizer import start_detokenization_process
from lightllm_patches.httpserver_manager import CaraHttpServerManager, RequestError
from lightllm_patches.lightllm_args import lightllm_args
from caraserve_router.lora.adapter_store import AdapterError
from lightllm_patches.metrics import InstanceMetrics
from caraserve_router.contracts.processes import free_ports, remove_shm, start_children, stop_processes
from lightllm_patches.router_manager import start_router_process
from lightllm_patches.sampling import CaraSamplingParams

log = logging.getLogger("caraserve.instance")


def _sampling_params(req: GenerateRequest) -> CaraSamplingParams:
    p = req.parameters
    params = CaraSamplingParams(
        adapter=req.adapter, seed=p.seed, do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p,
        top_k=p.top_k, ignore_eos=p.ignore_eos, max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
        stop_sequences=p.stop_sequences, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
        skip_special_tokens=p.skip_special_tokens,
    )
    params.verify()
    return params


class InstanceApp:
    """The FastAPI app of one instance around its `CaraHttpServerManager`."""

    def __init__(self, config: InstanceConfig, manager: CaraHttpServerManager, metrics: InstanceMetrics):
        self.config = config
        self.manager = manager
        self.metrics = metrics
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
        app.post("/generate")(self.generate)
        app.post("/generate_stream")(self.generate_stream)
        app.get("/v1/models")(self.models)
        app.post("/v1/load_lora_adapter")(self.load_adapter)
        app.post("/v1/unload_lora_adapter")(self.unload_adapter)
        app.get("/stats")(self.stats)
        app.get("/step_samples")(self.step_samples)
        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.on_event("startup")(self._startup)

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        loop.create_task(self.manager.handle_loop())
        loop.create_task(self.manager.control_loop())
        await self.manager.refresh_adapters()

    async def _on_validation(self, request: Request, exc: RequestValidationError):
        return error_response(validation_message(exc), 400)

    def _error(self, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status", 400 if isinstance(exc, ValueError) else 500)
        self.metrics.error(error_kind(status))
        return error_response(str(exc), status, error_kind(status))

    async def _start(self, body: GenerateRequest, request: Request):
        prompt = body.prompt()
        params = _sampling_params(body)
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
        except (RequestError, AdapterError, ValueError) as e:
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
        except (RequestError, AdapterError, ValueError) as e:
            return self._error(e)
        return StreamingResponse(self._sse(gen, first), media_type="text/event-stream")

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
                yield f"data:{json.dumps(event, ensure_ascii=False)}\n\n".encode()
                item = await gen.__anext__() if not finish.is_finished() else None
        except StopAsyncIteration:
            return
        except (RequestError, AdapterError) as e:
            self.metrics.error(error_kind(e.status))
            yield f"data:{json.dumps({'error': {'message': str(e), 'type': error_kind(e.status), 'code': e.status}})}\n\n".encode()
        finally:
            await gen.aclose()

    async def models(self):
        adapters = await self.manager.refresh_adapters()
        data = [{"id": os.path.basename(self.config.model_dir.rstrip("/")), "object": "model", "base_model": True,
                 "rank": None, "target_modules": []}]
        data += [{"id": name, "object": "model", "base_model": False, **info} for name, info in adapters.items()]
        return {"object": "list", "data": data}

    async def load_adapter(self, body: LoadAdapterRequest):
        try:
            info = await self.manager.control("register", body.lora_name, body.lora_path)
        except (AdapterError, RequestError) as e:
            return self._error(e)
        await self.manager.refresh_adapters()
        return {"lora_name": body.lora_name, **info}

    async def unload_adapter(self, body: UnloadAdapterRequest):
        deadline = time.monotonic() + body.wait_s
        while True:
            try:
                await self.manager.control("unregister", body.lora_name)
                break
            except AdapterError as e:
                if e.status != 409 or time.monotonic() >= deadline:
                    return self._error(e)
                await asyncio.sleep(0.1)
        await self.manager.refresh_adapters()
        return {"lora_name": body.lora_name, "unloaded": True}

    async def stats(self):
        stats = await self.manager.control("stats", timeout=10.0)
        for req in stats["running"] + stats["queued"]:
            req["request_id"] = self.client_ids.get(req["request_id"], str(req["request_id"]))
        return stats

    async def step_samples(self, clear: int = 0):
        return await self.manager.control("samples", bool(clear), timeout=10.0)

    async def health(self):
        try:
            await self.manager.control("ping", timeout=5.0)
        except Exception as e:  # noqa: BLE001
            return error_response(f"unhealthy: {e}", 503, "server_error")
        return {"status": "ok"}

    async def prometheus(self):
        try:
            self.metrics.update_from_stats(await self.manager.control("stats", timeout=5.0))
        except Exception:  # noqa: BLE001 - still serve the histograms
            pass
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


def _prepare(config: InstanceConfig) -> InstanceConfig:
    config.validate()
    if not config.shm_prefix:
        config.shm_prefix = f"caraserve_{config.port}_{uuid.uuid4().hex[:8]}"
    return config


class _Terminated(SystemExit):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(0)


def serve(config: InstanceConfig) -> None:
    """Run one instance until SIGINT/SIGTERM; always stops its children and cleans /dev/shm."""
    # uvicorn captures SIGTERM during `run()` and re-raises it afterwards with the handler that
    # was installed before: make that one unwind the stack so the `finally` below runs.
    signal.signal(signal.SIGTERM, _raise_terminated)
    config = _prepare(config)
    set_log_level(config.log_level)
    router_port, detok_port, http_port, control_port = free_ports(4)
    args = lightllm_args(config)
    procs = []
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
        manager.router_alive = procs[0].is_alive
        app = InstanceApp(config, manager, metrics).app
        log.info("instance %s serving on http://%s:%d", config.display_name, config.host, config.port)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, loop="uvloop",
                                               log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=5))
        server.run()
    finally:
        stop_processes(procs)
        removed = remove_shm(config.shm_prefix)
        log.info("instance %s stopped (removed %d shm files)", config.display_name, len(removed))
