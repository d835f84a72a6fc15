"""The stats record an instance reports (`GET /stats`) and the front end's scheduler reads.

`InstanceStats.to_dict()` is the JSON wire format that
`caraserve_router.scheduling.scheduler_state.InstanceState.apply_stats` documents and reads;
`from_dict` checks a received dict against it (ValueError naming the bad field). Pure Python.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from caraserve_router.contracts.names import DecodeKernel, LoraMode

RequestId = Union[int, str]  # LightLLM's integer id inside an instance; the front end's id on the wire


def _typed(value: Any, kinds, where: str, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ValueError(f"{where} must be {kinds}, got a bool")
    if not isinstance(value, kinds):
        raise ValueError(f"{where} must be {kinds}, got {type(value).__name__} {value!r}")
    return value


def _count(value: Any, where: str) -> int:
    _typed(value, int, where)
    if value < 0:
        raise ValueError(f"{where} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class RequestView:
    """One running or queued request."""

    request_id: RequestId
    adapter: Optional[str]  # None: the base model
    rank: int               # 0 for the base model
    prompt_tokens: int
    max_new_tokens: int
    generated: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "request") -> "RequestView":
        _typed(d, dict, where)
        return cls(request_id=_typed(d.get("request_id"), (int, str), f"{where}.request_id"),
                   adapter=_typed(d.get("adapter"), str, f"{where}.adapter", optional=True),
                   **{k: _count(d.get(k), f"{where}.{k}")
                      for k in ("rank", "prompt_tokens", "max_new_tokens", "generated")})


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter held in the device pool."""

    name: str
    rank: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "resident adapter") -> "ResidentAdapter":
        _typed(d, dict, where)
        return cls(name=_typed(d.get("name"), str, f"{where}.name"), rank=_count(d.get("rank"), f"{where}.rank"))


@dataclass(frozen=True)
class InstanceStats:
    """One instance's state: settings, requests, residency, KV use; `lora` is the engine's detail."""

    name: str
    healthy: bool
    lora_mode: LoraMode
    kernel: DecodeKernel
    device: str
    max_batch: int
    resident_adapters: list = field(default_factory=list)  # [ResidentAdapter]
    running: list = field(default_factory=list)            # [RequestView]
    queued: list = field(default_factory=list)             # [RequestView]
    kv_tokens_used: int = 0
    kv_tokens_total: int = 0
    steps: int = 0
    uptime_s: float = 0.0
    lora: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["lora_mode"] = LoraMode(self.lora_mode).value
        out["kernel"] = DecodeKernel(self.kernel).value
        for key in ("resident_adapters", "running", "queued"):
            out[key] = [item.to_dict() for item in out[key]]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceStats":
        _typed(d, dict, "stats")
        try:
            mode, kernel = LoraMode(d.get("lora_mode")), DecodeKernel(d.get("kernel"))
        except ValueError as e:
            raise ValueError(f"stats: {e}") from None
        return cls(
            name=_typed(d.get("name"), str, "stats.name"),
            healthy=_typed(d.get("healthy"), bool, "stats.healthy"),
            lora_mode=mode, kernel=kernel,
            device=_typed(d.get("device", ""), str, "stats.device"),
            max_batch=_count(d.get("max_batch"), "stats.max_batch"),
            resident_adapters=[ResidentAdapter.from_dict(e, f"stats.resident_adapters[{i}]")
                               for i, e in enumerate(_typed(d.get("resident_adapters", []), list, "stats.resident_adapters"))],
            running=[RequestView.from_dict(e, f"stats.running[{i}]")
                     for i, e in enumerate(_typed(d.get("running", []), list, "stats.running"))],
            queued=[RequestView.from_dict(e, f"stats.queued[{i}]")
                    for i, e in enumerate(_typed(d.get("queued", []), list, "stats.queued"))],
            kv_tokens_used=_count(d.get("kv_tokens_used", 0), "stats.kv_tokens_used"),
            kv_tokens_total=_count(d.get("kv_tokens_total", 0), "stats.kv_tokens_total"),
            steps=_count(d.get("steps", 0), "stats.steps"),
            uptime_s=float(_typed(d.get("uptime_s", 0.0), (int, float), "stats.uptime_s")),
            lora=_typed(d.get("lora", {}), dict, "stats.lora"),
        )

    def with_request_ids(self, mapping) -> "InstanceStats":
        """A copy whose running/queued ids are mapped by `mapping(id) -> id` (LightLLM's -> the
        front end's, in the instance's HTTP process)."""
        def remap(reqs):
            return [RequestView(**{**r.to_dict(), "request_id": mapping(r.request_id)}) for r in reqs]

        return InstanceStats(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                                "running": remap(self.running), "queued": remap(self.queued)})
