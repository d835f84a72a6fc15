"""auto's rule on synthetic costs: each regime picks the mode whose mechanism wins there.

The expected modes are derived by hand from the timelines in the rule's docstring, not from
its code: a 2 ms load against a 22 ms prefill (the H200's 7B rank-64 q,k,v case) is cheapest
waited for whole; a load half a prefill long hides under a pipelined prefill when per-layer
waits are free; a load 4x a prefill is hidden only by the sidecar, unless no worker is free.
"""
from __future__ import annotations

import math

import pytest

from caraserve_router.contracts.auto_choice import (AutoReason, ColdLoadCosts, choose, covered_layers, load_ms_of,
                                                    pipeline_late_ms)
from caraserve_router.contracts.names import LoraMode

H200_BYTES_PER_MS = 100.7e6 / 2.4  # docs/GPU.md: a 100.7 MB adapter in 2.4 ms of device time


def costs(**kw) -> ColdLoadCosts:
    base = dict(load_ms=10.0, prompt_tokens=256, rank=64, prefill_ms=20.0, layers=32,
                sidecar_ms_per_token_rank=1e-5, sidecar_workers_free=4, layer_sync_ms=0.0)
    return ColdLoadCosts(**{**base, **kw})


def test_fast_link_picks_on_demand_for_the_h200_7b_case():
    load = load_ms_of(32 * 3 * (4096 + 4096) * 64 * 2, H200_BYTES_PER_MS)
    assert 2.0 < load < 2.6
    c = choose(costs(load_ms=load, prompt_tokens=128, prefill_ms=22.0, layer_sync_ms=0.18))
    assert (c.mode, c.reason) == (LoraMode.ON_DEMAND, AutoReason.LOAD_CHEAPEST)
    # 32 layer waits of 0.18 ms cost more than the whole 2.4 ms load
    assert c.estimates_ms[LoraMode.PIPELINE] > c.estimates_ms[LoraMode.ON_DEMAND]


def test_load_shorter_than_prefill_is_hidden_by_the_pipeline():
    c = choose(costs(load_ms=10.0, prefill_ms=20.0, layer_sync_ms=0.0, sidecar_ms_per_token_rank=1e-3))
    assert (c.mode, c.reason) == (LoraMode.PIPELINE, AutoReason.PREFILL_HIDES_LOAD)
    # the forward waits only at layer 0, for its copy: L / N (later layers land before it gets there)
    assert c.estimates_ms[LoraMode.PIPELINE] == pytest.approx(10.0 / 32)
    # a load as long as the prefill: only the last layer's own compute after its copy, P / N
    even = choose(costs(load_ms=20.0, prefill_ms=20.0, sidecar_ms_per_token_rank=1e-3))
    assert even.estimates_ms[LoraMode.PIPELINE] == pytest.approx(20.0 / 32)


def test_slow_link_goes_to_the_sidecar_unless_no_worker_is_free():
    slow = costs(load_ms=80.0, prefill_ms=20.0, sidecar_ms_per_token_rank=1e-6)
    c = choose(slow)
    assert (c.mode, c.reason) == (LoraMode.CPU_ASSIST, AutoReason.SIDECAR_HIDES_LOAD)
    busy = choose(costs(load_ms=80.0, prefill_ms=20.0, sidecar_ms_per_token_rank=1e-6, sidecar_workers_free=0))
    assert busy.mode is LoraMode.PIPELINE and busy.reason is AutoReason.NO_FREE_WORKER
    assert math.isinf(busy.estimates_ms[LoraMode.CPU_ASSIST])


def test_a_slow_sidecar_loses_to_waiting():
    # 256 tokens x rank 64 x 1e-3 ms = 16 ms per layer against 0.6 ms of device time per layer
    c = choose(costs(load_ms=30.0, prefill_ms=20.0, sidecar_ms_per_token_rank=1e-3, sidecar_workers_free=1))
    assert c.mode is LoraMode.PIPELINE


def test_without_a_prefill_estimate_no_overlap_is_credited():
    long = choose(costs(load_ms=50.0, prefill_ms=None))
    assert long.reason is AutoReason.NO_PREFILL_ESTIMATE and long.mode is LoraMode.CPU_ASSIST
    short = choose(costs(load_ms=0.05, prefill_ms=None, layer_sync_ms=0.02))
    assert short.mode is LoraMode.ON_DEMAND


def test_covered_layers():
    assert covered_layers(40.0, 20.0, 32) == 32       # load longer than prefill: every layer
    assert covered_layers(10.0, 20.0, 32) == 1        # i < L / (P - L) = 1
    assert covered_layers(15.0, 20.0, 32) == 3        # i < 3
    assert covered_layers(0.0, 20.0, 32) == 0


