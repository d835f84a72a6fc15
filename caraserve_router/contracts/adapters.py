"""Adapters as typed objects across process boundaries (pure Python, no torch).

- `AdapterRequest`: the adapter one request uses, the shape of vLLM's `LoRARequest`. Built and
  checked once, where a request enters an instance (its HTTP server), then carried as is
  through LightLLM's sampling params and the router to the model worker.
- `AdapterOp` / `AdapterManager`: the adapter control interface of an instance's model worker,
  the shape of vLLM's `WorkerLoRAManager` (add / remove / pin / unpin / list / stats).
  `caraserve_router.lora.runtime.LoraRuntime` implements it; control messages
  (`contracts/control.py`) name an `AdapterOp`, never a method string.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

# Adapter names: what a client puts in `model` / `adapter`; also part of metric labels.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}$")
# A name the resolver (`--lora-adapter-dir`) may look up: one directory name, nothing that walks.
RESOLVABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def resolvable(name: str) -> bool:
    """A plain directory name: no '/', no '..', not absolute."""
    return bool(RESOLVABLE_NAME.match(name)) and ".." not in name


def check_adapter_name(name) -> str:
    """`name` if it is a valid adapter name, else ValueError (the caller answers 400)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"invalid adapter name {name!r} (letters, digits, . _ : - /; at most 128)")
    return name


@dataclass(frozen=True)
class AdapterRequest:
    """The adapter a request runs with (vLLM `LoRARequest`: lora_name, lora_int_id, lora_path).

    `name` is the registered name the client asked for; `id` the instance-local integer id of
    that registration (0 when not known); `path` and `rank` are filled from the registration
    where the creator knows it (informational: the worker looks adapters up by name).
    """

    name: str
    id: int = 0
    path: str = ""
    rank: Optional[int] = None

    def __post_init__(self) -> None:
        check_adapter_name(self.name)
        if not isinstance(self.id, int) or self.id < 0:
            raise ValueError(f"adapter id must be an integer >= 0, got {self.id!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"adapter rank must be an integer >= 1, got {self.rank!r}")

    @classmethod
    def from_info(cls, name: str, info: dict) -> "AdapterRequest":
        """From a registration's info (`AdapterManager.list()[name]`)."""
        return cls(name=name, id=int(info.get("lora_int_id", 0)), rank=info.get("rank"))


class AdapterOp(str, enum.Enum):
    """The adapter control operations an instance serves (values travel in control messages)."""

    ADD = "add"        # register a PEFT directory under a name
    REMOVE = "remove"  # forget a name (409 while requests use it)
    PIN = "pin"        # keep it on the device (load it now)
    UNPIN = "unpin"    # evictable again
    LIST = "list"      # name -> info
    STATS = "stats"    # the engine's LoRA statistics
    RESOLVE = "resolve"  # name -> info, registering DIR/<name> first with --lora-adapter-dir (the resolver)

    def __str__(self) -> str:
        return self.value


@runtime_checkable
class AdapterManager(Protocol):
    """What the router of an instance may ask its model worker about adapters.

    Errors are `AdapterError`s (a `ValueError` with an HTTP `status`): 400 bad adapter, 404
    unknown name, 409 in use / already registered, 507 no room in the pool.
    """

    def add(self, name: str, path: str) -> dict:
        """Validate and register the PEFT adapter at `path` (absolute) as `name`; returns its info
        (`rank`, `target_modules`, `path`, `lora_int_id`). The same directory under several names is held once."""

    def remove(self, name: str) -> bool:
        """Forget `name`; True when removed."""

    def pin(self, name: str) -> bool:
        """Load `name` onto the device now and keep it there."""

    def unpin(self, name: str) -> bool:
        """Make `name` evictable again."""

    def list(self) -> dict:
        """Registered names -> info."""

    def stats(self) -> dict:
        """Pool, loads, residency and sidecar statistics."""
