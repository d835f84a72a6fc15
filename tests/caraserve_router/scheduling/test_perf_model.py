"""PerfModel: fitting recovers known coefficients, R^2 is reported, JSON round trip, bad JSON refused."""
from __future__ import annotations

import json
import random

import pytest

from caraserve_router.scheduling.perf_model import (PerfModel, PerfModelError, adapter_bytes_per_rank, fit_prefill,
                                         load_cost_from_link)

RANKS = (8, 16, 32, 64)
BATCHES = (4, 8, 16, 32)


def synthetic_profile(seed=0, noise=0.02, rank_term=0.0005):
    """Profile from known coefficients plus multiplicative noise (+-noise, uniform)."""
    rng = random.Random(seed)

    def jitter(ms):
        return ms * (1 + rng.uniform(-noise, noise))

    prefill = [{"tokens": t, "rank": r, "ms": jitter(12.0 + 0.08 * t + rank_term * r * t)}
               for t in (16, 64, 128, 256, 512, 1024) for r in RANKS]
    decode = []
    for b in BATCHES:
        for r in RANKS:
            for mix in ([r] * b, [RANKS[k % 4] for k in range(b - 1)] + [r]):
                decode.append({"kernel": "bgmv", "ranks": mix,
                               "ms": jitter(20.0 + 0.25 * b + 0.0045 * b * max(mix))})
                decode.append({"kernel": "mbgmv", "ranks": mix,
                               "ms": jitter(19.0 + 0.3 * b + 0.004 * sum(mix))})
    load = [{"rank": r, "ms": jitter(1.0 + 0.5 * r)} for r in RANKS for _ in range(3)]
    return {"metadata": {"source": "profiled", "machine": "test", "date": "2025-01-01", "device": "synthetic",
                         "emulated": {"device": True, "link": True}},
            "prefill": prefill, "decode": decode, "load": load}


def test_fit_recovers_known_coefficients():
    pm = PerfModel.fit(synthetic_profile())
    p0, pt, prt = pm.prefill.coef
    assert p0 == pytest.approx(12.0, rel=0.1)
    assert pt == pytest.approx(0.08, rel=0.05)
    assert prt == pytest.approx(0.0005, rel=0.15)
    assert pm.decode["bgmv"].coef == pytest.approx((20.0, 0.25, 0.0045), rel=0.15)
    assert pm.decode["mbgmv"].coef == pytest.approx((19.0, 0.3, 0.004), rel=0.15)
    assert pm.load_fixed_ms == pytest.approx(1.0, abs=0.5)
    assert pm.load_ms_per_rank == pytest.approx(0.5, rel=0.05)
    for fit in (pm.prefill, pm.decode["bgmv"], pm.decode["mbgmv"]):
        assert 0.95 < fit.r2 <= 1.0
        assert fit.n > 0
    assert pm.load_r2 > 0.95


def test_rank_term_dropped_when_it_does_not_help():
    pm = PerfModel.fit(synthetic_profile(rank_term=0.0))
    assert pm.prefill.features == ("const", "tokens")
    # without the term, rank has no effect on the prediction
    assert pm.predict_prefill_ms(100, 64) == pm.predict_prefill_ms(100, 8)


def test_r2_lower_with_more_noise():
    clean = PerfModel.fit(synthetic_profile(noise=0.001))
    noisy = PerfModel.fit(synthetic_profile(noise=0.2))
    assert clean.decode["bgmv"].r2 > 0.999
    assert noisy.decode["bgmv"].r2 < clean.decode["bgmv"].r2


def test_predictions_are_the_linear_formulas():
    pm = PerfModel.from_coefficients(prefill=(10, 0.1, 0.001), bgmv=(20, 0.5, 0.01), mbgmv=(18, 0.4, 0.02),
                                     load_fixed_ms=2, load_ms_per_rank=0.5)
    assert pm.predict_prefill_ms(100, 16) == pytest.approx(10 + 10 + 1.6)
    assert pm.prefill_marginal_ms(100, 16) == pytest.approx(11.6)
    assert pm.prefill_batch_ms(300, 100 * 16 + 200 * 8) == pytest.approx(10 + 30 + 3.2)
    # bgmv: batch 3, max rank 64 -> 20 + 1.5 + 0.01 * 192
    assert pm.predict_decode_step_ms([8, 64, 16], "bgmv") == pytest.approx(23.42)
    # mbgmv: sum 88 -> 18 + 1.2 + 1.76
    assert pm.predict_decode_step_ms([8, 64, 16], "mbgmv") == pytest.approx(20.96)
    assert pm.predict_decode_step_ms([], "bgmv") == 0.0
    assert pm.predict_load_ms(64) == pytest.approx(34.0)
    assert pm.predict_load_ms(0) == 0.0
    with pytest.raises(PerfModelError, match="unknown decode kernel"):
        pm.predict_decode_step_ms([8], "sgmv")


