"""scripts/bench/decode_kernels.py end to end on a tiny grid: JSON layout, speed-ups, fits, plot."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "decode_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                                     # dataclasses look it up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tiny_run_writes_json_and_plot(bench, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    bench.main(["--out", str(out), "--batches", "1,3", "--mixes", "mixed,r8", "--repeats", "2",
                "--profile-draws", "2"])
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert {r["batch"] for r in data["decode"]} == {1, 3} and {r["mix"] for r in data["decode"]} == {"mixed", "r8"}
    for row in data["decode"]:
        assert set(row["ms"]) == {"loop", "cpu_mbgmv", "cpu_mbgmv_noplan", "cpu_bgmv"}
        assert all(v > 0 for v in row["ms"].values()) and row["plan_ms"] > 0
        assert row["speedup_vs_loop"]["cpu_mbgmv"] == pytest.approx(row["ms"]["loop"] / row["ms"]["cpu_mbgmv"])
        if row["mix"] == "r8":
            assert row["sum_ranks"] == 8 * row["batch"] and row["max_rank"] == 8
    points = data["profile"]["points"]
    assert len(points) == 2 * 2 * 2                                    # batches x draws x kernels
    for kernel, feature in (("bgmv", "batch_x_max_rank"), ("mbgmv", "sum_ranks")):
        fit = data["profile"]["fits"][kernel]
        assert fit["feature"] == feature and math.isfinite(fit["slope_ms"]) and fit["r2"] <= 1.0
    assert "cpu_mbgmv" in capsys.readouterr().out                       # the summary table


def test_least_squares_recovers_a_line(bench):
    xs = [1.0, 2.0, 5.0, 9.0]
    (intercept, slope), r2 = bench.least_squares([[1.0] * 4, xs], [3.0 + 0.5 * x for x in xs])
    assert intercept == pytest.approx(3.0) and slope == pytest.approx(0.5) and r2 == pytest.approx(1.0)
    _, r2_noisy = bench.least_squares([[1.0] * 4, xs], [3.0, 9.0, 1.0, 4.0])
    assert r2_noisy < 0.5


def test_fit_features(bench):
    points = [{"kernel": "bgmv", "batch": b, "ranks": [8] * (b - 1) + [r], "ms": 0.1 + 0.01 * b * r}
              for b, r in ((1, 8), (2, 16), (4, 64), (8, 32), (3, 8))]
    fit = bench.fits(points, "bgmv")
    assert fit["slope_ms"] == pytest.approx(0.01) and fit["intercept_ms"] == pytest.approx(0.1)
