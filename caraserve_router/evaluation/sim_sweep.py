"""A grid of simulator runs (policy x rate x cluster size) with a printed table, as
`scripts/simulate.py` runs it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from caraserve_router.evaluation.sim_config import SimConfig, SimulatorError
from caraserve_router.evaluation.sim_metrics import tpot_samples
from caraserve_router.evaluation.simulator import simulate
from caraserve_router.evaluation.workload import Workload
from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.policies import PolicyConfig


@dataclass(frozen=True)
class SweepSpec:
    """Grid of runs: every policy x rate x cluster size. ``rate_per_instance``: rates are per instance."""

    policies: tuple[str, ...]
    rates: tuple[float, ...]
    instances: tuple[int, ...]
    rate_per_instance: bool = False

    def __post_init__(self) -> None:
        if not self.policies or not self.rates or not self.instances:
            raise SimulatorError("a sweep needs at least one policy, one rate and one cluster size")
        if any(r <= 0 for r in self.rates) or any(n < 1 for n in self.instances):
            raise SimulatorError("rates must be > 0 and cluster sizes >= 1")


# (header, width, decimals or None for text/int, metrics key)
TABLE_COLUMNS = (("policy", -22, None, "policy"), ("n", 4, None, "num_instances"), ("rate", 7, 1, "rate"),
                 ("SLO", 6, 3, "slo_attainment"), ("SLO e2e/tok", 11, 3, "slo_attainment_per_token_e2e"),
                 ("TPOT", 6, 1, "tpot_ms_mean"), ("TPOT p90", 8, 1, "tpot_ms_p90"),
                 ("TTFT p50", 8, 0, "ttft_ms_p50"), ("TTFT p90", 8, 0, "ttft_ms_p90"),
                 ("E2E", 7, 0, "e2e_ms_mean"), ("tok/s", 8, 0, "throughput_tokens_s"),
                 ("unfin", 5, None, "unfinished"), ("wall s", 6, 1, "wall_s"))


def table_header() -> str:
    """The header line of the sweep table (`TABLE_COLUMNS`)."""
    return " ".join(f"{name:<{-w}}" if w < 0 else f"{name:>{w}}" for name, w, _, _ in TABLE_COLUMNS)


def table_row(m: dict[str, Any]) -> str:
    """One run's metrics as a line of the sweep table; "-" where a metric is None."""
    cells = []
    for _, w, dec, key in TABLE_COLUMNS:
        v = m.get(key)
        text = "-" if v is None else (f"{v:.{dec}f}" if dec is not None else str(v))
        cells.append(f"{text:<{-w}}" if w < 0 else f"{text:>{w}}")
    return " ".join(cells)


def run_sweep(spec: SweepSpec, workload_config, sim_config: SimConfig, policy_config: PolicyConfig,
              perf_model: PerfModel, mean_output_len: float | None = None,
              log: Callable[[str], None] = print, keep_tpot_samples: int = 2000, truth=None) -> dict[str, Any]:
    """Run the grid; returns {"runs": [...], "results": {policy: {"instances=N": {"rate=R": metrics}}},
    "tpot_samples": {(policy, n, rate): sorted sample}} (samples are not JSON; drop them before saving).
    With `truth` (a TruthTable) every run's steps are drawn from it (measured truth)."""
    from dataclasses import replace

    from caraserve_router.evaluation.workload import generate

    runs, results, samples = [], {}, {}
    workloads: dict[float, Workload] = {}
    total, k = len(spec.policies) * len(spec.rates) * len(spec.instances), 0
    log(table_header())
    for n in spec.instances:
        for rate in spec.rates:
            total_rate = rate * n if spec.rate_per_instance else rate
            if total_rate not in workloads:
                workloads[total_rate] = generate(replace(workload_config, rate=total_rate))
                log(f"# {workloads[total_rate].describe()}")
            w = workloads[total_rate]
            mol = mean_output_len or (sum(r.output_tokens for r in w.requests) / max(1, len(w)))
            pcfg = replace(policy_config, mean_output_len=mol, slo_tpot_ms=sim_config.slo_tpot_ms,
                           max_batch=sim_config.max_batch)
            scfg = replace(sim_config, num_instances=n)
            for policy in spec.policies:
                k += 1
                label = f"{k}/{total} {policy} n={n} rate={total_rate:g}"
                m, sim = simulate(w, perf_model, policy, scfg, pcfg, label=label, truth=truth, seed=policy_config.seed)
                m.update({"rate": total_rate, "offered_rate": w.summary().get("rate"),
                          "mean_output_len_policy": mol})
                runs.append(m)
                results.setdefault(policy, {}).setdefault(f"instances={n}", {})[f"rate={total_rate:g}"] = m
                tp = sorted(tpot_samples(sim.records))
                step = max(1, len(tp) // keep_tpot_samples)
                samples[(policy, n, total_rate)] = tp[::step]
                log(table_row(m))
    return {"runs": runs, "results": results, "tpot_samples": samples}
