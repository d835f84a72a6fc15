#!/usr/bin/env python
"""The paper's end-to-end comparison of the four LoRA modes on one real instance (emulated link).

1. Calibration on this machine, printed and saved: the base prefill of the workload's mean
   prompt, a decode step at batch 8, the same prefill with a rank-64 adapter on the
   benchmark's targets (the *LoRA share of a prefill on the emulated device*), and the CPU
   sidecar's time for that adapter's LoRA term against the device's (the *CPU-vs-device LoRA
   speed ratio*). On a GPU the LoRA share of a prefill is a few percent and the CPU is far
   slower than the device; here the "device" is a CPU core, so both numbers are what make
   cpu-assist look better or worse than it would on a GPU.
2. A workload: arrivals from an Azure-format trace (`--trace`) rescaled to `--load` x the
   instance's estimated capacity, lengths from the trace scaled and clipped (printed), at
   least 128 adapters (ranks 8/16/32/64, power-law popularity: most first uses are cold).
3. The emulated host->device link at a bandwidth where loading a rank-64 adapter takes
   `--load-factor` x the mean prompt's prefill (stated).
4. One server per mode (`cached`, `on-demand`, `pipeline`, `cpu-assist`), each mode run
   `--repeats` times, modes interleaved; the same requests every time (open loop).

Per mode: mean / p50 / p90 TTFT, TPOT and E2E, overhead against cached, the longest and p99
gap between consecutive tokens of requests in flight (decode stalls), cold starts and loads,
and the time of one chunked-prefill step. JSON + PNG; every number is labelled emulated.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import requests as http

REPO = Path(__file__).resolve().parents[2]
MODES = ("cached", "on-demand", "pipeline", "cpu-assist", "auto")


def pct(values: list, q: float):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ------------------------------------------------------------------------------ one mode


def run_mode(mode: str, repeat: int, workload, args, model_dir: str, adapters_dir: Path, bandwidth: float) -> dict:
    from caraserve_router.evaluation.replay_client import ReplayConfig, replay
    from caraserve_router.contracts.instance_auth import new_key
    from caraserve_router.evaluation.server_process import RunningServer

    logs = Path(args.out).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    flags = ["--model-dir", model_dir, "--adapters", str(adapters_dir), "--policy", "round-robin",
             "--lora-mode", mode, "--lora-pool-mb", str(args.pool_mb), "--lora-link", "emulated",
             "--lora-link-bandwidth-mbps", f"{bandwidth:.3f}", "--no-lora-prefetch",
             "--prefill-chunk-tokens", str(args.prefill_chunk_tokens), "--torch-threads", str(args.engine_threads),
             "--sidecar-workers", str(args.sidecar_workers), "--max-req-input-len", str(args.max_prompt + 8),
             "--max-req-total-len", str(args.max_prompt + args.max_output + 16), "--log-dir", str(logs)]
    cfg = ReplayConfig(request_timeout_s=args.request_timeout, progress_s=0, save_token_times=True,
                       slo_tpot_ms=1000.0)
    with RunningServer("caraserve_router.api_server", flags, logs / f"modes_{mode}_{repeat}.log",
                       instance_key=new_key()) as srv:
        cfg = ReplayConfig(**{**cfg.__dict__, "url": srv.url})
        result = asyncio.run(replay(workload.requests, cfg, log=lambda m: None))
        inst = http.get(srv.url + "/stats", timeout=10).json()["instances"][0]["url"]
        lora = http.get(inst + "/stats", headers=srv.instance_headers, timeout=10).json().get("lora", {})
        samples = http.get(inst + "/step_samples", headers=srv.instance_headers, timeout=10).json()
    records = result["requests"]
    ok = [r for r in records if r["status"] == "ok"]
    gaps = []
    for r in ok:
        t = r.get("token_times_ms") or []
        gaps += [b - a for a, b in zip(t, t[1:])]
    chunk_steps = [s["ms"] for s in (samples if isinstance(samples, list) else samples.get("samples", []))
                   if s.get("kind") == "mixed"]
    return {"records": records, "gaps": gaps, "loads": lora.get("loads", {}), "counters": lora.get("counters", {}),
            "chunk_steps_ms": chunk_steps, "wall_s": result["summary"]["wall_s"],
            "auto": (lora.get("auto") or {}).get("choices"),
            "errors": sorted({r["error"] for r in records if r["status"] != "ok" and r["error"]})[:5]}


def summarize_mode(runs: list) -> dict:
    """Pooled statistics over the repeats, and each repeat's mean (the noise)."""
    ok = [r for run in runs for r in run["records"] if r["status"] == "ok"]
    out = {"requests_sent": sum(len(run["records"]) for run in runs),
           "requests_ok": len(ok), "repeats": len(runs)}
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        vals = [r[key] for r in ok if r[key] is not None]
        out[f"{key}_mean"] = statistics.mean(vals) if vals else None
        out[f"{key}_p50"] = pct(vals, 50)
        out[f"{key}_p90"] = pct(vals, 90)
        out[f"{key}_mean_per_repeat"] = [
            statistics.mean(v) if (v := [r[key] for r in run["records"] if r["status"] == "ok" and r[key] is not None])
            else None for run in runs]
    gaps = [g for run in runs for g in run["gaps"]]
    out["inflight_max_gap_ms"] = max(gaps) if gaps else None
    out["inflight_gap_ms_p99"] = pct(gaps, 99)
    out["inflight_gap_ms_p50"] = pct(gaps, 50)
    out["inflight_max_gap_ms_per_repeat"] = [max(run["gaps"]) if run["gaps"] else None for run in runs]
    steps = [s for run in runs for s in run["chunk_steps_ms"]]
    out["chunk_step_ms_p50"] = pct(steps, 50)
    out["chunk_step_ms_max"] = max(steps) if steps else None
    out["cold_loads"] = [run["loads"].get("cold") for run in runs]
    out["cold_requests"] = [run["loads"].get("cold_requests") for run in runs]
    out["cpu_assisted_steps"] = [run["loads"].get("cpu_assisted_steps") for run in runs]
    out["sidecar_fallbacks"] = [run["counters"].get("sidecar_fallbacks", 0) for run in runs]
    # the runtime's counters per repeat (waits for loads, sidecar time, fallbacks): why a mode costs what it does
    out["lora_counters"] = [run["counters"] for run in runs]
    out["auto_choices"] = [run.get("auto") for run in runs]  # auto mode: [{mode, reason, loads}] per repeat
    out["errors"] = sorted({e for run in runs for e in run["errors"]})[:5]
    return out