def test_cold_loads_of_one_step_share_the_sidecar():
    # alone: 256 x 64 x 3e-5 = 0.49 ms per layer, under the 0.625 ms of device time: free
    alone = costs(load_ms=80.0, sidecar_ms_per_token_rank=3e-5, sidecar_workers_free=1)
    assert choose(alone).estimates_ms[LoraMode.CPU_ASSIST] == 0.0
    # behind another load's 4 x that work the layer takes 2.46 ms: 32 x 1.83 ms late
    shared = choose(costs(load_ms=80.0, sidecar_ms_per_token_rank=3e-5, sidecar_workers_free=1,
                          sidecar_queued_token_rank=4 * 256 * 64))
    assert shared.estimates_ms[LoraMode.CPU_ASSIST] == pytest.approx(32 * (5 * 256 * 64 * 3e-5 - 20.0 / 32))


def test_pipeline_waits_at_its_worst_layer():
    # timelines by hand, N = 4, layer i lands at Q + (i+1) L / 4, the forward reaches it at i P / 4
    assert pipeline_late_ms(8.0, 20.0, 4) == pytest.approx(2.0)         # layer 0: 2 vs 0
    assert pipeline_late_ms(40.0, 20.0, 4) == pytest.approx(25.0)       # layer 3: 40 vs 15
    assert pipeline_late_ms(8.0, 20.0, 4, queued_ms=30.0) == pytest.approx(32.0)  # layer 0: 32 vs 0
    assert pipeline_late_ms(0.0, 20.0, 4, queued_ms=30.0) == 0.0        # nothing left to load
    assert pipeline_late_ms(40.0, 20.0, 0) == pytest.approx(20.0)       # layers unknown: L - P


def test_a_load_behind_another_on_the_link_goes_to_the_sidecar():
    # alone, a 10 ms load under a 40 ms prefill costs pipeline one layer's copy; queued behind a
    # 300 ms load (two cold adapters in one step: the link serves one load at a time) pipeline
    # waits the whole 300 ms at layer 0, on-demand 310, while the sidecar covers every layer
    alone = choose(costs(load_ms=10.0, prefill_ms=40.0, sidecar_ms_per_token_rank=1e-6))
    assert alone.estimates_ms[LoraMode.PIPELINE] == pytest.approx(10.0 / 32)
    behind = choose(costs(load_ms=10.0, prefill_ms=40.0, sidecar_ms_per_token_rank=1e-6, queued_ms=300.0))
    assert behind.estimates_ms[LoraMode.PIPELINE] == pytest.approx(300.0 + 10.0 / 32)
    assert behind.estimates_ms[LoraMode.ON_DEMAND] == pytest.approx(310.0)
    assert (behind.mode, behind.reason) == (LoraMode.CPU_ASSIST, AutoReason.SIDECAR_HIDES_LOAD)
    assert covered_layers(10.0, 40.0, 32, queued_ms=300.0) == 32
    # Q N + L = 2 x 32 + 10 = 74 -> layers i < 74 / 30: 3
    assert covered_layers(10.0, 40.0, 32, queued_ms=2.0) == 3


def test_a_saving_under_one_percent_of_the_step_keeps_the_simpler_mechanism():
    # bench_modes at load factor 0.1: a 20 ms load under a 194 ms prefill, 30 layers, 20 us syncs.
    # pipeline waits L / N = 0.67 ms at layer 0; the sidecar would hide even that: 0.67 ms is
    # 0.3% of the step, under SIMPLER_WITHIN (1%), so pipeline
    quick = costs(load_ms=20.0, prefill_ms=194.0, layers=30, layer_sync_ms=0.02, prompt_tokens=71,
                  sidecar_ms_per_token_rank=1e-6, sidecar_workers_free=1)
    c = choose(quick)
    assert c.estimates_ms[LoraMode.CPU_ASSIST] < c.estimates_ms[LoraMode.PIPELINE]
    assert (c.mode, c.reason) == (LoraMode.PIPELINE, AutoReason.PREFILL_HIDES_LOAD)
    # load factor 1.5: 290 ms against the same prefill: pipeline ~100 ms late, cpu-assist 0.6
    slow = choose(costs(**{**quick.__dict__, "load_ms": 290.0}))
    assert (slow.mode, slow.reason) == (LoraMode.CPU_ASSIST, AutoReason.SIDECAR_HIDES_LOAD)
    # a load that would wait 5 ms at layer 0 (2.6% of the step): worth the sidecar
    mid = choose(costs(**{**quick.__dict__, "load_ms": 150.0}))
    assert mid.mode is LoraMode.CPU_ASSIST