def test_json_round_trip(tmp_path):
    pm = PerfModel.fit(synthetic_profile())
    path = tmp_path / "pm.json"
    pm.save(path)
    back = PerfModel.load(path)
    assert back.prefill == pm.prefill
    assert back.decode == pm.decode
    assert back.load_ms_per_rank == pm.load_ms_per_rank
    assert back.metadata["emulated"] == {"device": True, "link": True}
    assert len(back.grid["prefill"]) == len(pm.grid["prefill"]) == 24
    for ranks in ([8], [8, 64, 16], [32] * 32):
        for k in ("bgmv", "mbgmv"):
            assert back.predict_decode_step_ms(ranks, k) == pm.predict_decode_step_ms(ranks, k)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("decode"), "missing field 'decode'"),
    (lambda d: d.update(decode={}), "decode must hold fits for one or more of"),
    (lambda d: d["decode"].update(sgmv=d["decode"]["bgmv"]), "decode must hold fits for one or more of"),
    (lambda d: d["decode"]["bgmv"].update(coef=[1, 2]), "decode.bgmv: 'coef' must be 3"),
    (lambda d: d["decode"]["bgmv"].update(coef=[1, "x", 2]), "decode.bgmv: 'coef'"),
    (lambda d: d["prefill"].update(features=["const", "rank"], coef=[1, 2]), "prefill.features must be one of"),
    (lambda d: d.update(format="something"), "'format' must be"),
    (lambda d: d.update(version=99), "unsupported version 99"),
    (lambda d: d["load"].update(ms_per_rank=-1), "load_ms_per_rank must be a number >= 0"),
    (lambda d: d["load"].pop("fixed_ms"), "load: field 'fixed_ms'"),
])
def test_bad_json_refused_clearly(tmp_path, mutate, message):
    data = PerfModel.fit(synthetic_profile()).to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PerfModelError, match=message.replace("(", r"\(").replace("[", r"\[")):
        PerfModel.load(path)


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(PerfModelError, match="not valid JSON"):
        PerfModel.load(bad)
    with pytest.raises(PerfModelError, match="cannot read"):
        PerfModel.load(tmp_path / "absent.json")


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(prefill=[]), "'prefill' must be a non-empty list"),
    (lambda p: p["decode"][0].update(kernel="sgmv"), r"decode\[0\]: 'kernel'"),
    (lambda p: p["decode"][0].update(ranks=[]), r"decode\[0\]: 'ranks'"),
    (lambda p: p["prefill"][1].update(tokens=0), r"prefill\[1\]: 'tokens' must be an integer >= 1"),
    (lambda p: p["prefill"][1].update(ms="fast"), r"prefill\[1\]: 'ms'"),
])
def test_bad_profile_refused(mutate, message):
    profile = synthetic_profile()
    mutate(profile)
    with pytest.raises(PerfModelError, match=message):
        PerfModel.fit(profile)


def test_load_cost_from_link():
    # Llama2-7B, q/k/v/o LoRA, fp16: 32 layers x 4 x (4096 + 4096) x 2 bytes = 2 MiB per rank unit
    bpr = adapter_bytes_per_rank(32, [(4096, 4096)] * 4, 2)
    assert bpr == 2 * 1024 * 1024
    fixed, per_rank = load_cost_from_link(bandwidth_gbps=10.0, bytes_per_rank=bpr, latency_ms=0.5)
    assert fixed == 0.5
    assert per_rank == pytest.approx(bpr / 1e10 * 1e3)          # 0.2097 ms per rank unit
    profile = synthetic_profile()
    del profile["load"]
    profile["link"] = {"bandwidth_gbps": 10.0, "bytes_per_rank": bpr, "latency_ms": 0.5}
    pm = PerfModel.fit(profile)
    assert pm.predict_load_ms(64) == pytest.approx(0.5 + 64 * per_rank)
    with pytest.raises(PerfModelError, match="bandwidth_gbps must be > 0"):
        load_cost_from_link(0, bpr)


def test_fit_prefill_needs_enough_points():
    with pytest.raises(PerfModelError, match="need at least 3 points"):
        fit_prefill([{"tokens": 10, "rank": 8, "ms": 1.0}, {"tokens": 20, "rank": 8, "ms": 2.0}])


def test_shipped_reference_models_load():
    from pathlib import Path
    files = sorted((Path(__file__).resolve().parents[3] / "data" / "perf_models").glob("*.json"))
    assert files, "data/perf_models/ ships at least the paper reference model"
    for f in files:
        pm = PerfModel.load(f)
        assert pm.metadata.get("source")
        assert pm.predict_decode_step_ms([64] * 32, "bgmv") > pm.predict_decode_step_ms([8] * 32, "bgmv")


def test_profile_of_one_kernel(tmp_path):
    """An instance profiles the kernel it runs; the model then predicts that kernel only."""
    profile = synthetic_profile()
    profile["decode"] = [d for d in profile["decode"] if d["kernel"] == "mbgmv"]
    pm = PerfModel.fit(profile)
    assert set(pm.decode) == {"mbgmv"}
    assert pm.decode["mbgmv"].coef == pytest.approx((19.0, 0.3, 0.004), rel=0.15)
    with pytest.raises(PerfModelError, match="no decode fit for kernel 'bgmv'"):
        pm.predict_decode_step_ms([8], "bgmv")
    pm.save(tmp_path / "one.json")
    back = PerfModel.load(tmp_path / "one.json")
    assert back.predict_decode_step_ms([8, 16], "mbgmv") == pm.predict_decode_step_ms([8, 16], "mbgmv")
    assert "bgmv" not in back.describe().replace("mbgmv", "")


