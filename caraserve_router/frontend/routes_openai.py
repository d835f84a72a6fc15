"""`/v1/completions` and `/v1/chat/completions`: OpenAI requests routed through the cluster."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from caraserve_router.contracts import sse
from caraserve_router.frontend.openai_api import (
    DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest,
    ResponseShaper, StopMatcher, Usage, parameters, stop_list, unsupported,
)
from caraserve_router.frontend.relay import RELAY_ERRORS, error_from, fail, next_item


def _reason(event, matcher: StopMatcher) -> Optional[str]:
    """OpenAI's finish_reason once the request ended, else None."""
    if matcher.stopped:
        return "stop"
    if event is not None and event.get("finished"):
        return "length" if event.get("finish_reason") == "length" else "stop"
    return None


def router(front) -> APIRouter:
    api = APIRouter()

    def prepare(req, chat: bool):
        """(adapter, rank, prompt ids, parameters dict, stops) or an error response."""
        problem = unsupported(req)
        if problem:
            return fail(front, problem, 400)
        try:
            adapter, rank = front.resolve_model(req.model)
        except KeyError:
            return fail(front, f"model {req.model!r} is neither the base model ({front.base_name}) nor a loaded "
                        "adapter", 404, "not_found")
        try:
            ids = front.chat_ids([m.model_dump() for m in req.messages]) if chat else front.encode(req.prompt)
            stops = stop_list(req.stop)
            params = parameters(req, DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS)
        except ValueError as e:
            return fail(front, str(e), 400)
        limit = front.template.max_req_total_len
        if len(ids) > front.template.max_req_input_len or len(ids) + params.max_new_tokens > limit:
            return fail(front, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                        f"limit ({front.template.max_req_input_len} prompt, {limit} total)", 400)
        return adapter, rank, ids, params.model_dump(exclude={"return_details"}), stops

    async def openai(req, chat: bool):
        prepared = prepare(req, chat)
        if isinstance(prepared, JSONResponse):
            return prepared
        adapter, rank, ids, params, stops = prepared
        shaper = ResponseShaper(chat, req.model)
        matcher = StopMatcher(stops)
        gen = front.generate(adapter, rank, ids, params)
        try:
            first = await next_item(gen)
        except RELAY_ERRORS as e:
            return fail(front, str(e), *error_from(e))
        if req.stream:
            return StreamingResponse(stream(gen, first, shaper, matcher), media_type=sse.MEDIA_TYPE)
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
            return fail(front, str(e), *error_from(e))
        finally:
            await gen.aclose()
        parts.append(matcher.flush())
        return JSONResponse(shaper.final("".join(parts), _reason(last, matcher) or "stop",
                                         Usage(prompt_tokens, count)))

    async def stream(gen, first, shaper, matcher):
        item, is_first = first, True
        try:
            while item is not None and not matcher.stopped:
                text, event = item
                out = matcher.feed(text)
                done = bool(event.get("finished")) or matcher.stopped
                if done:
                    out += matcher.flush()
                yield sse.event(shaper.chunk(out, _reason(event, matcher) if done else None, first=is_first))
                is_first = False
                item = await next_item(gen) if not done else None
            yield sse.DONE
        except RELAY_ERRORS as e:
            status, kind = error_from(e)
            front.metrics.error(kind)
            yield sse.error_event(str(e), status, kind)
        finally:
            await gen.aclose()

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await openai(req, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await openai(req, chat=True)

    return api
