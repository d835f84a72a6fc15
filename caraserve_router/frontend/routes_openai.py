"""`/v1/completions` and `/v1/chat/completions`: OpenAI requests routed through the cluster."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from caraserve_router.contracts import sse
from caraserve_router.frontend.openai_api import (
    DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest,
    ResponseShaper, StopMatcher, Usage, parameters, single_prompt, stop_list, unsupported,
)
from caraserve_router.frontend.relay import RELAY_ERRORS, error_from, fail, fail_from, next_item, until_disconnected


def _reason(event, matcher: StopMatcher) -> Optional[str]:
    """OpenAI's finish_reason once the request ended, else None."""
    if matcher.stopped:
        return "stop"
    if event is not None and event.get("finished"):
        return "length" if event.get("finish_reason") == "length" else "stop"
    return None


def router(front) -> APIRouter:
    api = APIRouter()

    async def prepare(req, chat: bool):
        """(adapter, rank, prompt ids, parameters dict, stops) or an error response."""
        problem = unsupported(req)
        if problem:
            return fail(front, problem, 400)
        try:
            adapter, rank = front.resolve_model(req.model)
        except KeyError:
            return fail(front, f"model {req.model!r} is neither the base model ({front.base_name}) nor a loaded "
                        "adapter", 404, "not_found")
        except ValueError as e:
            return fail(front, str(e), 400)
        try:
            stops = stop_list(req.stop)
            params = parameters(req, DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS)
            if chat:
                ids = await front.chat_ids_async([{"role": m.role, "content": m.text()} for m in req.messages])
            else:
                ids = await front.encode_async(single_prompt(req.prompt))
        except ValueError as e:
            return fail(front, str(e), 400)
        limit = front.template.max_req_total_len
        if len(ids) > front.template.max_req_input_len or len(ids) + params.max_new_tokens > limit:
            return fail(front, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                        f"limit ({front.template.max_req_input_len} prompt, {limit} total)", 400)
        return adapter, rank, ids, params.model_dump(exclude={"return_details"}), stops

    async def openai(req, chat: bool):
        prepared = await prepare(req, chat)
        if isinstance(prepared, JSONResponse):
            return prepared
        adapter, rank, ids, params, stops = prepared
        shaper = ResponseShaper(chat, req.model)
        matcher = StopMatcher(stops)
        gen = front.generate(adapter, rank, ids, params)
        try:
            first = await next_item(gen)
        except RELAY_ERRORS as e:
            return fail_from(front, e)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(gen, first, shaper, matcher, len(ids), usage), media_type=sse.MEDIA_TYPE)
        return await whole(gen, first, shaper, matcher, len(ids))

    async def whole(gen, first, shaper, matcher, prompt_tokens):
        parts, count, last = [], 0, None
        item = first
        try:
            while item is not None and not matcher.stopped:
                text, last = item
                count += 1
                parts.append(matcher.feed(text))
                item = await next_item(gen) if not last.get("finished") else None
        except RELAY_ERRORS as e:
            return fail_from(front, e)
        finally:
            await gen.aclose()
        parts.append(matcher.flush())
        return JSONResponse(shaper.final("".join(parts), _reason(last, matcher) or "stop",
                                         Usage(prompt_tokens, count)))

    async def stream(gen, first, shaper, matcher, prompt_tokens, include_usage):
        item, is_first, count = first, True, 0
        try:
            while item is not None and not matcher.stopped:
                text, event = item
                count += 1
                out = matcher.feed(text)
                done = bool(event.get("finished")) or matcher.stopped
                if done:
                    out += matcher.flush()
                yield sse.event(shaper.chunk(out, _reason(event, matcher) if done else None, first=is_first))
                is_first = False
                item = await next_item(gen) if not done else None
            if include_usage:
                yield sse.event(shaper.usage_chunk(Usage(prompt_tokens, count)))
            yield sse.DONE
        except RELAY_ERRORS as e:
            status, kind = error_from(e)
            front.metrics.error(kind)
            yield sse.error_event(str(e), status, kind)
        finally:
            await gen.aclose()

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await until_disconnected(request, openai(req, chat=False))

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await until_disconnected(request, openai(req, chat=True))

    return api
