"""Control messages between an instance's HTTP server process and its router process.

LightLLM's httpserver -> router channel carries only requests and aborts; CaraServe adds
request/reply control calls on the same PUSH socket, with replies on a socket of their own.
A call is one typed object per operation (`Ping`, `GetStats`, `GetSamples`, `AdapterCall`
naming an `AdapterOp`); the router dispatches on its type, never on a method string.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from caraserve_router.contracts.adapters import AdapterOp, check_adapter_name


@dataclass(frozen=True)
class Ping:
    """Is the router loop answering? (readiness; liveness is answered by the HTTP process)."""


@dataclass(frozen=True)
class GetStats:
    """The instance's `InstanceStats` (as its dict)."""


@dataclass(frozen=True)
class GetSamples:
    """The model worker's recent step timings (profiling); `clear` empties the window."""

    clear: bool = False


@dataclass(frozen=True)
class AdapterCall:
    """One `AdapterManager` operation: `name` for all but LIST / STATS, `path` for ADD."""

    op: AdapterOp
    name: str = ""
    path: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", AdapterOp(self.op))
        if self.op not in (AdapterOp.LIST, AdapterOp.STATS):
            check_adapter_name(self.name)
        if self.op is AdapterOp.ADD and not self.path:
            raise ValueError("adding an adapter needs a path")


ControlCall = Union[Ping, GetStats, GetSamples, AdapterCall]


@dataclass
class ControlRequest:
    call_id: int
    call: ControlCall


@dataclass
class ControlReply:
    call_id: int
    ok: bool
    value: Any = None
    error: str = ""
    status: int = 500  # HTTP status for errors


@dataclass
class RequestFailed:
    """The router could not take or finish a request (e.g. its adapter was unloaded meanwhile)."""

    group_req_id: int
    message: str
    status: int = 400
