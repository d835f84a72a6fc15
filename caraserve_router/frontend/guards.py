"""Checks every request passes before FastAPI parses it (pure ASGI middleware): the API key,
the body-size limit, and text that cannot be encoded (lone UTF-16 surrogates in JSON strings).

Each refusal is an OpenAI-shaped error with a 4xx, like every other error of the front end.
"""
from __future__ import annotations

import hmac
import json
from typing import Any

from caraserve_router.contracts.protocol import error_body

OPEN_PATHS = ("/health",)  # answered without the API key (liveness probes)


def _header(scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return b""


async def _send_error(send, message: str, status: int, kind: str, headers: tuple = ()) -> None:
    body = json.dumps(error_body(message, status, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value holds a lone surrogate (not encodable as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


class Guard:
    """API key (401), body size (413) and surrogates (400) for the wrapped ASGI app."""

    def __init__(self, app, max_body_bytes: int, api_key: str = ""):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.expected = ("Bearer " + api_key).encode() if api_key else b""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected and scope["path"] not in OPEN_PATHS:
            # compare_digest: the time taken does not tell how much of a guessed key was right
            if not hmac.compare_digest(_header(scope, b"authorization"), self.expected):
                return await _send_error(send, "missing or wrong API key (send Authorization: Bearer KEY)", 401,
                                         "authentication_error", ((b"www-authenticate", b"Bearer"),))
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, f"request body of {int(length)} bytes exceeds the limit of "
                                     f"{self.max_body_bytes} bytes", 413, "invalid_request_error")
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here (bounded), so a chunked body without a length is limited too.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _send_error(send, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                         413, "invalid_request_error")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if b"\\ud" in body.lower() and self._surrogates(body):
            return await _send_error(send, "the JSON body holds a lone UTF-16 surrogate (e.g. \\ud800), which is "
                                     "not valid Unicode text", 400, "invalid_request_error")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        return await self.app(scope, replay, send)

    @staticmethod
    def _surrogates(body: bytes) -> bool:
        try:
            return has_lone_surrogate(json.loads(body))
        except (ValueError, RecursionError):
            return False  # not JSON: FastAPI answers it with a 400 of its own
