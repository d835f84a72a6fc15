#!/usr/bin/env python
"""Replay a trace workload against a running CaraServe api_server (loopback only).

Builds the workload (caraserve_router.evaluation.workload: Azure-trace arrivals rescaled to --rate,
ShareGPT or trace lengths clipped to the model's context, power-law adapter popularity,
ranks round robin), sends each request at its arrival time as a streaming
POST /v1/completions with token-id prompts of the exact length and ignore_eos, and records
per request TTFT, TPOT, E2E and status. Writes --out JSON (`requests` + `summary`) and PNG
latency CDFs beside it.

    python scripts/replay.py --url http://127.0.0.1:8000 --rate 2 --duration 60 --out results/replay.json
    python scripts/replay.py --compare results/rank-aware.json results/random.json --out results/compare.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from caraserve_router.evaluation.replay_client import ReplayConfig, ReplayError, replay
from caraserve_router.evaluation.workload import WorkloadConfig, WorkloadError, generate
from caraserve_router.evaluation.workload_flags import add_workload_arguments, workload_from_args

# A short run against a small real server: trace arrivals at 1 req/s, ShareGPT lengths clipped
# to what a CPU instance serves in time (the simulator's defaults are the paper's scale instead).
WORKLOAD_DEFAULTS = WorkloadConfig(arrival="trace", rate=1.0, duration_s=60.0, num_requests=100, prompt_len=64,
                                   output_len=32, max_prompt_tokens=512, max_output_tokens=64, num_adapters=16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("server")
    s.add_argument("--url", default="http://127.0.0.1:8000",
                   help="api_server base URL; loopback hosts only (default http://127.0.0.1:8000)")
    s.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds before an unfinished request counts as a timeout (default 300)")
    s.add_argument("--adapters-dir", type=Path, default=None,
                   help="directory of PEFT adapters to load through /v1/load_lora_adapter if the server lacks them")
    s.add_argument("--make-adapters", action="store_true",
                   help="create --adapters-dir with scripts/make_adapters.py if it does not exist")
    s.add_argument("--base-model", action="store_true", help="send every request to the base model, no adapters")
    add_workload_arguments(p, WORKLOAD_DEFAULTS, help_overrides={"--seed": "seed of the workload and the prompt ids"})
    o = p.add_argument_group("SLO and output")
    o.add_argument("--slo-tpot-ms", type=float, default=40.0, help="per-token latency SLO in ms (default 40)")
    o.add_argument("--slo-ttft-ms", type=float, default=None, help="optional TTFT SLO in ms")
    o.add_argument("--out", type=Path, default=None,
                   help="results JSON (replay) or the PNG to write (--compare); plots go beside the JSON")
    o.add_argument("--label", default=None, help="name of this run in plots and comparisons (e.g. the policy)")
    o.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    o.add_argument("--save-token-times", action="store_true", help="keep every token's arrival time per request")
    o.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines (0: off)")
    o.add_argument("--compare", nargs="+", type=Path, default=None, metavar="RESULT.json",
                   help="compare earlier result files (no requests sent): table + attainment/CDF plot to --out")
    return p


def workload_config(args) -> WorkloadConfig:
    return workload_from_args(args, WORKLOAD_DEFAULTS)


def print_summary(label: str, s: dict) -> None:
    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"
    print(f"{label}: {s['requests']} sent, {s['ok']} ok, statuses {s['statuses']}; "
          f"SLO attainment {f(s['slo_attainment'], 3)} (TPOT <= {s['slo_tpot_ms']:g} ms"
          + (f", TTFT <= {s['slo_ttft_ms']:g} ms" if s.get("slo_ttft_ms") else "") + ")")
    print(f"  TTFT ms p50/p90/p99 {f(s['ttft_ms_p50'])}/{f(s['ttft_ms_p90'])}/{f(s['ttft_ms_p99'])}; "
          f"TPOT ms mean/p50/p90 {f(s['tpot_ms_mean'])}/{f(s['tpot_ms_p50'])}/{f(s['tpot_ms_p90'])}; "
          f"E2E ms p50/p90 {f(s['e2e_ms_p50'])}/{f(s['e2e_ms_p90'])}; "
          f"{f(s['throughput_tokens_s'])} tok/s over {f(s['wall_s'])} s")


def _cdf(ax, vals, label):
    vals = sorted(v for v in vals if v is not None)
    if vals:
        ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=label)


def plot_cdfs(results: list[tuple[str, dict]], path: Path, slo_tpot: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, res in results:
        ok = [r for r in res["requests"] if r["status"] == "ok"]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms")):
            _cdf(ax, [r[key] for r in ok], label)
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)", "E2E (ms)")):
        ax.set(xlabel=name, ylabel="CDF of ok requests")
        ax.grid(alpha=0.3)
    axes[1].axvline(slo_tpot, color="grey", linestyle=":")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attainment(results: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(results)), 4))
    labels = [label for label, _ in results]
    vals = [res["summary"]["slo_attainment"] or 0.0 for _, res in results]
    ax.bar(labels, vals)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set(ylabel="SLO attainment", ylim=(0, 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(paths: list[Path], out: Path | None) -> int:
    results = []
    for p in paths:
        try:
            res = json.loads(p.read_text())
            res["summary"], res["requests"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {p} is not a replay result file: {exc}", file=sys.stderr)
            return 2
        label = res.get("meta", {}).get("label") or p.stem
        print_summary(label, res["summary"])
        results.append((label, res))
    out = out or Path("compare.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_attainment(results, out)
    cdf_path = out.with_name(out.stem + "_cdf.png")
    plot_cdfs(results, cdf_path, results[0][1]["summary"]["slo_tpot_ms"])
    print(f"wrote {out}\nwrote {cdf_path}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        return compare(args.compare, args.out)
    try:
        cfg = ReplayConfig(url=args.url, request_timeout_s=args.request_timeout, slo_tpot_ms=args.slo_tpot_ms,
                           slo_ttft_ms=args.slo_ttft_ms, seed=args.seed, use_base_model=args.base_model,
                           progress_s=args.progress_s, save_token_times=args.save_token_times)
        wl_cfg = workload_config(args)
        workload = generate(wl_cfg)
    except (ReplayError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(workload.describe(), flush=True)
    try:
        res = asyncio.run(replay(workload.requests, cfg, args.adapters_dir, args.make_adapters,
                                 log=lambda s: print(s, flush=True), ranks=args.ranks))
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = args.label or "replay"
    res["meta"] = {"label": label, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.node(),
                   "url": args.url, "workload": asdict(wl_cfg), "workload_notes": workload.notes,
                   "replay": asdict(cfg), "command": " ".join(sys.argv)}
    print_summary(label, res["summary"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
        if not args.no_plots:
            path = args.out.with_name(args.out.stem + "_cdf.png")
            plot_cdfs([(label, res)], path, cfg.slo_tpot_ms)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
