#!/usr/bin/env python
"""The paper's scheduler comparison under measured truth: rank-aware against dlora, random,
first-fit and most-idle at 64 simulated instances and three loads, for each shipped truth table
(this CPU VM, the H200), next to the same runs with the PerfModel as its own truth.

Per table: the policies predict with the table's linear fit; the steps are drawn from the table.
Load = offered rate / a capacity estimate per instance from the fit (batch `--max-batch` at the
workload's mean rank: max_batch / (mean output x decode step) less the prefill time); the TPOT
SLO is `--slo-factor` x the fitted decode step at that batch. Prints the table, writes JSON.
Every number is SIMULATED (the truth is measured steps, the cluster is not).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from caraserve_router.evaluation.sim_config import SimConfig
from caraserve_router.evaluation.sim_sweep import SweepSpec, run_sweep
from caraserve_router.evaluation.truth_sources import fitted_model
from caraserve_router.evaluation.truth_table import TruthTable
from caraserve_router.evaluation.workload import WorkloadConfig, generate
from caraserve_router.scheduling.policies import PolicyConfig

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("rank-aware", "dlora", "random", "first-fit", "most-idle")
PAPER = "paper (A100s, 64 instances): rank-aware 99% SLO attainment; mean TPOT 22-57% lower than the baselines"


def capacity(pm, wl, max_batch: int) -> float:
    reqs = wl.requests
    out = sum(r.output_tokens for r in reqs) / len(reqs)
    prompt = sum(r.prompt_tokens for r in reqs) / len(reqs)
    rank = sum(r.rank for r in reqs) / len(reqs)
    step = pm.decode_step_ms(max_batch, int(rank * max_batch), 64, "mbgmv")
    per_req_s = out * step / 1000.0 / max_batch + pm.predict_prefill_ms(int(prompt), int(rank)) / 1000.0
    return 1.0 / per_req_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="cpu-vm-smollm2,h200-llama7b-shapes", help="shipped truth tables")
    p.add_argument("--instances", type=int, default=64)
    p.add_argument("--loads", default="0.6,0.9,1.2", help="offered load / estimated capacity")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--slo-factor", type=float, default=1.2, help="TPOT SLO = this x the fitted decode step at max batch")
    p.add_argument("--trace", required=True, help="Azure-format trace CSV (arrivals)")
    p.add_argument("--lengths", required=True, help="ShareGPT lengths CSV")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/truth/policies_measured_truth.json")
    args = p.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    base_wl = WorkloadConfig(arrival="trace", rate=1.0, duration_s=args.duration, lengths="sharegpt",
                             trace_path=args.trace, lengths_path=args.lengths, prompt_scale=0.5, output_scale=0.5,
                             max_prompt_tokens=1024, max_output_tokens=512, num_adapters=128, popularity="power",
                             alpha=0.5, ranks=(8, 16, 32, 64), seed=0)
    result = {"label": "simulated", "paper": PAPER, "instances": args.instances, "loads": loads, "tables": {},
              "date": time.strftime("%Y-%m-%d %H:%M")}
    for name in args.tables.split(","):
        table = TruthTable.load_file(REPO / "data" / "truth_tables" / f"{name}.json")
        pm = fitted_model(table)
        probe = generate(replace(base_wl, rate=10.0))
        cap = capacity(pm, probe, args.max_batch)
        rank = sum(r.rank for r in probe.requests) / len(probe.requests)
        slo = args.slo_factor * pm.decode_step_ms(args.max_batch, int(rank * args.max_batch), 64, "mbgmv")
        sim = SimConfig(max_batch=args.max_batch, lora_mode="cached", kernel="mbgmv", slo_tpot_ms=slo,
                        drain_limit_s=300.0, progress_s=0)
        pol = PolicyConfig(slo_tpot_ms=slo, max_batch=args.max_batch, seed=0)
        spec = SweepSpec(POLICIES, tuple(load * cap for load in loads), (args.instances,), True)
        entry = {"device": table.device, "measured": table.measured, "not_measured": table.not_measured,
                 "capacity_req_s_per_instance": cap, "slo_tpot_ms": slo}
        for truth_kind, truth in (("measured", table), ("perf-model", None)):
            print(f"== {name}: truth {truth_kind}, capacity ~{cap:.3f} req/s/instance, TPOT SLO {slo:.1f} ms", flush=True)
            res = run_sweep(spec, base_wl, sim, pol, pm, log=lambda s: print(s, flush=True), truth=truth)
            entry[truth_kind] = {
                f"load={load:g}": {m["policy"]: {k: m.get(k) for k in ("slo_attainment", "tpot_ms_mean", "ttft_ms_mean",
                                                                     "e2e_ms_mean", "truth")}
                                   for m in res["runs"] if abs(m["rate"] - load * cap * args.instances) < 1e-6}
                for load in loads}
        result["tables"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"wrote {args.out} (SIMULATED)")
    return 0


def print_table(result: dict) -> None:
    for name, entry in result["tables"].items():
        for truth_kind in ("measured", "perf-model"):
            print(f"\n{name} ({entry['device']}), truth {truth_kind}, SLO {entry['slo_tpot_ms']:.1f} ms: "
                  "SLO attainment / mean TPOT (ms) per load")
            for load, row in entry[truth_kind].items():
                print(f"  {load:<9} " + "  ".join(f"{p} {m['slo_attainment']:.3f}/{m['tpot_ms_mean'] or 0:.1f}"
                                                  for p, m in row.items()))
    print(PAPER)


if __name__ == "__main__":
    sys.exit(main())
