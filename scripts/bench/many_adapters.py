#!/usr/bin/env python
"""Many adapters, each at its own size, served through the real server (issue 12).

1. Adapters: `--distinct` PEFT adapters for the default model (SmolLM2-135M) made with PEFT
   (ranks 8..128, skewed to small ones; half attention-only, every fourth with a
   `rank_pattern`), then `--adapters` adapter directories (default 1,024), directory i hard
   links the files of distinct adapter i % distinct. Every directory is a separate adapter to
   the server (its own registration, host copy, device rows and loads); only the disk is shared.
2. Start-up: `python -m caraserve_router.api_server --adapters DIR` (cpu-assist by default);
   time from launch until /v1/models lists every adapter.
3. Replay: Azure-trace arrivals at `--rate` for `--duration` s, ShareGPT lengths clipped,
   power-law adapter popularity over all adapters, through the front end (streaming
   /v1/completions), while sampling the server's process-tree RSS and its /dev/shm bytes.
4. The instance's residency statistics (registered / mapped on host / resident on device,
   bytes, loads, evictions, device hit rate, load time), the device bytes of the resident
   adapters against their files' tensor bytes, and every adapter's memory in the old layout
   (a page = one rank row of all seven projections, the adapter's largest rank) and now.
5. With `--instances N` (N > 1): the instances of this host share one host copy of each
   adapter; the report sets the /dev/shm bytes measured against the sum of what each instance
   maps (what one copy per instance would take).

On a machine without a GPU the instance runs on the CPU with the emulated host->device link
(`--lora-link-bandwidth-mbps`, default 2000 MB/s): load times and TTFT are **emulated**.

    python scripts/bench/many_adapters.py --out many.json            # JSON + many.png
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import requests

from caraserve_router.evaluation.replay_client import ReplayConfig, replay
from caraserve_router.evaluation.server_process import RunningServer
from caraserve_router.evaluation.workload import WorkloadConfig, generate
from caraserve_router.contracts.configs import LoRAConfig
from common import add_server_arguments, server_flags, start_server, write_result

# The pool: 2048 MiB, where the CPU default of 256 MiB holds one rank-128 all-module adapter of
# this model (149 MiB in fp32).
LORA_FLAGS = (LoRAConfig(mode="cpu-assist", host_cache_mb=1024.0, pool_mb=2048.0), ("mode", "host_cache_mb", "pool_mb"))

REPO = Path(__file__).resolve().parents[2]
RANKS = (8, 16, 32, 64, 128)
RANK_WEIGHTS = (0.35, 0.3, 0.2, 0.1, 0.05)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- adapters ------------------------------------------------------------------------------

def distinct_specs(count: int, seed: int) -> list[dict]:
    """Rank, targets and rank_pattern of each distinct adapter (deterministic in seed)."""
    import random

    rng = random.Random(seed)
    specs = []
    for d in range(count):
        # the first 2 x len(RANKS) cover every rank, attention-only and all-module; then skewed draws
        rank = RANKS[d // 2] if d < 2 * len(RANKS) else rng.choices(RANKS, RANK_WEIGHTS)[0]
        targets = ATTENTION if d % 2 else ALL
        spec = {"rank": rank, "target_modules": targets, "rank_pattern": None}
        if d % 4 == 3:  # per-module ranks, one module at a quarter of the rank
            spec["rank_pattern"] = {"v_proj": max(1, rank // 4), "o_proj": max(1, rank // 2)}
        specs.append(spec)
    return specs


def distinct_dir(work: Path, d: int, spec: dict, seed: int) -> Path:
    pattern = "-pattern" if spec["rank_pattern"] else ""
    return work / "distinct" / f"d{d:03d}-s{seed}-r{spec['rank']}-{len(spec['target_modules'])}m{pattern}"


def make_adapters(work: Path, model_dir: Path, count: int, distinct: int, seed: int) -> tuple[Path, list[Path]]:
    """work/distinct/d<NNN>-... made with PEFT (kept between runs), work/adapters-.../ad<i> hard links."""
    from caraserve_router.assets import demo_adapters

    specs = distinct_specs(distinct, seed)
    dirs = [distinct_dir(work, d, spec, seed) for d, spec in enumerate(specs)]
    base = None
    for d, spec in enumerate(specs):
        out = dirs[d]
        if (out / "adapter_model.safetensors").exists():
            continue
        if base is None:
            base = demo_adapters._load_base(model_dir)
        log(f"PEFT adapter {d + 1}/{distinct}: rank {spec['rank']}, {len(spec['target_modules'])} modules"
            f"{', rank_pattern' if spec['rank_pattern'] else ''}")
        demo_adapters.make_random_adapter(base, out, rank=spec["rank"], target_modules=spec["target_modules"],
                                          rank_pattern=spec["rank_pattern"], seed=seed + d, overwrite=True)
    root = work / f"adapters-{count}-{distinct}-s{seed}"
    if not root.exists():
        tmp = root.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            d = tmp / f"ad{i}"
            d.mkdir(exist_ok=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if not (d / name).exists():
                    os.link(dirs[i % distinct] / name, d / name)
        tmp.rename(root)
    return root, dirs


def adapter_bytes(adapter_dir: Path, shapes) -> dict:
    """Tensor bytes (fp32, the CPU model's dtype) of an adapter and its old-layout bytes."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt", "cpu") as f:
        elements = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
        max_rank = max(min(f.get_slice(k).get_shape()) for k in f.keys())
    old_page = shapes.floats_per_rank_per_layer() * shapes.num_layers * 4
    return {"tensor_bytes": elements * 4, "old_layout_bytes": max_rank * old_page, "max_rank": max_rank}


# ---- sampling ------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """RSS of the server's process tree (front end, instance processes, sidecar workers; shared
    memory a process maps counts in its RSS) and the resident bytes of the server's /dev/shm
    entries, every `period` s."""

    def __init__(self, server: RunningServer, period: float = 1.0):
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict:
        import psutil

        rss = 0
        try:
            root = psutil.Process(self.server.proc.pid)
            for p in [root] + root.children(recursive=True):
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        shm = 0
        for name in os.listdir("/dev/shm"):
            if name.startswith(self.server.shm_prefix):
                try:
                    shm += os.stat(f"/dev/shm/{name}").st_blocks * 512  # resident pages, not the size
                except FileNotFoundError:
                    pass
        return {"t_s": time.monotonic() - self.t0, "rss_bytes": rss, "shm_bytes": shm}

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            self.samples.append(self.sample())


def instance_stats(server: RunningServer) -> list[dict]:
    """Every instance's own /stats (not the front end's poll of them)."""
    front = requests.get(f"{server.url}/stats", timeout=30).json()
    return [requests.get(f"{i['url']}/stats", timeout=30).json() for i in front["instances"]]


def wait_models(server: RunningServer, count: int, timeout: float) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            data = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"]
            if len(data) >= count:
                return time.monotonic()
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not list {count} adapters within {timeout:.0f} s:\n{server.tail()}")


# ---- report --------------------------------------------------------------------------------

def percentile(values: list, q: float):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ttft = sorted(r["ttft_ms"] for r in report["replay"]["requests"] if r.get("ttft_ms") is not None)
    axes[0].plot(ttft, [i / max(1, len(ttft)) for i in range(len(ttft))])
    axes[0].set(xscale="log", xlabel="TTFT (ms, emulated link)" if report["emulated"] else "TTFT (ms)",
                ylabel="CDF", title=f"TTFT, {len(ttft)} requests over {report['adapters']} adapters")
    s = report["memory_samples"]
    axes[1].plot([x["t_s"] for x in s], [x["rss_bytes"] / 2**30 for x in s], label="server RSS (GiB)")
    axes[1].plot([x["t_s"] for x in s], [x["shm_bytes"] / 2**30 for x in s], label="/dev/shm (GiB)")
    axes[1].axhline(report["config"]["host_cache_mb"] / 1024, ls="--", c="gray", label="host cache budget")
    axes[1].set(xlabel="replay time (s)", title="host memory during the replay")
    axes[1].legend()
    per = report["per_adapter"]
    old = [a["old_layout_bytes"] / 2**20 for a in per.values()]
    new = [a["tensor_bytes"] / 2**20 for a in per.values()]
    axes[2].bar(["old layout", "own size"], [sum(old) / len(old), sum(new) / len(new)])
    axes[2].set(ylabel="MiB per adapter (mean, fp32)", title="device / host bytes per adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("many.json"), help="JSON result (PNG beside it)")
    p.add_argument("--adapters", type=int, default=1024, help="adapter directories (default 1024)")
    p.add_argument("--distinct", type=int, default=16, help="distinct PEFT adapters behind them (default 16)")
    p.add_argument("--duration", type=float, default=180.0, help="replay seconds (default 180)")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (default 1)")
    p.add_argument("--alpha", type=float, default=0.3,
                   help="power-law popularity, S-LoRA's int(power(alpha) * adapters): below 1 favours low "
                   "indices, 1.0 is uniform (default 0.3)")
    p.add_argument("--max-prompt", type=int, default=256, help="prompt tokens clipped to this (default 256)")
    p.add_argument("--max-output", type=int, default=32, help="output tokens clipped to this (default 32)")
    p.add_argument("--instances", type=int, default=1,
                   help="instances on this host (default 1); they share one host copy of each adapter")
    # --mode, --host-cache-mb, --pool-mb: the server's --lora-* flags
    add_server_arguments(p, *LORA_FLAGS)
    p.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "bench" / "many",
                   help="adapters are made (once) under this directory")
    p.add_argument("--model-dir", type=Path, default=None, help="base model (default: the prepared SmolLM2-135M)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from caraserve_router.assets.model_prep import prepare_default_model
    from caraserve_router.lora.shapes import ModelShapes

    model_dir = args.model_dir or prepare_default_model()
    shapes = ModelShapes.from_model_dir(str(model_dir))
    root, distinct_dirs = make_adapters(args.work_dir, Path(model_dir), args.adapters, args.distinct, args.seed)
    per_distinct = [adapter_bytes(d, shapes) for d in distinct_dirs]
    per_adapter = {f"ad{i}": per_distinct[i % args.distinct] for i in range(args.adapters)}

    workload = generate(WorkloadConfig(arrival="trace", rate=args.rate, duration_s=args.duration,
                                       num_adapters=args.adapters, popularity="power", alpha=args.alpha,
                                       adapter_prefix="ad", max_prompt_tokens=args.max_prompt,
                                       max_output_tokens=args.max_output, seed=args.seed,
                                       # adapter i's own rank: the replay maps workload adapters onto
                                       # served ones of the same rank, one to one
                                       ranks=tuple(per_adapter[f"ad{i}"]["max_rank"] for i in range(args.adapters))))
    server_args = ["--model-dir", str(model_dir), "--adapters", str(root), "--instances", str(args.instances),
                   "--policy", "most-idle",  # no start-up profile running beside the replay
                   "--lora-max-rank", str(max(RANKS)), *server_flags(args, *LORA_FLAGS, server_prefix="lora_")]
    log_path = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    launched = time.monotonic()
    with start_server(server_args, log_path, startup_s=900) as server:
        healthy = time.monotonic()  # /health answered (RunningServer waited for it)
        ready = wait_models(server, args.adapters, 900)
        log(f"start-up: /health after {healthy - launched:.1f} s, {args.adapters} adapters listed after "
            f"{ready - launched:.1f} s")
        after_start = instance_stats(server)[0]
        sampler = Sampler(server)
        sampler.samples.append(sampler.sample())
        sampler.start()
        log(f"{args.adapters} adapters listed; replaying {len(workload)} requests for {args.duration:.0f} s")
        result = asyncio.run(replay(workload.requests, ReplayConfig(url=server.url, request_timeout_s=600.0,
                                                                    progress_s=15.0), log=log))
        sampler.stop_event.set()
        sampler.join()
        sampler.samples.append(sampler.sample())
        all_stats = instance_stats(server)
    stats = all_stats[0]
    lora = stats["lora"]
    residency = lora["residency"]
    resident = {r["name"] for r in lora["resident"]}
    resident_file_bytes = sum(per_adapter[n]["tensor_bytes"] for n in resident if n in per_adapter)
    reqs = result["requests"]
    asked = {r["model"] for r in reqs}
    ok = [r for r in reqs if r.get("status") == "ok"]
    answered = {r["model"] for r in ok}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "emulated": lora.get("link") == "emulated",
        "config": vars(args) | {"out": str(args.out), "work_dir": "(local)", "model_dir": "(default model)"},
        "adapters": args.adapters, "distinct": args.distinct,
        "startup_s": ready - launched, "health_s": healthy - launched,
        "startup_note": "from launch to /v1/models listing every adapter (health_s: to /health)",
        "after_start": {"registered": after_start["lora"]["residency"]["registered"],
                        "host_bytes": after_start["lora"]["residency"]["host_bytes"]},
        "residency": residency,  # instance 0's
        "residency_per_instance": [s["lora"]["residency"] for s in all_stats],
        "device_bytes_vs_file_bytes": {"resident": len(resident), "device_bytes": residency["device_bytes"],
                                       "file_tensor_bytes": resident_file_bytes,
                                       "ratio": residency["device_bytes"] / resident_file_bytes
                                       if resident_file_bytes else None},
        "memory_per_adapter_mib": {
            "old_layout_mean": sum(a["old_layout_bytes"] for a in per_adapter.values()) / len(per_adapter) / 2**20,
            "own_size_mean": sum(a["tensor_bytes"] for a in per_adapter.values()) / len(per_adapter) / 2**20},
        "instances": args.instances,
        "host_sharing": {  # what each instance maps, against the one copy of the host
            "mapped_bytes_per_instance": [s["lora"]["residency"]["host_bytes"] for s in all_stats],
            "mapped_bytes_sum": sum(s["lora"]["residency"]["host_bytes"] for s in all_stats),
            "shm_bytes_end": sampler.samples[-1]["shm_bytes"],
            "reads_from_file": sum(s["lora"]["residency"]["host_reads"] for s in all_stats),
            "maps_of_shared_copies": sum(s["lora"]["residency"].get("host_shared_hits", 0) for s in all_stats)},
        "host": {"rss_max_bytes": max(s["rss_bytes"] for s in sampler.samples),
                 "shm_max_bytes": max(s["shm_bytes"] for s in sampler.samples),
                 "rss_start_bytes": sampler.samples[0]["rss_bytes"], "shm_start_bytes": sampler.samples[0]["shm_bytes"]},
        "requests": {"sent": len(reqs), "ok": len(ok), "adapters_requested": len(asked),
                     "adapters_answered": len(answered), "every_requested_adapter_answered": asked <= answered,
                     "failed": len(reqs) - len(ok)},
        "ttft_ms": {"p50": percentile([r.get("ttft_ms") for r in ok], 0.5),
                    "p99": percentile([r.get("ttft_ms") for r in ok], 0.99)},
        "replay_summary": result.get("summary"),
        "per_adapter": per_adapter,
        "memory_samples": sampler.samples,
        "replay": {"requests": reqs},
    }
    write_result(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    summary = {k: report[k] for k in ("startup_s", "device_bytes_vs_file_bytes", "memory_per_adapter_mib",
                                      "host", "host_sharing", "requests", "ttft_ms")}
    summary["residency"] = {k: residency[k] for k in ("registered", "mapped_on_host", "host_bytes",
                                                      "resident_on_device", "device_bytes", "device_loads",
                                                      "device_evictions", "device_hit_rate", "load_s",
                                                      "host_evictions")}
    print(json.dumps(summary, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
