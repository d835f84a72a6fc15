"""Which implementation runs an op: a table by backend name, the default backend by device.

Backends are imported lazily so that importing `kernels` never imports Triton (tests must be
able to set TRITON_INTERPRET before Triton is first imported, and the CPU engine does not need it).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

BACKEND_MODULES: dict[str, str] = {
    "triton": "kernels.triton_ops",
    "cpu": "kernels.cpu",
    "reference": "kernels.reference",
}
DEVICE_BACKEND: dict[str, str] = {
    "cuda": "triton",
    "cpu": "cpu",
}

_resolved: dict[tuple[str, str], Callable] = {}


def lookup(op: str, backend: str | None, device: torch.device) -> Callable:
    """The function implementing `op` for `backend` (default: the device's backend)."""
    name = backend or DEVICE_BACKEND.get(device.type)
    fn = _resolved.get((op, name))
    if fn is None:
        fn = _resolved[(op, name)] = _load(op, name, device)
    return fn


def _load(op: str, name: str | None, device: torch.device) -> Callable:
    if name is None:
        raise ValueError(f"{op}: no kernel backend for device type {device.type!r} "
                         f"(known: {sorted(DEVICE_BACKEND)}); pass backend= explicitly")
    if name not in BACKEND_MODULES:
        raise ValueError(f"{op}: unknown backend {name!r}, expected one of {sorted(BACKEND_MODULES)}")
    return getattr(importlib.import_module(BACKEND_MODULES[name]), op)