def test_decode_fit_adds_the_any_lora_term_only_when_it_matters():
    """A fixed cost per step with LoRA (per-step plans, kernel launches) is recovered as its
    own term; a profile without one keeps the paper's three features."""
    from caraserve_router.scheduling.perf_model import ANY_LORA, fit_decode

    def points(fixed):
        pts = []
        for batch in (1, 2, 4, 8, 16):
            for rank in (0, 8, 32, 64):
                ranks = [rank] * batch
                ms = 50 + 2.0 * batch + 0.01 * sum(ranks) + (fixed if rank else 0.0)
                pts.append({"kernel": "mbgmv", "ranks": ranks, "ms": ms})
        return pts

    with_fixed = fit_decode(points(30.0), "mbgmv")
    assert with_fixed.features[-1] == ANY_LORA
    assert abs(with_fixed.coef[-1] - 30.0) < 1e-6 and abs(with_fixed.coef[2] - 0.01) < 1e-9
    assert fit_decode(points(0.0), "mbgmv").features == ("const", "batch", "sum_ranks")


def test_decode_fit_recovers_both_indicator_terms_and_round_trips(tmp_path):
    """One-row steps cheaper by a fixed amount (a CPU's matrix-vector regime) and a fixed LoRA
    cost: both are recovered, predicted, saved and loaded."""
    from caraserve_router.scheduling.perf_model import ANY_LORA, MULTI_ROW, fit_decode

    pts = []
    for batch in (1, 2, 3, 4, 8, 16):
        for rank in (0, 8, 32, 64):
            ranks = [rank] * batch
            ms = 40 + 2.0 * batch + 0.01 * sum(ranks) + (25.0 if rank else 0.0) + (35.0 if batch > 1 else 0.0)
            pts.append({"kernel": "mbgmv", "ranks": ranks, "ms": ms})
    fit = fit_decode(pts, "mbgmv")
    assert fit.features == ("const", "batch", "sum_ranks", ANY_LORA, MULTI_ROW)
    for got, want in zip(fit.coef, (40.0, 2.0, 0.01, 25.0, 35.0)):
        assert abs(got - want) < 1e-6
    pm = PerfModel(prefill=PerfModel.from_coefficients((10, 1), (1, 1, 1), (1, 1, 1)).prefill, decode={"mbgmv": fit})
    assert abs(pm.predict_decode_step_ms([8], "mbgmv") - (40 + 2 + 0.08 + 25)) < 1e-6
    assert abs(pm.predict_decode_step_ms([0, 0], "mbgmv") - (40 + 4 + 35)) < 1e-6
    pm.save(tmp_path / "m.json")
    back = PerfModel.load(tmp_path / "m.json")
    assert back.predict_decode_step_ms([8, 64, 0], "mbgmv") == pm.predict_decode_step_ms([8, 64, 0], "mbgmv")


def test_slopes_are_never_negative():
    """Noise that would fit a negative rank slope (a policy would then prefer high ranks) gives
    a zero slope and the other coefficients refitted without it."""
    from caraserve_router.scheduling.perf_model import fit_decode

    pts = [{"kernel": "mbgmv", "ranks": [r] * b, "ms": 50 + 3.0 * b - 0.02 * r * b}
           for b in (1, 2, 4, 8) for r in (8, 16, 32, 64)]
    fit = fit_decode(pts, "mbgmv")
    assert fit.coef[2] == 0.0 and all(c >= 0 for c in fit.coef[1:])
    unconstrained = 50 + 3.0 * 8 - 0.02 * 64 * 8
    pm = PerfModel(prefill=PerfModel.from_coefficients((10, 1), (1, 1, 1), (1, 1, 1)).prefill, decode={"mbgmv": fit})
    assert pm.predict_decode_step_ms([64] * 8, "mbgmv") >= pm.predict_decode_step_ms([8] * 8, "mbgmv")
    assert pm.predict_decode_step_ms([64] * 8, "mbgmv") > unconstrained


def test_profile_without_adapters_fits_the_supported_terms():
    """The bare launch profiles with no adapter: every rank is 0, so rank terms cannot be
    fitted; they stay 0 and the batch / token terms are still fitted (three decode points, as
    a quick profile on a busy machine may give, suffice for const + batch)."""
    profile = {"prefill": [{"tokens": t, "rank": 0, "ms": 5.0 + 0.1 * t} for t in (16, 64, 128, 256)],
               "decode": [{"kernel": "mbgmv", "ranks": [0] * b, "ms": 20.0 + 2.0 * b} for b in (1, 2, 4)]}
    pm = PerfModel.fit(profile)
    assert pm.predict_decode_step_ms([0, 0, 0], "mbgmv") == pytest.approx(26.0)
    assert pm.decode["mbgmv"].coef[2] == 0.0
    assert pm.predict_prefill_ms(100) == pytest.approx(15.0)