# ------------------------------------------------------------------------------ report


def honesty_notes(result: dict) -> list:
    cal, modes = result["calibration"], result["modes"]
    notes = [f"emulated: the 'device' is {result['engine_threads']} CPU core(s) and the host->device link is "
             f"emulated at {result['emulated_link_mb_s']:.1f} MB/s; no number here is a GPU measurement.",
             f"LoRA share of a {cal['prompt_tokens']}-token prefill with a rank-64 adapter on "
             f"{'/'.join(cal['targets'])} on this emulated device: {100 * cal['lora_share_of_prefill']:.1f}% "
             f"(on a GPU it is a few percent).",
             f"CPU sidecar vs device time for that LoRA term: {cal['cpu_vs_device_lora_time_ratio']:.2f}x "
             f"({cal['sidecar_lora_ms']:.1f} vs {cal['device_lora_ms']:.1f} ms); on a GPU the device is one to two "
             f"orders of magnitude faster, so the sidecar only pays while a load is in flight."]
    if "cached" in modes and "cpu-assist" in modes:
        for key in ("ttft_ms_mean", "e2e_ms_mean"):
            c, a = modes["cached"][key], modes["cpu-assist"][key]
            if c and a and a < c:
                notes.append(f"cpu-assist beats cached on {key} by {100 * (1 - a / c):.1f}%: the sidecar runs the cold "
                             f"adapters' LoRA term on another core while the device core does the base model, which "
                             f"only pays because LoRA is {100 * cal['lora_share_of_prefill']:.0f}% of a prefill on "
                             f"this emulated device; on a GPU expect cpu-assist at or slightly above cached.")
    return notes


