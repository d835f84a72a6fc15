"""LightLLM's `/generate` and `/generate_stream` (with an `adapter` field), routed through the
cluster."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from caraserve_router.contracts import sse
from caraserve_router.contracts.protocol import GenerateRequest
from caraserve_router.frontend.relay import RELAY_ERRORS, error_from, fail, fail_from, next_item, until_disconnected


def router(front) -> APIRouter:
    api = APIRouter()

    async def lightllm(body: GenerateRequest, stream: bool):
        try:
            adapter, rank = front.resolve_model(body.adapter)
            ids = await front.encode_async(body.prompt())
        except KeyError:
            return fail(front, f"adapter {body.adapter!r} is not loaded", 404, "not_found")
        except ValueError as e:
            return fail(front, str(e), 400)
        params = body.parameters.model_dump(exclude={"return_details"})
        gen = front.generate(adapter, rank, ids, params)
        try:
            first = await next_item(gen)
        except RELAY_ERRORS as e:
            return fail_from(front, e)
        if stream:
            return StreamingResponse(events(gen, first), media_type=sse.MEDIA_TYPE)
        return await whole(gen, first)

    async def events(gen, item):
        try:
            while item is not None:
                yield sse.event(item[1])
                item = await next_item(gen) if not item[1].get("finished") else None
        except RELAY_ERRORS as e:
            status, kind = error_from(e)
            front.metrics.error(kind)
            yield sse.error_event(str(e), status, kind)
        finally:
            await gen.aclose()

    async def whole(gen, item):
        items = []
        try:
            while item is not None:
                items.append(item)
                item = await next_item(gen) if not item[1].get("finished") else None
        except RELAY_ERRORS as e:
            return fail_from(front, e)
        finally:
            await gen.aclose()
        last = items[-1][1]
        return {"generated_text": ["".join(t for t, _ in items)], "count_output_tokens": len(items),
                "finish_reason": last.get("finish_reason"), "prompt_tokens": last.get("prompt_tokens"),
                "token_ids": [e["token"]["id"] for _, e in items]}

    @api.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        return await until_disconnected(request, lightllm(body, stream=False))

    @api.post("/generate_stream")
    async def generate_stream(body: GenerateRequest, request: Request):
        return await until_disconnected(request, lightllm(body, stream=True))

    return api
