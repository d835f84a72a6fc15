"""The HTTP-side manager of an instance: LightLLM's, taking token ids, adapters and control calls.

`CaraHttpServerManager` overrides `lightllm.server.httpserver.manager.HttpServerManager`:

- `generate`: takes prompt token ids (the cluster front end tokenizes) or text (tokenized off
  the event loop), never waits forever (`fail_all` ends every request when a process of the
  instance dies), aborts the request in the router when its client disconnects, and records
  TTFT / TPOT / E2E per adapter however the request ends.
- `adapter_request`: the one check of a request's adapter (-> `AdapterRequest`).
- `control`: request/reply calls to the router process (adapters, stats, ping).
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from typing import AsyncIterator, Optional, Union

import zmq
import zmq.asyncio

from lightllm.server.httpserver.manager import HttpServerManager, ReqStatus
from lightllm.server.multimodal_params import MultimodalParams

from caraserve_router.contracts.adapters import AdapterOp, AdapterRequest
from caraserve_router.contracts.control import AdapterCall, ControlCall, ControlReply, ControlRequest, RequestFailed
from caraserve_router.lora.adapter_store import AdapterError
from lightllm_patches.sampling import CaraSamplingParams

log = logging.getLogger("caraserve.httpserver")


class RequestError(ValueError):
    """A request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


class ClientGone(ConnectionAbortedError):
    """The HTTP client of a request went away; the request was aborted."""


class RequestOutcome(str, enum.Enum):
    """How a request ended (a label of the instance's request counter)."""

    FINISHED = "finished"  # stop token, length or stop string
    ABORTED = "aborted"    # the client went away (or the consumer stopped reading)
    ERROR = "error"        # the instance failed it

    def __str__(self) -> str:
        return self.value


WAKE_S = 0.25  # a waiting request re-checks its client and the instance this often


