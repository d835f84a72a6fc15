"""The truth table reader interpolates its own measured points (independent hand arithmetic), draws
the measured spread, refuses bad tables, and cpu-assisted prefills of one host queue for its
sidecar workers."""
from __future__ import annotations

import json
import random

import pytest

from caraserve_router.contracts.names import LoraMode
from caraserve_router.evaluation.sim_truth import TruthSteps
from caraserve_router.evaluation.truth_table import SidecarHost, TruthTable, TruthTableError


def table(**kw) -> TruthTable:
    base = dict(
        name="t", device="cpu:test", layers=10,
        prefill=[{"tokens": 100, "rank": 0, "ms": [9.0, 11.0]}, {"tokens": 200, "rank": 0, "ms": [20.0]},
                 {"tokens": 100, "rank": 64, "ms": [20.0]}, {"tokens": 200, "rank": 64, "ms": [40.0]}],
        decode=[{"kernel": "mbgmv", "batch": 1, "feature": 0, "ms": [10.0]},
                {"kernel": "mbgmv", "batch": 1, "feature": 64, "ms": [14.0]},
                {"kernel": "mbgmv", "batch": 4, "feature": 0, "ms": [16.0]},
                {"kernel": "mbgmv", "batch": 4, "feature": 256, "ms": [26.0]}],
        load={"fixed_ms": 1.0, "bytes_per_rank": 1000.0, "bytes_per_ms": 100.0, "layer_sync_ms": 0.0},
        sidecar={"ms_per_token_rank": 0.001, "workers": 2})
    base.update(kw)
    return TruthTable(**base)


def test_interpolation_between_measured_points():
    t = table()
    assert t.prefill_ms(150) == pytest.approx(15.0)            # mean(9, 11) = 10 at 100, 20 at 200
    assert t.prefill_ms(300) == pytest.approx(30.0)            # linear past the end
    assert t.prefill_ms(150, 32) == pytest.approx((15.0 + 30.0) / 2)  # halfway in rank
    assert t.decode_ms(1, 32, 32, "mbgmv") == pytest.approx(12.0)
    # batch 2.5 of 4 / 1: between 10 + 4/64 x and 16 + 10/256 x at sum_ranks 64: (14 + 18.5) / 2
    assert t.decode_ms(2, 64, 32, "mbgmv") == pytest.approx(14.0 + (18.5 - 14.0) / 3)
    assert t.load_ms(10) == pytest.approx(1.0 + 10 * 1000 / 100)
    assert t.sidecar_ms(100, 8, 5) == pytest.approx(100 * 8 * 5 * 0.001)
    with pytest.raises(TruthTableError, match="bgmv"):
        t.decode_ms(1, 8, 8, "bgmv")


def test_noise_is_the_measured_spread(tmp_path):
    t = table()
    rng = random.Random(1)
    draws = {round(t.prefill_ms(100, 0, rng), 6) for _ in range(200)}
    assert draws == {9.0, 11.0}  # the two repeats' ratios to their mean, x the mean 10
    assert t.decode_ms(1, 0, 0, "mbgmv", rng) == 10.0  # single samples: no spread measured, none drawn
    t.save(tmp_path / "t.json")
    back = TruthTable.load_file(tmp_path / "t.json")
    assert back.prefill_ms(150) == t.prefill_ms(150) and back.sidecar == t.sidecar


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="x"), "format"),
    (lambda d: d["prefill"][0].update(ms=[]), "prefill\\[0\\].ms"),
    (lambda d: d["load"].update(bytes_per_ms=0), "bytes_per_ms"),
    (lambda d: d.pop("layers"), "layers"),
])
def test_bad_tables_are_refused(mutate, message):
    data = table().to_json()
    mutate(data)
    with pytest.raises(TruthTableError, match=message):
        TruthTable.from_json(json.loads(json.dumps(data)))


def test_concurrent_cpu_assisted_prefills_queue_for_the_hosts_workers():
    host = SidecarHost(workers=2)
    assert host.run(0.0, 100.0) == pytest.approx(0.05)     # 100 ms of work on 2 workers
    assert host.run(0.01, 100.0) == pytest.approx(0.10)    # behind the first
    assert host.queued_s == pytest.approx(0.04)
    assert host.run(1.0, 10.0) == pytest.approx(1.005)     # idle again: no wait


class Inst:
    def __init__(self, index):
        self.index, self.link_free, self.assist_until = index, 0.0, 0.0


def test_cpu_assist_step_waits_for_a_sidecar_shared_by_the_host():
    # load of rank 64: 1 + 640 ms >> prefill 40 ms: every layer covered; sidecar work for one
    # cold prompt of 200 tokens x rank 64 x 10 layers x 0.001 = 128 ms, on 2 workers: 64 ms
    steps = TruthSteps(table(), LoraMode.CPU_ASSIST, num_instances=2, instances_per_host=2)
    a, b = Inst(0), Inst(1)
    first = steps.prefill_ms(a, 0.0, [(200, 64)], [(200, 64)], pm=None)
    assert first == pytest.approx(64.0)
    second = steps.prefill_ms(b, 0.0, [(200, 64)], [(200, 64)], pm=None)   # same host: queued behind
    assert second == pytest.approx(128.0)
    alone = TruthSteps(table(), LoraMode.CPU_ASSIST, num_instances=2, instances_per_host=1)
    assert alone.prefill_ms(Inst(1), 0.0, [(200, 64)], [(200, 64)], pm=None) == pytest.approx(64.0)
    # on-demand waits for the load: 641 ms + prefill 40
    still = table(prefill=[dict(r, ms=[sum(r["ms"]) / len(r["ms"])]) for r in table().prefill])  # no spread
    od = TruthSteps(still, LoraMode.ON_DEMAND, num_instances=1, instances_per_host=1)
    assert od.prefill_ms(Inst(0), 0.0, [(200, 64)], [(200, 64)], pm=None) == pytest.approx(641.0 + 40.0)
