"""Server-Sent-Event framing, written once for both tiers (front end and instance).

Events are `data: <json>\n\n`; an OpenAI stream ends with `data: [DONE]\n\n`. Errors inside a
stream use the same body as HTTP errors (`protocol.error_body`), so one client parser handles
both.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from caraserve_router.contracts.protocol import error_body, error_kind

MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    """One SSE event carrying `obj` as JSON (non-ASCII kept as is)."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def error_event(message: str, status: int, kind: Optional[str] = None) -> bytes:
    """An error inside a stream, in the OpenAI error shape with the HTTP status as its code
    (`kind`: the error type, by default the one of the status)."""
    return event(error_body(message, status, kind or error_kind(status)))


def parse_event(line: bytes | str) -> Any | None:
    """The JSON payload of one `data:` line; None for blank lines, comments and `[DONE]`."""
    text = line.decode() if isinstance(line, (bytes, bytearray)) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    payload = text[len("data:"):].strip()
    return None if payload == "[DONE]" else json.loads(payload)