def check_text(text: str, field: str) -> None:
    """400 for text that is not valid Unicode (a lone surrogate such as "\\ud800" in JSON
    decodes to a str that cannot be encoded, tokenized or echoed back)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{field} is not valid Unicode: lone surrogate at character {e.start}") from None


class _Timing:
    """Arrival, first and last token times of one request -> its TTFT / TPOT / E2E."""

    def __init__(self, start: float):
        self.start, self.first, self.last, self.count = start, None, None, 0

    def token(self, now: float) -> None:
        self.first = self.first or now
        self.last = now
        self.count += 1

    def latencies(self, now: float) -> dict:
        return {"e2e": now - self.start, "ttft": None if self.first is None else self.first - self.start,
                "tpot": (self.last - self.first) / (self.count - 1) if self.count > 1 else None}


class CaraHttpServerManager(HttpServerManager):
    def __init__(self, args, router_port, httpserver_port, control_reply_port, metrics):
        super().__init__(args, router_port=router_port, cache_port=None, httpserver_port=httpserver_port,
                         visual_port=None, enable_multimodal=False)
        # messages queued for a dead router must not hold this process at exit (zmq's default
        # linger waits for them forever)
        self.send_to_router.setsockopt(zmq.LINGER, 0)
        context = zmq.asyncio.Context(1)
        self.recv_control = context.socket(zmq.PULL)
        self.recv_control.bind(f"tcp://127.0.0.1:{control_reply_port}")
        self.pending: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count(1)
        self.adapters: dict[str, dict] = {}
        self.metrics = metrics
        self.failure: Optional[RequestError] = None  # set when a process of the instance died

    # ---- control --------------------------------------------------------------------------

    async def control(self, call: ControlCall, timeout: float = 60.0):
        """Send one typed control call to the router process and return its reply's value."""
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        self.send_to_router.send_pyobj(ControlRequest(call_id, call))
        try:
            reply: ControlReply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError as e:
            raise RequestError(f"instance router did not answer {type(call).__name__} in {timeout:.0f}s", 503,
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
        self.adapters = await self.control(AdapterCall(AdapterOp.LIST))
        return self.adapters

    # ---- generation -------------------------------------------------------------------------

    async def _prompt_ids(self, prompt: Union[str, list]) -> list[int]:
        if isinstance(prompt, str):
            check_text(prompt, "inputs")
            # a long prompt takes the tokenizer a while: off the event loop, so /health and the
            # other streams are not held up by it
            return await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.encode, prompt)
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"input_ids must be a non-empty list of token ids in [0, {self.vocab_size})")
        return list(prompt)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    async def resolve_adapter(self, name: Optional[str]) -> None:
        """An adapter name this server has not seen: ask the runtime, which registers DIR/<name>
        when its resolver (`--lora-adapter-dir`) is on (LoraRuntime.resolve: 400 for a name that
        is not a plain directory name or a bad adapter, 404 for none)."""
        if name is None or name in self.adapters:
            return
        try:
            self.adapters[name] = await self.control(AdapterCall(AdapterOp.RESOLVE, name))
        except (AdapterError, ValueError) as e:
            status = getattr(e, "status", 400)
            raise RequestError(str(e), status, "not_found" if status == 404 else "invalid_request_error") from e

    def adapter_request(self, name: Optional[str]) -> Optional[AdapterRequest]:
        """The typed adapter of a request named `name` (None: the base model); 404 when this
        instance has no such adapter. The one check of a request's adapter."""
        if name is None:
            return None
        info = self.adapters.get(name)
        if info is None:
            raise RequestError(f"adapter {name!r} is not loaded on this instance", 404, "not_found")
        return AdapterRequest.from_info(name, info)

    def _check(self, prompt_ids: list, params: CaraSamplingParams) -> None:
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
        """Yield (sub_req_id, text, metadata, finish_status) per generated token.

        Ends the request in the router (`AbortReq`) whenever it stops early: the consumer
        closed the generator, `request` (the HTTP request) was disconnected (raises
        `ClientGone`), or the request failed. The latency histograms record it however it
        ends (`RequestOutcome`)."""
        prompt_ids = await self._prompt_ids(prompt)
        self._check(prompt_ids, sampling_params)
        sampling_params.stop_sentences_to_token_ids(self.tokenizer)
        status = ReqStatus(group_request_id, multimodal_params)
        self.req_id_to_out_inf[group_request_id] = status
        timing = _Timing(time.perf_counter())
        outcome = RequestOutcome.ABORTED  # unless it finishes or fails below
        self.send_to_router.send_pyobj((prompt_ids, sampling_params, MultimodalParams(images=[]), group_request_id))
        try:
            while True:
                try:
                    await asyncio.wait_for(status.event.wait(), timeout=WAKE_S)
                except asyncio.TimeoutError:
                    pass
                if request is not None and await request.is_disconnected():
                    raise ClientGone("client disconnected")
                failure = getattr(status, "failure", None) or self.failure
                if failure is not None:
                    outcome = RequestOutcome.ERROR
                    raise failure
                async with status.lock:
                    status.event.clear()
                    items = list(status.out_token_info_list)
                    status.out_token_info_list.clear()
                for sub_id, text, metadata, finish in items:
                    timing.token(time.perf_counter())
                    metadata["prompt_tokens"] = len(prompt_ids)
                    if finish.is_finished():
                        # set before the yield: a consumer that stops after the last token never resumes us
                        outcome = RequestOutcome.FINISHED
                        self.req_id_to_out_inf.pop(group_request_id, None)
                    yield sub_id, text, metadata, finish
                    if finish.is_finished():
                        return
        finally:
            if group_request_id in self.req_id_to_out_inf:
                await self.abort(group_request_id)
            self.metrics.observe_request(sampling_params.adapter_name, outcome, **timing.latencies(time.perf_counter()))

    def fail_all(self, error: "RequestError") -> None:
        """End every request in flight with `error` (a process of the instance died)."""
        self.failure = error
        for status in list(self.req_id_to_out_inf.values()):
            status.failure = error
            status.event.set()

    async def abort(self, group_request_id):
        self.req_id_to_out_inf.pop(group_request_id, None)
        from lightllm.server.io_struct import AbortReq

        self.send_to_router.send_pyobj(AbortReq(group_req_id=group_request_id))
