"""Relaying one routed request's token stream to an HTTP client: the pieces every route shares.

`front.generate(...)` is an async generator of `(text, event)`; errors raised by it before the
first token become an HTTP error response, errors after it an error event inside the stream.
A client that disconnects before its response starts cancels the handler (`until_disconnected`),
which closes the stream to the instance, and so aborts the request there; once a stream has
started, Starlette cancels it the same way when the client goes.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from caraserve_router.contracts.protocol import error_kind, error_response
from caraserve_router.frontend.dispatcher import DispatchError
from caraserve_router.frontend.instance_client import InstanceError

# What a routed request raises when it cannot be served (HTTP status and kind in error_from).
RELAY_ERRORS = (DispatchError, InstanceError)
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the client


async def next_item(gen):
    """The generator's next item, or None when it is exhausted."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


def error_from(exc: Exception) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of a relay error."""
    if isinstance(exc, DispatchError):
        return exc.status, exc.kind
    if isinstance(exc, InstanceError):
        return exc.status, error_kind(exc.status)
    return 500, "server_error"


def fail(front, message: str, status: int, kind: Optional[str] = None,
         retry_after_s: Optional[int] = None) -> JSONResponse:
    """An error response in the OpenAI shape, counted in the front end's error metric."""
    kind = kind or error_kind(status)
    front.metrics.error(kind)
    response = error_response(message, status, kind)
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(retry_after_s)
    return response


def fail_from(front, exc: Exception) -> JSONResponse:
    """The error response of a relay error (with Retry-After where it gives one)."""
    status, kind = error_from(exc)
    return fail(front, str(exc), status, kind, getattr(exc, "retry_after_s", None))


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work) -> Response:
    """Run the handler coroutine `work`; if the client disconnects first, cancel it (its
    request is dropped from the queue, or aborted at the instance) and answer nobody."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - nobody is left to tell
        pass
    return Response(status_code=CLIENT_CLOSED)
