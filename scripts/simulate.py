#!/usr/bin/env python
"""Simulate a CaraServe cluster: sweep policies x request rates x cluster sizes.

Drives the live router's policy classes with a PerfModel over a workload from the shared traces;
the simulated steps are drawn from a measured truth table (`--truth`, default: the shipped table
of this machine's device kind; the policies predict with the table's linear fit unless
`--perf-model` says otherwise). `--truth none` is the old way: the PerfModel (default the
reference GPU model "assumed, from paper figures") is both the truth and the prediction. Prints a
table as it goes, writes --out JSON and PNG plots. Every number it produces is SIMULATED.

Example (the paper's scale: 64 instances, ~300 req/s, 10 simulated minutes):
    python scripts/simulate.py --instances 64 --rates 300 --duration 600 --out results/sim.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from caraserve_router.contracts.names import DecodeKernel, LoraMode, values
from caraserve_router.scheduling.perf_model import PerfModel, PerfModelError
from caraserve_router.scheduling.policies import POLICIES, PolicyConfig, PolicyError
from caraserve_router.evaluation.sim_config import SimConfig, SimulatorError
from caraserve_router.evaluation.sim_sweep import SweepSpec, run_sweep
from caraserve_router.evaluation.workload import WorkloadConfig, WorkloadError
from caraserve_router.evaluation.workload_flags import add_workload_arguments, workload_from_args

DEFAULT_PERF_MODEL = REPO / "data" / "perf_models" / "paper_a100_llama2_7b.json"
PAPER_POLICIES = tuple(POLICIES)
# The paper's scale: ten minutes of trace arrivals, ShareGPT lengths halved and clipped to a 7B
# model's context, 128 adapters (the replay client's defaults are a short run on a small server).
WORKLOAD_DEFAULTS = WorkloadConfig(arrival="trace", rate=1.0, duration_s=600.0, prompt_scale=0.5, output_scale=0.5,
                                   max_prompt_tokens=1024, max_output_tokens=512, num_adapters=128)


def csv_list(kind):
    def parse(text):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("sweep")
    g.add_argument("--policies", type=csv_list(str), default=PAPER_POLICIES,
                   help=f"comma-separated policies (default: all: {','.join(PAPER_POLICIES)})")
    g.add_argument("--rates", type=csv_list(float), default=(300.0,),
                   help="comma-separated request rates, req/s for the whole cluster (default 300)")
    g.add_argument("--rate-per-instance", action="store_true",
                   help="treat --rates as req/s per instance (total = rate x instances)")
    g.add_argument("--instances", type=csv_list(int), default=(64,),
                   help="comma-separated cluster sizes (default 64)")
    g.add_argument("--perf-model", type=Path, default=None,
                   help="PerfModel JSON the policies predict with (default: the fit of the truth table; with "
                        "--truth none, the shipped reference GPU model)")
    g.add_argument("--truth", default="machine",
                   help="where simulated step times come from: a truth table JSON (data/truth_tables/), 'machine' "
                        "(default: the shipped table of this machine's device kind), or 'none' (the PerfModel "
                        "itself: the policies graded with their own answer key)")
    # --rate is the sweep's (--rates); the workload is generated at 1 req/s and rescaled per run
    add_workload_arguments(p, WORKLOAD_DEFAULTS, skip=("--rate",),
                           help_overrides={"--seed": "workload and random-policy seed",
                                           "--prompt-scale": "multiply prompt lengths (docs/SCHEDULER.md: the "
                                                             "paper-scale workload)"})
    c = p.add_argument_group("cluster")
    c.add_argument("--lora-mode", choices=values(LoraMode), default="cached",
                   help="adapter loading mode of every instance (default cached)")
    c.add_argument("--kernel", choices=values(DecodeKernel), default="bgmv", help="decode kernel (default bgmv, Punica)")
    c.add_argument("--max-batch", type=int, default=32, help="running requests per instance (default 32)")
    c.add_argument("--max-wait-steps", type=int, default=10,
                   help="decode steps between prefill tries (LightLLM router_max_wait_tokens, default 10)")
    c.add_argument("--max-prefill-tokens", type=int, default=None, help="prompt tokens per prefill batch")
    c.add_argument("--adapter-capacity-ranks", type=int, default=None,
                   help="device memory for adapters per instance, in rank units (default unlimited)")
    c.add_argument("--instances-per-host", type=int, default=1,
                   help="instances of one host: their cpu-assisted prefills share its sidecar workers (with a "
                        "truth table) and, with --host-cores, their steps its cores (default 1)")
    c.add_argument("--host-cores", type=int, default=None,
                   help="cores one host's instances share (default: none shared, the GPU case); a step runs "
                        "max(1, busy instances x --threads-per-instance / cores) times its measured time")
    c.add_argument("--threads-per-instance", type=int, default=1, help="torch threads of one instance (default 1)")
    c.add_argument("--sync-interval", type=float, default=1.0,
                   help="seconds between router stats syncs / dlora rebalances (default 1)")
    c.add_argument("--drain-limit", type=float, default=600.0,
                   help="simulated seconds allowed after the last arrival; unfinished = SLO miss (default 600)")
    s = p.add_argument_group("router / SLO")
    s.add_argument("--slo-tpot-ms", type=float, default=40.0, help="per-token latency SLO, ms (default 40)")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="optional TTFT SLO, ms")
    s.add_argument("--mean-output-len", type=float, default=None,
                   help="rank-aware's mean output length (default: the workload's mean)")
    s.add_argument("--max-queue", type=int, default=0,
                   help="requests an instance may queue beyond its batch; 0: the router holds them (default 0)")
    s.add_argument("--prefill-factor", type=float, default=1.0,
                   help="rank-aware's multiplier on predicted prefill (artifact: 1.5; default 1.0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None, help="write results JSON here (and plots beside it)")
    o.add_argument("--plots", type=Path, default=None, help="directory for PNG plots (default: beside --out)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--progress-s", type=float, default=10.0, help="wall seconds between progress lines (0: off)")
    return p


def configs(args):
    for name in args.policies:
        if name not in POLICIES:
            raise PolicyError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    wl = workload_from_args(args, WORKLOAD_DEFAULTS)
    sim = SimConfig(max_batch=args.max_batch, max_wait_steps=args.max_wait_steps,
                    max_prefill_tokens=args.max_prefill_tokens, lora_mode=args.lora_mode, kernel=args.kernel,
                    adapter_capacity_ranks=args.adapter_capacity_ranks, sync_interval_s=args.sync_interval,
                    drain_limit_s=args.drain_limit, slo_tpot_ms=args.slo_tpot_ms, slo_ttft_ms=args.slo_ttft_ms,
                    progress_s=args.progress_s, instances_per_host=args.instances_per_host,
                    host_cores=args.host_cores, threads_per_instance=args.threads_per_instance)
    pol = PolicyConfig(slo_tpot_ms=args.slo_tpot_ms, max_batch=args.max_batch, max_queue=args.max_queue,
                       seed=args.seed, prefill_factor=args.prefill_factor)
    spec = SweepSpec(tuple(args.policies), tuple(args.rates), tuple(args.instances), args.rate_per_instance)
    return spec, wl, sim, pol


def plot(out: dict, samples: dict, spec: SweepSpec, directory: Path, stem: str, slo: float) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for n in spec.instances:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        for policy in spec.policies:
            runs = sorted(out["results"][policy][f"instances={n}"].values(), key=lambda m: m["rate"])
            rates = [m["rate"] for m in runs]
            axes[0].plot(rates, [m["slo_attainment"] for m in runs], marker="o", label=policy)
            axes[1].plot(rates, [m["slo_attainment_per_token_e2e"] for m in runs], marker="o", label=policy)
            axes[2].plot(rates, [m["tpot_ms_mean"] or float("nan") for m in runs], marker="o", label=policy)
        axes[0].set(xlabel="request rate (req/s)", ylabel=f"SLO attainment (TPOT <= {slo:g} ms)",
                    title=f"{n} instances (simulated)")
        axes[1].set(xlabel="request rate (req/s)", ylabel=f"SLO attainment (E2E / tokens <= {slo:g} ms)",
                    title="paper artifact's per-token metric")
        axes[2].set(xlabel="request rate (req/s)", ylabel="mean TPOT (ms)", title=f"{n} instances (simulated)")
        axes[2].axhline(slo, color="grey", linestyle=":")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        path = directory / f"{stem}_n{n}_vs_rate.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        written.append(plot_cdf(samples, spec, n, directory, stem, slo, plt))
    return written


def plot_cdf(samples, spec, n, directory, stem, slo, plt) -> Path:
    rate = max(r * n if spec.rate_per_instance else r for r in spec.rates)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in spec.policies:
        vals = samples.get((policy, n, rate), [])
        if vals:
            ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=policy)
    ax.axvline(slo, color="grey", linestyle=":")
    ax.set(xlabel="TPOT per request (ms)", ylabel="CDF", title=f"{n} instances, {rate:g} req/s (simulated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = directory / f"{stem}_n{n}_tpot_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from caraserve_router.evaluation.truth_sources import resolve_truth
    from caraserve_router.evaluation.truth_table import TruthTableError

    try:
        truth, pm, note = resolve_truth(args.truth, args.perf_model, DEFAULT_PERF_MODEL, REPO / "data" / "truth_tables")
        spec, wl, sim, pol = configs(args)
    except (PerfModelError, PolicyError, SimulatorError, WorkloadError, TruthTableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"SIMULATED cluster; {note}\n{pm.describe()}")
    t0 = time.monotonic()
    try:
        res = run_sweep(spec, wl, sim, pol, pm, mean_output_len=args.mean_output_len, log=lambda s: print(s, flush=True),
                        truth=truth)
    except (WorkloadError, SimulatorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    samples = res.pop("tpot_samples")
    res["label"] = "simulated"
    res["truth"] = "measured" if truth is not None else "perf-model"
    res["truth_table"] = truth.name if truth is not None else None
    res["policies"] = {m["policy"]: {k: m.get(k) for k in ("slo_attainment", "tpot_ms_mean", "ttft_ms_mean",
                                                         "e2e_ms_mean")} for m in res["runs"]}  # the last run of each
    res["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.node(),
        "platform": platform.platform(), "python": platform.python_version(),
        "perf_model": str(args.perf_model or "fitted to the truth table"), "perf_model_metadata": pm.metadata,
        "sweep": asdict(spec), "workload": asdict(wl) | {"rate": "per run"}, "sim": asdict(sim), "policy": asdict(pol),
        "command": " ".join(sys.argv), "wall_s": time.monotonic() - t0,
    }
    print(f"done in {time.monotonic() - t0:.1f} s (wall)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
        if not args.no_plots:
            for path in plot(res, samples, spec, args.plots or args.out.parent, args.out.stem, args.slo_tpot_ms):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
