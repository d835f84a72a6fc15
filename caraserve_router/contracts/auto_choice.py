"""`--lora-mode auto`'s rule: per cold load, which of on-demand, pipeline and cpu-assist costs least.

Pure arithmetic over measured inputs (no torch), shared by the instance (`auto_mode.py`), the
PerfModel-based policies and the simulator, so that all three decide alike.

Every estimate is the time a step with the cold adapter takes *beyond* the same step with the
adapter resident (the running batch pays it too, whichever mode, so the ranking is the same for
the request and for its neighbours):

- the link is one queue served a load at a time (`DeviceLink`: every layer group of the load first
  in line, then the next), so a load starts after `Q` ms of the loads ahead of it
  (`queued_ms`); two cold adapters in one step is the common case under a bursty trace, and
  leaving `Q` out had pipeline wait ~300 ms at layer 0 for the other adapter's whole load, where
  it predicted 45 (bench_modes at F = 1.5, issue 25);
- on-demand: `Q` and the whole load, `L = bytes / link rate + copies x copy latency`
  (`load_ms_of`), before the forward;
- pipeline: layer i is resident at Q + (i+1) L / N and the forward reaches it at i P / N, so the
  forward ends Q + L / N + max(0, (N - 1)(L - P) / N) late (the worst layer: the first when
  L <= P, the last otherwise), plus a check or wait at every layer (`layer_sync_ms`: an event
  wait on CUDA; on the H200 the 7B pipeline paid ~4 ms over on-demand for a 2 ms load);
- cpu-assist: the layers not yet resident when the forward reaches them (all when L >= P, else
  those with i < (Q N + L) / (P - L)) have their LoRA term computed by the free sidecar workers while the
  device runs the base projections; each such layer costs max(0, sidecar layer time - P / N),
  and every layer a check or hand-off (`layer_sync_ms`). The sidecar's layer time is `(tokens x
  rank + what the step already gives it) x sidecar_ms_per_token_rank / workers`: the cold loads
  of one step share the workers; with no worker up, cpu-assist is not an option (its fallback
  waits like pipeline).

Near-ties go to the simpler mechanism (on-demand, then pipeline, then cpu-assist): a more
involved one must save more than `SIMPLER_WITHIN` of the predicted step. The estimates leave out
what each mechanism costs beyond its waits (cpu-assist arms the sidecar's workers, which spin on
the host's cores for the whole step, and hands every covered layer over through shared memory),
so a saving of a few tenths of a percent is not one: at load factor 0.1 (bench_modes, a rank-64
load a tenth of a prefill) the rule preferred cpu-assist for 0.7 ms of a 200 ms step, and
pipeline measured 2.5% better in E2E. Without a prefill
estimate (an instance's first steps) P is taken as 0: no overlap is credited, so a long load goes
to the sidecar and a short one is waited for.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from caraserve_router.contracts.names import LoraMode

CHOICES = (LoraMode.ON_DEMAND, LoraMode.PIPELINE, LoraMode.CPU_ASSIST)  # the tie order
SIMPLER_WITHIN = 0.01  # of the predicted step: a smaller saving does not buy the next mechanism


class AutoReason(str, enum.Enum):
    """Why auto chose what it chose (a label of `/metrics` and the log)."""

    LOAD_CHEAPEST = "load-shorter-than-overlap"   # on-demand: the full load costs less than any overlap
    PREFILL_HIDES_LOAD = "prefill-hides-load"     # pipeline: the forward outlasts the layer-wise load
    SIDECAR_HIDES_LOAD = "sidecar-hides-load"     # cpu-assist: the sidecar covers layers not yet loaded
    NO_FREE_WORKER = "no-sidecar-worker"          # cpu-assist would win but no sidecar worker is up
    NO_PREFILL_ESTIMATE = "no-prefill-estimate"   # nothing measured yet: the rule with no overlap credit (P = 0)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ColdLoadCosts:
    """What auto knows about one cold load when its first step is built."""

    load_ms: float                     # the rest of the load (`load_ms_of`)
    prompt_tokens: int                 # tokens of the step's rows that use the adapter
    rank: float                        # the adapter's rank (the instance: its all-projection equivalent)
    prefill_ms: float | None           # predicted step time (None: no estimate yet)
    layers: int
    queued_ms: float = 0.0             # link time of the loads ahead of this one in the link's queue
    sidecar_ms_per_token_rank: float = math.inf  # one worker, one layer (inf: no sidecar)
    sidecar_workers_free: int = 0      # workers up (0: no sidecar, or none healthy)
    sidecar_queued_token_rank: float = 0  # tokens x rank the step already gives the sidecar (other loads)
    layer_sync_ms: float = 0.0         # per layer waited on (pipeline) or handed to the sidecar



def load_ms_of(load_bytes: float, link_bytes_per_ms: float, copies: int = 1, latency_ms: float = 0.0) -> float:
    """A load's time over a link measured at `link_bytes_per_ms`, `copies` copies of `latency_ms`."""
    return load_bytes / link_bytes_per_ms + copies * latency_ms