def target_checks(modes: dict) -> dict:
    def ratio(a, b, key):
        return modes[a][key] / modes[b][key] if a in modes and b in modes and modes[b][key] else None

    checks = {"cpu_assist_e2e_vs_cached": (ratio("cpu-assist", "cached", "e2e_ms_mean"), 1.10),
              "cpu_assist_e2e_vs_on_demand": (ratio("cpu-assist", "on-demand", "e2e_ms_mean"), 0.75),
              "cpu_assist_ttft_vs_pipeline": (ratio("cpu-assist", "pipeline", "ttft_ms_mean"), 0.6),
              "cpu_assist_gap_vs_on_demand": (ratio("cpu-assist", "on-demand", "inflight_max_gap_ms"), 0.25)}
    if "cpu-assist" in modes and modes["cpu-assist"]["chunk_step_ms_p50"]:
        m = modes["cpu-assist"]
        checks["cpu_assist_gap_vs_chunk_step"] = (m["inflight_max_gap_ms"] / m["chunk_step_ms_p50"], 1.5)
    return {k: {"value": v, "target_at_most": t, "met": v is not None and v <= t} for k, (v, t) in checks.items()}


def print_tables(result: dict) -> None:
    modes = result["modes"]
    cached = modes.get("cached")
    print("\nmode        ok/sent   TTFT mean/p50/p90 (ms)   TPOT mean/p50/p90 (ms)   E2E mean/p50/p90 (ms)   "
          "vs cached TTFT/TPOT/E2E   (emulated link)")
    for mode, m in modes.items():
        rel = ""
        if cached:
            rel = "/".join(f"{100 * (m[k] / cached[k] - 1):+.0f}%" for k in ("ttft_ms_mean", "tpot_ms_mean", "e2e_ms_mean"))
        print(f"{mode:<11} {m['requests_ok']:>3}/{m['requests_sent']:<4} "
              + "   ".join(f"{m[k + '_mean']:7.0f} {m[k + '_p50']:6.0f} {m[k + '_p90']:6.0f}" for k in ("ttft_ms", "tpot_ms", "e2e_ms"))
              + f"   {rel}")
        print(f"{'':11}          per repeat E2E means: "
              + ", ".join(f"{v:.0f}" for v in m["e2e_ms_mean_per_repeat"] if v is not None))
    print("\nmode        in-flight gap max / p99 / p50 (ms)   max per repeat   chunk step p50/max (ms)   "
          "cold loads, cold requests, cpu-assisted steps")
    for mode, m in modes.items():
        print(f"{mode:<11} {m['inflight_max_gap_ms']:8.0f} {m['inflight_gap_ms_p99']:7.0f} {m['inflight_gap_ms_p50']:6.0f}"
              f"          {', '.join(f'{v:.0f}' for v in m['inflight_max_gap_ms_per_repeat'] if v is not None):<16}"
              f" {m['chunk_step_ms_p50'] or 0:6.0f} {m['chunk_step_ms_max'] or 0:6.0f}            "
              f"{m['cold_loads']}, {m['cold_requests']}, {m['cpu_assisted_steps']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "e2e_ms", "E2E latency (ms)")):
        means = [result["modes"][m][key + "_mean"] for m in modes]
        ax.bar(modes, means, color="tab:blue", label="mean")
        ax.scatter(modes, [result["modes"][m][key + "_p90"] for m in modes], color="k", zorder=3, label="p90")
        for i, m in enumerate(modes):
            reps = [v for v in result["modes"][m][key + "_mean_per_repeat"] if v is not None]
            ax.scatter([i] * len(reps), reps, color="tab:red", marker="_", s=200, zorder=4)
        ax.set_ylabel(label)
        ax.legend()
    axes[2].bar(modes, [result["modes"][m]["inflight_max_gap_ms"] for m in modes], color="tab:orange", label="max")
    axes[2].scatter(modes, [result["modes"][m]["inflight_gap_ms_p99"] for m in modes], color="k", zorder=3, label="p99")
    axes[2].set_ylabel("in-flight decode gap (ms)")
    axes[2].legend()
    fig.suptitle(f"LoRA modes on one instance, {result['workload']['requests']} trace requests x "
                 f"{result['repeats']} (EMULATED link {result['emulated_link_mb_s']:.0f} MB/s, CPU as device)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_modes.json", help="JSON output (PNG beside it)")
    parser.add_argument("--model-dir", default="", help="model (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--trace", default="", help="Azure-format CSV (TIMESTAMP, ContextTokens, GeneratedTokens); "
                        "default ../shared/traces/AzureLLMInferenceTrace_conv.csv relative to the repo")
    parser.add_argument("--modes", default=",".join(MODES), help="modes to compare")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (modes interleaved)")
    parser.add_argument("--max-requests", type=int, default=24, help="requests per run (the first of the trace)")
    parser.add_argument("--duration", type=float, default=300.0, help="arrivals within this many seconds")
    parser.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of estimated capacity")
    parser.add_argument("--adapters", type=int, default=128, help="adapters (>= 128 for the paper's setting)")
    parser.add_argument("--ranks", default="8,16,32,64", help="adapter ranks (round robin by index)")
    parser.add_argument("--targets", default="q,k,v", help="adapter target modules (the paper's headline: q,k,v)")
    parser.add_argument("--alpha", type=float, default=0.5, help="power-law popularity exponent (S-LoRA's)")
    parser.add_argument("--prompt-scale", type=float, default=0.125, help="trace prompt lengths x this")
    parser.add_argument("--output-scale", type=float, default=0.25, help="trace output lengths x this")
    parser.add_argument("--max-prompt", type=int, default=256, help="clip prompts to this many tokens")
    parser.add_argument("--max-output", type=int, default=32, help="clip outputs to this many tokens")
    parser.add_argument("--load-factor", type=float, default=1.5,
                        help="emulated link: loading a rank-64 adapter takes this x the mean prompt's prefill")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256, help="chunked prefill (0 = off)")
    parser.add_argument("--pool-mb", type=int, default=0, help="adapter pool (0 = all adapters fit)")
    parser.add_argument("--engine-threads", type=int, default=1, help="torch threads of the model (the 'device')")
    parser.add_argument("--sidecar-workers", type=int, default=1, help="CPU sidecar workers (the 'host CPUs')")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--calibration-rounds", type=int, default=5, help="rounds of each calibration timing")
    args = parser.parse_args()

    from caraserve_router.assets.demo_adapters import make_demo_adapters, parse_ranks
    from caraserve_router.assets.model_prep import prepare_default_model
    from caraserve_router.evaluation.workload import DEFAULT_TRACE, WorkloadConfig, generate

    model_dir = args.model_dir or str(prepare_default_model())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ranks = parse_ranks(args.ranks)
    adapters_dir = REPO / ".cache" / f"bench_modes_adapters_{args.targets.replace(',', '')}"
    made = make_demo_adapters(model_dir, adapters_dir, ranks, args.adapters, args.targets, log=lambda m: None)
    made = [a for a in made if a["name"].startswith("demo-")][: args.adapters]
    total_mb = sum(a["size_bytes"] for a in made) / 2**20

    trace = args.trace or str(DEFAULT_TRACE)

    def workload(rate):
        return generate(WorkloadConfig(
            arrival="trace", rate=rate, duration_s=args.duration, num_requests=args.max_requests, lengths="trace",
            trace_path=trace, prompt_scale=args.prompt_scale, output_scale=args.output_scale,
            max_prompt_tokens=args.max_prompt, min_output_tokens=2, max_output_tokens=args.max_output,
            num_adapters=args.adapters, popularity="power", alpha=args.alpha, ranks=tuple(ranks), seed=args.seed))

    # The trace is bursty: its first requests arrive slower than its overall mean rate, so the
    # rate given to the generator (which scales the whole trace) is set from the effective rate
    # of the requests actually used (time scaling is linear in it).
    probe = workload(1.0)
    probe_rate = (len(probe.requests) - 1) / max(probe.requests[-1].arrival_s, 1e-9)
    prompt_mean = int(statistics.mean(r.prompt_tokens for r in probe.requests))
    output_mean = statistics.mean(r.output_tokens for r in probe.requests)
    r64 = next(a for a in made if a["rank"] == max(ranks))
    from lightllm_patches.emulation_check import calibrate

    cal = calibrate(model_dir, Path(r64["path"]), prompt_mean, args.engine_threads, args.sidecar_workers,
                    args.calibration_rounds, shm_prefix="csbench_modes")
    if args.pool_mb == 0:  # every adapter fits (cached mode preloads them all); the pool holds each at its size
        args.pool_mb = int(total_mb * 1.15) + 64
    print(f"{len(made)} adapters (ranks {ranks}, targets {args.targets}), {total_mb:.0f} MiB of files; "
          f"pool {args.pool_mb} MiB", flush=True)
    service_ms = cal["prefill_ms_base"] + output_mean * cal["decode_step_ms_batch8"] / 8
    rate = args.load * 1000.0 / service_ms
    wl = workload(rate / probe_rate)
    bandwidth = r64["size_bytes"] / 1e6 / (args.load_factor * cal["prefill_ms_base"] / 1000.0)
    print(f"calibration (CPU as device, {args.engine_threads} thread): prefill {prompt_mean} tokens "
          f"{cal['prefill_ms_base']:.0f} ms, its rank-64 LoRA kernels {cal['device_lora_ms']:.1f} ms (LoRA share "
          f"{100 * cal['lora_share_of_prefill']:.1f}%), decode step @8 {cal['decode_step_ms_batch8']:.1f} ms, "
          f"sidecar/device LoRA time {cal['cpu_vs_device_lora_time_ratio']:.2f}x", flush=True)
    print(f"capacity ~{1000 / service_ms:.2f} req/s; arrivals rescaled to {rate:.2f} req/s ({args.load:.0%})", flush=True)
    print(f"EMULATED link: {bandwidth:.1f} MB/s (rank-64 adapter {r64['size_bytes'] / 1e6:.1f} MB loads in "
          f"{args.load_factor:.1f}x the prefill)", flush=True)
    print(wl.describe(), flush=True)  # with the scaling and clipping notes

    modes = [m for m in args.modes.split(",") if m]
    runs = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            t0 = time.time()
            run = run_mode(mode, rep, wl, args, model_dir, adapters_dir, bandwidth)
            runs[mode].append(run)
            ok = [r for r in run["records"] if r["status"] == "ok"]
            print(f"  repeat {rep} {mode:<10}: {len(ok)}/{len(run['records'])} ok, mean E2E "
                  f"{statistics.mean(r['e2e_ms'] for r in ok) if ok else float('nan'):.0f} ms, longest gap "
                  f"{max(run['gaps']) if run['gaps'] else float('nan'):.0f} ms ({time.time() - t0:.0f} s)"
                  + (f"; errors: {run['errors']}" if run["errors"] else ""), flush=True)
    result = {"emulated": True, "emulated_link_mb_s": bandwidth, "engine_threads": args.engine_threads,
              "sidecar_workers": args.sidecar_workers, "prefill_chunk_tokens": args.prefill_chunk_tokens,
              "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M"),
              "args": {**vars(args), "trace": Path(trace).name, "out": out.name, "model_dir": Path(model_dir).name},
              "calibration": cal, "capacity_req_s": 1000 / service_ms, "rate_req_s": rate,
              "workload": {**wl.summary(), "notes": wl.notes, "requests": len(wl.requests)},
              "modes": {m: summarize_mode(runs[m]) for m in modes}}
    cached = result["modes"].get("cached")
    for m in result["modes"].values():
        if cached:
            for k in ("ttft_ms_mean", "tpot_ms_mean", "e2e_ms_mean"):
                m[f"overhead_vs_cached_{k}"] = m[k] / cached[k] - 1 if m[k] and cached[k] else None
    result["targets"] = target_checks(result["modes"])
    result["notes"] = honesty_notes(result)
    print_tables(result)
    print("\ntargets: " + "; ".join(f"{k} {v['value']:.2f} (<= {v['target_at_most']}) {'met' if v['met'] else 'MISSED'}"
                                   for k, v in result["targets"].items() if v["value"] is not None))
    for n in result["notes"]:
        print(f"note: {n}")
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} (EMULATED link; CPU as the device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
