"""Workload generation: deterministic, right rates / CV / skew, explicit clipping, real trace files."""
from __future__ import annotations

import numpy as np
import pytest

from caraserve_router.evaluation.workload import (DEFAULT_LENGTHS, DEFAULT_TRACE, WorkloadConfig, WorkloadError, generate,
                                       load_azure_trace, parse_timestamp)

HAVE_TRACES = DEFAULT_TRACE.exists() and DEFAULT_LENGTHS.exists()
needs_traces = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not present")


def small_trace(tmp_path, rows):
    """An Azure-format CSV; like the real one, without a trailing newline."""
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows))
    return path


def test_timestamp_with_seven_fractional_digits():
    a = parse_timestamp("2023-11-16 18:15:46.6805900")
    b = parse_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-6)
    assert parse_timestamp("2023-11-16 18:15:47") - a == pytest.approx(0.31941, abs=1e-6)
    with pytest.raises(WorkloadError, match="bad TIMESTAMP"):
        parse_timestamp("yesterday")


def test_trace_file_without_trailing_newline(tmp_path):
    path = small_trace(tmp_path, ["2023-11-16 18:00:00.0000000,100,10",
                                  "2023-11-16 18:00:00.5000000,200,20",
                                  "2023-11-16 18:00:02.0000000,300,30"])
    t, ctx, gen = load_azure_trace(path)
    assert t.tolist() == pytest.approx([0.0, 0.5, 2.0])
    assert ctx.tolist() == [100, 200, 300] and gen.tolist() == [10, 20, 30]
    # native rate: 2 gaps over 2 s = 1 req/s; rescaled to 4 req/s -> times / 4
    cfg = WorkloadConfig(arrival="trace", rate=4.0, duration_s=1.0, lengths="trace", trace_path=str(path))
    w = generate(cfg)
    # period = (2 + 1 mean gap) / 4 = 0.75 s: [0, .125, .5] then [.75, .875]; lengths follow the rows
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 0.125, 0.5, 0.75, 0.875])
    assert [r.prompt_tokens for r in w.requests] == [100, 200, 300, 100, 200]
    assert [r.output_tokens for r in w.requests] == [10, 20, 30, 10, 20]
    assert any("replayed 2 times" in n for n in w.notes)


