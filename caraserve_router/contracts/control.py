"""Control messages between an instance's HTTP server process and its router process.

LightLLM's httpserver -> router channel carries only requests and aborts; CaraServe adds
request/reply control calls (adapter load/unload/list, stats, ping) on the same PUSH socket,
with replies on a socket of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ControlRequest:
    call_id: int
    method: str
    args: tuple = field(default_factory=tuple)


@dataclass
class ControlReply:
    call_id: int
    ok: bool
    value: Any = None
    error: str = ""
    status: int = 500  # HTTP status for errors


@dataclass
class RequestFailed:
    """The router could not take a request (e.g. its adapter was unloaded meanwhile)."""

    group_req_id: int
    message: str
    status: int = 400