@dataclass(frozen=True)
class AutoChoice:
    mode: LoraMode
    reason: AutoReason
    estimates_ms: dict  # LoraMode -> extra ms of the step (inf: not possible)

    def describe(self) -> str:
        est = ", ".join(f"{m.value} {v:.1f}" for m, v in self.estimates_ms.items() if math.isfinite(v))
        return f"{self.mode.value} ({self.reason.value}; extra ms: {est})"


def covered_layers(load_ms: float, prefill_ms: float, layers: int, queued_ms: float = 0.0) -> int:
    """Layers not yet resident when the forward reaches them: the layer-wise load starts `queued_ms`
    after the forward (the loads ahead of it on the link) and lands layer i at Q + (i+1) L / N."""
    if load_ms <= 0:
        return 0
    if load_ms >= prefill_ms:
        return layers
    return min(layers, math.ceil((queued_ms * layers + load_ms) / (prefill_ms - load_ms)))


def pipeline_late_ms(load_ms: float, prefill_ms: float, layers: int, queued_ms: float = 0.0) -> float:
    """How late a pipelined forward ends: the worst layer's wait, max over i of
    Q + (i+1) L / N - i P / N (the first layer when L <= P, the last otherwise)."""
    if load_ms <= 0:
        return 0.0
    frac = 1.0 / layers if layers > 0 else 0.0  # 0 layers (unknown): continuous, max(0, L - P) late
    return max(0.0, queued_ms) + load_ms * frac + max(0.0, (load_ms - prefill_ms) * (1 - frac))


def estimate_extra_ms(c: ColdLoadCosts) -> dict:
    """Extra ms of the step per mode (see the module docstring); cpu-assist inf without a worker."""
    load, prefill, n = c.load_ms, float(c.prefill_ms or 0.0), max(1, c.layers)
    queued = max(0.0, c.queued_ms) if load > 0 else 0.0
    per_layer = prefill / c.layers if c.layers > 0 else 0.0  # 0 layers: unknown, a continuous overlap
    covered = covered_layers(load, prefill, n, queued)
    sync = n * c.layer_sync_ms if load > 0 else 0.0
    pipeline = pipeline_late_ms(load, prefill, c.layers, queued) + sync
    if c.sidecar_workers_free > 0 and math.isfinite(c.sidecar_ms_per_token_rank):
        work = c.sidecar_queued_token_rank + c.prompt_tokens * c.rank
        side_layer = work * c.sidecar_ms_per_token_rank / c.sidecar_workers_free
        cpu = covered * max(0.0, side_layer - per_layer) + sync
    else:
        cpu = math.inf
    return {LoraMode.ON_DEMAND: queued + load, LoraMode.PIPELINE: pipeline, LoraMode.CPU_ASSIST: cpu}


def choose(c: ColdLoadCosts) -> AutoChoice:
    """The cheapest mode for this load and why."""
    est = estimate_extra_ms(c)
    best = min(CHOICES, key=lambda m: (est[m], CHOICES.index(m)))
    margin = SIMPLER_WITHIN * (c.prefill_ms or 0.0)
    best = next(m for m in CHOICES if est[m] <= est[best] + margin)  # the simplest near the best
    if c.prefill_ms is None:  # no overlap credited: pipeline never wins, the sidecar only if it beats the load
        return AutoChoice(best, AutoReason.NO_PREFILL_ESTIMATE, est)
    if best is LoraMode.ON_DEMAND:
        return AutoChoice(best, AutoReason.LOAD_CHEAPEST, est)
    if best is LoraMode.CPU_ASSIST:
        return AutoChoice(best, AutoReason.SIDECAR_HIDES_LOAD, est)
    if c.sidecar_workers_free <= 0 and math.isfinite(c.sidecar_ms_per_token_rank):
        # would the sidecar have won with one worker free?
        one = estimate_extra_ms(ColdLoadCosts(**{**c.__dict__, "sidecar_workers_free": 1}))
        if one[LoraMode.CPU_ASSIST] < est[LoraMode.PIPELINE]:
            return AutoChoice(best, AutoReason.NO_FREE_WORKER, est)
    return AutoChoice(best, AutoReason.PREFILL_HIDES_LOAD, est)
