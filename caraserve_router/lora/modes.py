"""The four LoRA modes: what happens when a batch uses an adapter not (fully) on the device.

All modes give the same tokens; only the timing differs.

| mode | admission | a layer not yet resident |
|---|---|---|
| `cached` | every adapter is preloaded and pinned at registration (the ideal) | never happens |
| `on-demand` | load starts | the whole step waits for the full load before the forward (S-LoRA): the running batch stalls |
| `pipeline` | load starts, layer group by group | the forward waits for that layer only (vLLM / SGLang overlap loading) |
| `cpu-assist` | load starts, layer group by group | the CPU sidecar computes that layer's LoRA term for the rows of that adapter; the device kernel runs for the rest (CaraServe). If the sidecar fails or is late, it falls back to waiting, like `pipeline` |
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("caraserve.lora")


class Mode:
    name = ""
    preload = False  # load and pin every adapter at registration
    uses_sidecar = False

    def __init__(self, runtime):
        self.runtime = runtime

    def before_forward(self, batch) -> None:
        """Called once per step after the batch's descriptors are built."""

    def after_forward(self, batch) -> None:
        """Called once per step after the forward."""

    def begin(self, batch, layer: int, group: str, x: torch.Tensor, pending: list) -> None:
        """Called before the base projection when `pending` adapters are not resident at `layer`."""

    def resolve(self, batch, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, pending: list):
        """Handle rows of adapters not resident at `layer`; returns the rows the device kernel
        must skip (their delta already added), or an empty list after waiting for them."""
        self._wait(batch, layer, pending)
        return []

    def _wait(self, batch, layer: int, pending: list) -> None:
        start = time.monotonic()
        for entry in pending:
            entry.residency.wait(layer)
        self.runtime.counters["layer_wait_s"] += time.monotonic() - start
        batch.forget_pending(layer)


class CachedMode(Mode):
    name = "cached"
    preload = True


class OnDemandMode(Mode):
    name = "on-demand"

    def before_forward(self, batch) -> None:
        start = time.monotonic()
        for entry in batch.loading_entries():
            entry.residency.wait_all()
        waited = time.monotonic() - start
        if waited > 0:
            self.runtime.counters["full_wait_s"] += waited
        batch.forget_all_pending()


class PipelineMode(Mode):
    name = "pipeline"


class CpuAssistMode(Mode):
    name = "cpu-assist"
    uses_sidecar = True

    def before_forward(self, batch) -> None:
        if batch.loading_entries():
            self.runtime.sidecar.arm()
            batch.armed = True
            self.runtime.counters["cpu_assisted_steps"] += 1

    def after_forward(self, batch) -> None:
        if getattr(batch, "armed", False):
            self.runtime.sidecar.disarm()

    def begin(self, batch, layer, group, x, pending):
        segments = batch.row_segments([e.name for e in pending])
        batch.tickets[(layer, group)] = self.runtime.sidecar.submit(layer, group, x, segments)

    def resolve(self, batch, layer, group, x, out, pending):
        start = time.monotonic()
        ticket = batch.tickets.pop((layer, group), None)
        if ticket is not None:
            ok = self.runtime.sidecar.collect(ticket, out)
        else:
            ok = self.runtime.sidecar.compute(layer, group, x, batch.row_segments([e.name for e in pending]), out)
        self.runtime.counters["sidecar_s"] += time.monotonic() - start
        if ok:
            self.runtime.counters["sidecar_calls"] += 1
            return [e.name for e in pending]
        self.runtime.counters["sidecar_fallbacks"] += 1
        log.warning("sidecar missed layer %d %s; waiting for the device copy instead", layer, group)
        self._wait(batch, layer, pending)
        return []


MODES = {m.name: m for m in (CachedMode, OnDemandMode, PipelineMode, CpuAssistMode)}
