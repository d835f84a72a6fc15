"""Latency metrics of a simulator run: TTFT, TPOT, E2E, per-token latency, SLO attainment."""
from __future__ import annotations

import math
from typing import Any, Sequence

from caraserve_router.evaluation.sim_instance import SimRequest


def _pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def summarize_records(records: Sequence[SimRequest], slo_tpot_ms: float, slo_ttft_ms: float | None) -> dict[str, Any]:
    """Latency metrics of finished requests; SLO attainment counts unfinished requests as misses."""
    ttft, tpot, e2e, ptl = [], [], [], []
    ok = ok_ptl = 0
    tokens = 0
    first_arrival = min((r.req.arrival_s for r in records), default=0.0)
    last_finish = first_arrival
    for r in records:
        if r.finish_t is None:
            continue
        a, out = r.req.arrival_s, r.req.output_tokens
        t1 = (r.first_t - a) * 1000.0
        e = (r.finish_t - a) * 1000.0
        ttft.append(t1)
        e2e.append(e)
        ptl.append(e / out)
        tokens += out
        last_finish = max(last_finish, r.finish_t)
        tp = (r.finish_t - r.first_t) * 1000.0 / (out - 1) if out > 1 else None
        if tp is not None:
            tpot.append(tp)
        ttft_ok = slo_ttft_ms is None or t1 <= slo_ttft_ms
        ok += ttft_ok and (tp is None or tp <= slo_tpot_ms)
        ok_ptl += e / out <= slo_tpot_ms
    n = len(records)
    span = last_finish - first_arrival
    s_ttft, s_tpot, s_e2e = sorted(ttft), sorted(tpot), sorted(e2e)
    return {
        "requests": n, "completed": len(e2e), "unfinished": n - len(e2e),
        "slo_tpot_ms": slo_tpot_ms, "slo_ttft_ms": slo_ttft_ms,
        "slo_attainment": ok / n if n else None,
        "slo_attainment_per_token_e2e": ok_ptl / n if n else None,
        "tpot_ms_mean": _mean(tpot), "tpot_ms_p50": _pct(s_tpot, 50), "tpot_ms_p90": _pct(s_tpot, 90),
        "tpot_ms_p99": _pct(s_tpot, 99),
        "ttft_ms_mean": _mean(ttft), "ttft_ms_p50": _pct(s_ttft, 50), "ttft_ms_p90": _pct(s_ttft, 90),
        "ttft_ms_p99": _pct(s_ttft, 99),
        "e2e_ms_mean": _mean(e2e), "e2e_ms_p50": _pct(s_e2e, 50), "e2e_ms_p90": _pct(s_e2e, 90),
        "per_token_ms_mean": _mean(ptl),
        "throughput_tokens_s": tokens / span if span > 0 else None,
        "throughput_req_s": len(e2e) / span if span > 0 else None,
    }


def tpot_samples(records: Sequence[SimRequest]) -> list[float]:
    """Per-request TPOT (ms) of the finished requests with more than one output token."""
    return [(r.finish_t - r.first_t) * 1000.0 / (r.req.output_tokens - 1) for r in records
            if r.finish_t is not None and r.req.output_tokens > 1]
