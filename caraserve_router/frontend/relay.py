"""Relaying one routed request's token stream to an HTTP client: the pieces every route shares.

`front.generate(...)` is an async generator of `(text, event)`; errors raised by it before the
first token become an HTTP error response, errors after it an error event inside the stream.
"""
from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

from caraserve_router.contracts.protocol import error_kind, error_response
from caraserve_router.frontend.dispatcher import DispatchError
from caraserve_router.frontend.instance_client import InstanceError

# What a routed request raises when it cannot be served (HTTP status and kind in error_from).
RELAY_ERRORS = (DispatchError, InstanceError)


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


def fail(front, message: str, status: int, kind: Optional[str] = None) -> JSONResponse:
    """An error response in the OpenAI shape, counted in the front end's error metric."""
    kind = kind or error_kind(status)
    front.metrics.error(kind)
    return error_response(message, status, kind)
