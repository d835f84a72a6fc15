"""What a cold start costs under each LoRA mode, predicted from a PerfModel's profiled costs.

The rank-aware policies (`COLD_START_COST`) and the simulator's `auto` instances ask here; the
arithmetic is the instance's own rule (`contracts/auto_choice.py`), fed from the profile instead
of live measurements: the load from the profiled link (`predict_load_ms`), the sidecar's time
per token and rank, its workers, the model's layers and the per-layer sync cost
(`PerfModel.sidecar_ms_per_token_rank` etc.). A model without a profiled sidecar (an old JSON,
an assumed reference model) keeps its `cpu_assist_overhead` fraction of the prefill, the only
place that constant is still read.
"""
from __future__ import annotations

import math

from caraserve_router.contracts.auto_choice import AutoChoice, ColdLoadCosts, choose, estimate_extra_ms
from caraserve_router.contracts.names import LoraMode


def cold_costs(pm, tokens: int, rank: int, prefill_ms: float, workers_free: int | None = None,
               queued_ms: float = 0.0) -> ColdLoadCosts:
    side = pm.sidecar_ms_per_token_rank
    return ColdLoadCosts(
        load_ms=pm.predict_load_ms(rank), prompt_tokens=tokens, rank=rank, prefill_ms=prefill_ms,
        layers=pm.layers, sidecar_ms_per_token_rank=side if side is not None else math.inf,
        sidecar_workers_free=pm.sidecar_workers if workers_free is None else workers_free,
        layer_sync_ms=pm.layer_sync_ms, queued_ms=queued_ms)


def cold_extra_ms(pm, mode: LoraMode, tokens: int, rank: int, prefill_ms: float,
                  workers_free: int | None = None) -> float:
    """Extra ms of the prefill step when the adapter is cold, under `mode`."""
    if mode is LoraMode.CACHED:
        return 0.0
    if mode is LoraMode.CPU_ASSIST and pm.sidecar_ms_per_token_rank is None:
        return pm.cpu_assist_overhead * prefill_ms  # no profiled sidecar: the assumed fraction
    costs = cold_costs(pm, tokens, rank, prefill_ms, workers_free)
    if mode is LoraMode.AUTO:
        return min(estimate_extra_ms(costs).values())
    extra = estimate_extra_ms(costs)[mode]
    if math.isinf(extra):  # no sidecar worker free: cpu-assist falls back to waiting per layer
        extra = estimate_extra_ms(costs)[LoraMode.PIPELINE]
    return extra


def auto_choice(pm, tokens: int, rank: int, prefill_ms: float, workers_free: int | None = None,
                queued_ms: float = 0.0) -> AutoChoice:
    """What an `auto` instance with this PerfModel would choose (the simulator's auto), the link
    busy `queued_ms` more with earlier loads."""
    return choose(cold_costs(pm, tokens, rank, prefill_ms, workers_free, queued_ms))
