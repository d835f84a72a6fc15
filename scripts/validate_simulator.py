#!/usr/bin/env python
"""Validate the cluster simulator against a real cluster on this machine (`--instances`, default 4).

1. Profiles one instance (`scripts/profile_instance.py --quick`, same threads per instance as
   the cluster) unless `--perf-model` is given.
2. For each policy of `--policies`: starts a real cluster (`api_server --instances N --policy P
   --perf-model ...`, adapters resident: `--lora-mode cached`) and replays a workload
   (`scripts/replay.py`); simulates the *same* workload (same generator, flags and seed) with
   the same perf model and policy (`scripts/simulate.py --instances N`), its steps drawn from
   `--truth` (default: this machine's measured truth table; `none`: the PerfModel itself).
   The simulated instances share the machine's cores as the live ones do (`--host-cores`: a
   table measures one instance alone; four instances on two cores run each step ~2x slower).
3. Prints and writes predicted vs measured mean TTFT, TPOT and E2E per policy (the target:
   within 15%), and the replays side by side (`replay_policies.png`).

Every simulated number is labelled so; the measured ones come from real requests over HTTP.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

from caraserve_router.evaluation.server_process import RunningServer


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def host_cores() -> int:
    """Cores this process may run on (the cluster's instances share them)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def workload_flags(args, rate_flag: str = "--rate") -> list[str]:
    """The workload, identically for replay.py (`--rate`) and simulate.py (`--rates`)."""
    return ["--arrival", "poisson", rate_flag, str(args.rate), "--max-requests", str(args.requests),
            "--duration", str(args.duration), "--length-source", "sharegpt", "--max-prompt", str(args.max_prompt),
            "--max-output", str(args.max_output), "--prompt-scale", "1", "--output-scale", "1",
            "--num-adapters", "4", "--seed", str(args.seed), "--slo-tpot-ms", str(args.slo_tpot_ms)] \
        + (["--lengths", args.lengths] if args.lengths else [])


def validate_policy(args, policy: str, model_dir: str, adapters: Path, perf: str, out_dir: Path) -> dict:
    """Replay the workload on a real `--instances` cluster under `policy`, simulate it, compare."""
    flags = ["--model-dir", model_dir, "--adapters", str(adapters), "--instances", str(args.instances), "--policy", policy,
             "--perf-model", perf, "--slo-tpot-ms", str(args.slo_tpot_ms), "--lora-mode", "cached",
             "--torch-threads", str(args.threads), "--log-dir", str(out_dir / "logs")]
    replay_json = out_dir / f"replay_{policy}.json"
    if args.reuse_replays and replay_json.exists():
        print(f"reusing {replay_json}", flush=True)
    else:
        with RunningServer("caraserve_router.api_server", flags, out_dir / f"cluster_{policy}.log") as srv:
            run([PY, "scripts/replay.py", "--url", srv.url, *workload_flags(args), "--out", str(replay_json),
                 "--label", policy, "--no-plots"])
    sim_json = out_dir / f"simulated_{policy}.json"
    # the live instances share this machine's cores: so do the simulated ones (SimConfig.host_cores)
    cores = ["--instances-per-host", str(args.instances), "--host-cores", str(host_cores()),
             "--threads-per-instance", str(args.threads)]
    run([PY, "scripts/simulate.py", "--instances", str(args.instances), *cores, "--policies", policy, "--truth", args.truth,
         "--perf-model", perf, "--lora-mode", "cached", "--kernel", "mbgmv", "--max-batch", "64",
         *workload_flags(args, "--rates"), "--out", str(sim_json), "--no-plots", "--progress-s", "0"])
    measured = json.loads(replay_json.read_text())["summary"]
    simulated = json.loads(sim_json.read_text())["runs"][0]
    rows = {}
    for key in ("ttft_ms_mean", "tpot_ms_mean", "e2e_ms_mean"):
        m, s = measured[key], simulated[key]
        rows[key] = {"measured": m, "simulated": s, "error": (s - m) / m if m else None}
    return {"comparison": rows, "measured_summary": measured, "simulated_run": simulated}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/validation/validation.json", help="comparison JSON")
    parser.add_argument("--perf-model", default="", help="PerfModel JSON (default: profile an instance first)")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second")
    parser.add_argument("--requests", type=int, default=40, help="requests in the workload")
    parser.add_argument("--duration", type=float, default=300, help="longest arrival window, seconds")
    parser.add_argument("--max-prompt", type=int, default=256, help="prompt length clip")
    parser.add_argument("--max-output", type=int, default=48, help="output length clip")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    parser.add_argument("--instances", type=int, default=4, help="instances of the live cluster and the simulation")
    parser.add_argument("--truth", default="machine", help="simulate.py --truth: a table, 'machine' or 'none'")
    parser.add_argument("--lengths", default="", help="ShareGPT lengths CSV (default: the workload's default path)")
    parser.add_argument("--slo-tpot-ms", type=float, default=300.0, help="SLO of the policy and the report")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--policies", default="rank-aware,first-fit,random",
                        help="comma-separated router policies, each replayed on the cluster and simulated")
    parser.add_argument("--reuse-replays", action="store_true",
                        help="keep replay_<policy>.json already beside --out (same workload flags) and only "
                             "re-simulate")
    args = parser.parse_args()
    from caraserve_router.assets.demo_adapters import make_demo_adapters
    from caraserve_router.assets.model_prep import prepare_default_model

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = str(prepare_default_model())
    adapters = REPO / ".cache" / "adapters"
    make_demo_adapters(model_dir, adapters, ranks=(8, 16, 32, 64), count=4)
    perf = args.perf_model or str(out.with_name("perf_model.json"))
    if not args.perf_model:
        run([PY, "scripts/profile_instance.py", "--quick", "--decode-context", "128", "--kernels", "mbgmv",
             "--torch-threads", str(args.threads), "--out", perf])
    results = {}
    for policy in args.policies.split(","):
        results[policy] = validate_policy(args, policy, model_dir, adapters, perf, out.parent)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rate": args.rate, "requests": args.requests,
              "instances": args.instances, "threads_per_instance": args.threads, "host_cores": host_cores(), "perf_model": Path(perf).name,
              "truth": args.truth, "policies": results,
              "note": "simulated = discrete-event simulator, policies predicting with the profiled PerfModel, steps "
                      f"from truth {args.truth!r}; measured = real cluster over HTTP"}
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"{'policy':12s} {'metric':14s} {'measured':>10s} {'simulated':>10s} {'error':>8s}")
    for policy, r in results.items():
        for key, row in r["comparison"].items():
            print(f"{policy:12s} {key:14s} {row['measured']:10.1f} {row['simulated']:10.1f} {row['error']:8.1%}")
    replays = [str(out.with_name(f"replay_{p}.json")) for p in results]
    run([PY, "scripts/replay.py", "--compare", *replays, "--out", str(out.with_name("replay_policies.png"))])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
