"""The HTTP-side manager of an instance: LightLLM's, taking token ids, adapters and control calls.

`CaraHttpServerManager` overrides `lightllm.server.httpserver.manager.HttpServerManager`:

- `generate`: takes prompt token ids (the cluster front end tokenizes) or text, refuses an
  unknown adapter before anything is queued, never waits forever (the router process being
  gone ends the request with an error), records TTFT / TPOT / E2E per adapter.
- `control`: request/reply calls to the router process (adapters, stats, ping).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator, Optional, Union

import zmq
import zmq.asyncio

from lightllm.server.httpserver.manager import HttpServerManager, ReqStatus
from lightllm.server.multimodal_params import MultimodalParams

from caraserve_router.contracts.control import ControlReply, ControlRequest, RequestFailed
from caraserve_router.lora.adapter_store import AdapterError
from lightllm_patches.sampling import CaraSamplingParams

log = logging.getLogger("caraserve.httpserver")


class RequestError(ValueError):
    """A request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


class CaraHttpServerManager(HttpServerManager):
    def __init__(self, args, router_port, httpserver_port, control_reply_port, metrics):
        super().__init__(args, router_port=router_port, cache_port=None, httpserver_port=httpserver_port,
                         visual_port=None, enable_multimodal=False)
        context = zmq.asyncio.Context(1)
        self.recv_control = context.socket(zmq.PULL)
        self.recv_control.bind(f"tcp://127.0.0.1:{control_reply_port}")
        self.pending: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count(1)
        self.adapters: dict[str, dict] = {}
        self.metrics = metrics
        self.router_alive = lambda: True  # replaced by the server with a process check

    # ---- control --------------------------------------------------------------------------

    async def control(self, method: str, *args, timeout: float = 60.0):
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        self.send_to_router.send_pyobj(ControlRequest(call_id, method, args))
        try:
            reply: ControlReply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError as e:
            raise RequestError(f"instance router did not answer {method!r} in {timeout:.0f}s", 503,
                               "server_error") from e
        finally:
            self.pending.pop(call_id, None)
        if not reply.ok:
            raise AdapterError(reply.error, reply.status) if reply.status < 500 else RuntimeError(reply.error)
        return reply.value

    async def control_loop(self):
        while True:
            msg = await self.recv_control.recv_pyobj()
            if isinstance(msg, RequestFailed):
                status = self.req_id_to_out_inf.get(msg.group_req_id)
                if status is not None:
                    status.failure = RequestError(msg.message, msg.status, "not_found" if msg.status == 404 else
                                                  "invalid_request_error")
                    status.event.set()
                continue
            future = self.pending.get(msg.call_id)
            if future is not None and not future.done():
                future.set_result(msg)

    async def refresh_adapters(self) -> dict:
        self.adapters = await self.control("list")
        return self.adapters

    # ---- generation -------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Union[str, list]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"input_ids must be a non-empty list of token ids in [0, {self.vocab_size})")
        return list(prompt)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    async def _resolve(self, adapter: Optional[str]) -> None:
        """An adapter this server has not seen: ask the runtime, which registers DIR/<name> when
        its resolver (`--lora-adapter-dir`) is on (LoraRuntime.resolve: 400 for a name that is not
        a plain directory name or a bad adapter, 404 for none)."""
        if adapter is None or adapter in self.adapters:
            return
        try:
            self.adapters[adapter] = await self.control("resolve", adapter)
        except AdapterError as e:
            raise RequestError(str(e), e.status, "not_found" if e.status == 404 else "invalid_request_error") from e

    def _check(self, prompt_ids: list, params: CaraSamplingParams) -> None:
        if params.adapter is not None and params.adapter not in self.adapters:
            raise RequestError(f"adapter {params.adapter!r} is not loaded on this instance", 404, "not_found")
        if len(prompt_ids) > self.max_req_input_len:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the limit is {self.max_req_input_len}")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_req_total_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) = {total} tokens exceeds "
                f"the limit of {self.max_req_total_len}"
            )

    async def generate(self, prompt, sampling_params: CaraSamplingParams, group_request_id: int,
                       multimodal_params: Optional[MultimodalParams] = None, request=None) -> AsyncIterator:
        """Yield (sub_req_id, text, metadata, finish_status) per generated token."""
        prompt_ids = self._prompt_ids(prompt)
        await self._resolve(sampling_params.adapter)
        self._check(prompt_ids, sampling_params)
        sampling_params.stop_sentences_to_token_ids(self.tokenizer)
        status = ReqStatus(group_request_id, multimodal_params)
        self.req_id_to_out_inf[group_request_id] = status
        start = time.perf_counter()
        first_token_at, count = None, 0
        self.send_to_router.send_pyobj((prompt_ids, sampling_params, MultimodalParams(images=[]), group_request_id))
        try:
            while True:
                try:
                    await asyncio.wait_for(status.event.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                if request is not None and await request.is_disconnected():
                    raise ConnectionAbortedError("client disconnected")
                if not self.router_alive():
                    raise RequestError("the instance's model process died", 503, "server_error")
                if getattr(status, "failure", None) is not None:
                    self.req_id_to_out_inf.pop(group_request_id, None)
                    raise status.failure
                async with status.lock:
                    status.event.clear()
                    items = list(status.out_token_info_list)
                    status.out_token_info_list.clear()
                for sub_id, text, metadata, finish in items:
                    count += 1
                    first_token_at = first_token_at or time.perf_counter()
                    metadata["prompt_tokens"] = len(prompt_ids)
                    yield sub_id, text, metadata, finish
                    if finish.is_finished():
                        self.req_id_to_out_inf.pop(group_request_id, None)
                        self._observe(sampling_params.adapter, start, first_token_at, count)
                        return
        finally:
            if group_request_id in self.req_id_to_out_inf:
                await self.abort(group_request_id)

    def _observe(self, adapter, start, first_token_at, count) -> None:
        now = time.perf_counter()
        self.metrics.observe_request(adapter, ttft=first_token_at - start, e2e=now - start,
                                     tpot=(now - first_token_at) / (count - 1) if count > 1 else None)

    async def abort(self, group_request_id):
        self.req_id_to_out_inf.pop(group_request_id, None)
        from lightllm.server.io_struct import AbortReq

        self.send_to_router.send_pyobj(AbortReq(group_req_id=group_request_id))