def test_bad_files_are_refused_clearly(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIME,ContextTokens,GeneratedTokens\n1,2,3")
    with pytest.raises(WorkloadError, match=r"lacks column\(s\) \['TIMESTAMP'\]"):
        load_azure_trace(bad)
    with pytest.raises(WorkloadError, match="not found"):
        generate(WorkloadConfig(lengths="sharegpt", lengths_path=str(tmp_path / "none.csv"), duration_s=1))


def test_config_validation():
    with pytest.raises(WorkloadError, match="needs a rate"):
        WorkloadConfig(arrival="poisson", rate=None)
    with pytest.raises(WorkloadError, match="arrival must be one of"):
        WorkloadConfig(arrival="bursty")
    with pytest.raises(WorkloadError, match="give duration_s or num_requests"):
        WorkloadConfig(duration_s=None, num_requests=None)
    with pytest.raises(WorkloadError, match="max_output_tokens must be an integer >= 4"):
        WorkloadConfig(min_output_tokens=4, max_output_tokens=2)
    with pytest.raises(WorkloadError, match="ranks must be"):
        WorkloadConfig(ranks=())


def fixed(**kw):
    base = dict(arrival="poisson", rate=50.0, duration_s=200.0, lengths="fixed", seed=1)
    base.update(kw)
    return WorkloadConfig(**base)


def test_same_seed_same_workload_other_seed_differs():
    assert generate(fixed()).requests == generate(fixed()).requests
    assert generate(fixed()).requests != generate(fixed(seed=2)).requests


def test_poisson_rate_and_cv():
    w = generate(fixed())
    s = w.summary()
    # 50 req/s x 200 s = 10000 expected, sd 100
    assert 9700 <= s["requests"] <= 10300
    assert s["gap_cv"] == pytest.approx(1.0, abs=0.05)
    assert all(r.arrival_s < 200 for r in w.requests)


def test_gamma_cv():
    s = generate(fixed(arrival="gamma", cv=3.0, rate=100.0, duration_s=300.0)).summary()
    assert s["rate"] == pytest.approx(100.0, rel=0.1)
    assert s["gap_cv"] == pytest.approx(3.0, rel=0.15)
    s = generate(fixed(arrival="gamma", cv=0.25)).summary()
    assert s["gap_cv"] == pytest.approx(0.25, rel=0.1)


def test_num_requests_caps():
    w = generate(fixed(num_requests=17, duration_s=None))
    assert len(w) == 17 and [r.index for r in w.requests] == list(range(17))


def test_power_law_popularity_and_round_robin_ranks():
    k = 100
    w = generate(fixed(num_adapters=k, alpha=0.3))
    idx = np.array([r.adapter_index for r in w.requests])
    assert idx.min() >= 0 and idx.max() < k
    # P(index < 10) = P(U^(1/alpha) < 0.1) = 0.1 ** 0.3 = 0.501
    assert (idx < 10).mean() == pytest.approx(0.1 ** 0.3, abs=0.02)
    uniform_like = np.array([r.adapter_index for r in generate(fixed(num_adapters=k, alpha=1.0)).requests])
    assert (uniform_like < 10).mean() == pytest.approx(0.1, abs=0.015)
    assert all(r.rank == (8, 16, 32, 64)[r.adapter_index % 4] for r in w.requests)
    assert all(r.adapter == f"lora-{r.adapter_index}" for r in w.requests)


def test_zipf_popularity():
    w = generate(fixed(num_adapters=100, popularity="zipf", zipf_s=1.0))
    idx = np.array([r.adapter_index for r in w.requests])
    harmonic = sum(1 / k for k in range(1, 101))                 # 5.187
    assert (idx == 0).mean() == pytest.approx(1 / harmonic, abs=0.015)
    assert (idx == 1).mean() == pytest.approx(0.5 / harmonic, abs=0.012)


@needs_traces
def test_sharegpt_lengths_scaled_and_clipped_explicitly():
    raw = generate(fixed(lengths="sharegpt", duration_s=40.0))
    cut = generate(fixed(lengths="sharegpt", duration_s=40.0, max_prompt_tokens=256, max_output_tokens=64,
                         prompt_scale=0.5))
    assert len(raw) == len(cut)
    n_cut = sum(r.output_tokens > 64 for r in raw.requests)
    assert n_cut > 0
    for a, b in zip(raw.requests, cut.requests):           # same rows drawn, then shaped
        assert b.output_tokens == min(max(a.output_tokens, 1), 64)
        assert b.prompt_tokens == min(max(round(a.prompt_tokens * 0.5), 1), 256)
    note = next(n for n in cut.notes if n.startswith("output tokens"))
    assert f"{n_cut} cut to the max" in note
    assert any("scaled x0.5" in n for n in cut.notes)
    assert min(r.prompt_tokens for r in raw.requests) >= 1          # ShareGPT has 0-token prompts: raised to 1


@needs_traces
def test_real_azure_trace_rescaled_rate():
    w = generate(WorkloadConfig(arrival="trace", rate=300.0, duration_s=120.0, lengths="trace"))
    s = w.summary()
    assert s["rate"] == pytest.approx(300.0, rel=0.03)
    native = generate(WorkloadConfig(arrival="trace", rate=None, duration_s=60.0, lengths="trace"))
    # first two rows of the real trace: 18:15:46.6805900 and 18:15:50.9951690, lengths (374, 44), (396, 109)
    assert native.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (native.requests[0].prompt_tokens, native.requests[0].output_tokens) == (374, 44)
    assert (native.requests[1].prompt_tokens, native.requests[1].output_tokens) == (396, 109)
