#!/usr/bin/env python
"""Profile CaraServe instances and fit the scheduler's performance model (PerfModel JSON).

Prefill latency vs prompt tokens (and rank), decode step latency vs batch size and rank mix,
for each decode kernel (bgmv: padded to the batch's max rank; mbgmv: sum of ranks), and the
adapter load cost from the (emulated) link. Timings are the instance's own per-step timings
(`/step_samples`), with load driven over HTTP.

    python scripts/profile_instance.py --out perf.json                 # starts one instance per kernel
    python scripts/profile_instance.py --url http://127.0.0.1:8100 --out perf.json   # a running instance

The api_server takes the result with `--perf-model perf.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import asyncio
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.frontend.profiler import FULL_GRID, QUICK_GRID, SWEEP_GRID, collect_profile


async def profile_url(url: str, grid, seed: int) -> dict:
    import aiohttp

    from caraserve_router.frontend.instance_client import InstanceClient

    from caraserve_router.contracts.instance_auth import INSTANCE_KEY_ENV, auth_headers

    # an instance a front end started needs its key (give it in the environment, never argv)
    async with aiohttp.ClientSession(headers=auth_headers(os.environ.get(INSTANCE_KEY_ENV, ""))) as session:
        client = InstanceClient(url, session)
        models = await client.models()
        adapters = {m["id"]: int(m["rank"]) for m in models["data"] if not m.get("base_model")}
        print(f"profiling {url} ({len(adapters)} adapters: ranks {sorted(set(adapters.values()))})", flush=True)
        return await collect_profile(client, adapters, grid, seed=seed)


def merge(profiles: list[dict]) -> dict:
    merged = {"metadata": dict(profiles[0]["metadata"]), "prefill": [], "decode": []}
    merged["metadata"]["kernels"] = [p["metadata"]["kernel"] for p in profiles]
    for p in profiles:
        merged["prefill"] += p["prefill"]
        merged["decode"] += p["decode"]
        for key in ("link", "cpu_assist"):
            if key in p:
                merged[key] = p[key]
    return merged


def start_and_profile(args, grid) -> list[dict]:
    from caraserve_router.assets.demo_adapters import make_demo_adapters
    from caraserve_router.assets.model_prep import prepare_default_model
    from caraserve_router.evaluation.server_process import RunningServer

    model_dir = args.model_dir or str(prepare_default_model())
    adapters = Path(args.adapters_dir)
    make_demo_adapters(model_dir, adapters, ranks=(8, 16, 32, 64), count=args.adapters)
    profiles = []
    for kernel in args.kernels.split(","):
        log = Path(args.log_dir) / f"profile_instance.{kernel}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        flags = ["--model-dir", model_dir, "--lora-adapters", str(adapters), "--lora-decode-kernel", kernel,
                 "--lora-mode", "auto", "--lora-pool-mb", "1600", "--torch-threads", str(args.torch_threads)]
        print(f"starting an instance with the {kernel} decode kernel ...", flush=True)
        with RunningServer("lightllm_patches.instance", flags, log) as srv:
            profiles.append(asyncio.run(profile_url(srv.url, grid, args.seed)))
    return profiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/perf_model.json", help="PerfModel JSON to write")
    parser.add_argument("--url", action="append", default=[], help="instance URL to profile (repeatable, e.g. "
                        "one per decode kernel); default: start instances here")
    parser.add_argument("--model-dir", default="", help="model for started instances (default: SmolLM2)")
    parser.add_argument("--adapters-dir", default=str(REPO / ".cache" / "profile_adapters"),
                        help="demo adapters for started instances (made if missing)")
    parser.add_argument("--log-dir", default=str(REPO / ".cache" / "logs"), help="logs of started instances")
    parser.add_argument("--adapters", type=int, default=16, help="demo adapters to make (ranks 8/16/32/64 round robin)")
    parser.add_argument("--kernels", default="mbgmv,bgmv", help="decode kernels to profile with started instances")
    parser.add_argument("--torch-threads", type=int, default=0, help="threads of started instances (0: all cores)")
    parser.add_argument("--quick", action="store_true", help="a small grid (what the api_server does at start)")
    parser.add_argument("--sweep", action="store_true",
                        help="the full grid x 3 repeats, every decode cycle kept, and a measured truth table "
                             "beside --out (<out>.truth.json) for scripts/simulate.py --truth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and rank mixes")
    parser.add_argument("--decode-context", type=int, default=None,
                        help="prompt tokens of the decode requests (default 128): the model has no context "
                             "term, so profile at your workload's typical context")
    args = parser.parse_args()
    grid = QUICK_GRID if args.quick else SWEEP_GRID if args.sweep else FULL_GRID
    if args.decode_context is not None:
        if args.decode_context < 1:
            parser.error("--decode-context must be >= 1")
        grid = dataclasses.replace(grid, decode_context=args.decode_context)
    try:
        profiles = [asyncio.run(profile_url(u, grid, args.seed)) for u in args.url] if args.url \
            else start_and_profile(args, grid)
        profile = merge(profiles)
        model = PerfModel.fit(profile)
    except Exception as e:  # noqa: BLE001 - a CLI: say what failed
        print(f"profile_instance: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    Path(args.out).with_suffix(".profile.json").write_text(json.dumps(profile, indent=2))
    print(model.describe())
    print(f"wrote {args.out}")
    if args.sweep:
        from caraserve_router.evaluation.truth_sources import from_profile

        cpu = profile.get("cpu_assist") or {}
        side = ({"ms_per_token_rank": cpu["sidecar_ms_per_token_rank"], "workers": cpu.get("sidecar_workers", 1)}
                if cpu.get("sidecar_ms_per_token_rank") else None)
        table = from_profile(profile, Path(args.out).stem, int(cpu.get("layers") or 1), side,
                             float(cpu.get("layer_sync_ms") or 0.0))
        table.save(Path(args.out).with_suffix(".truth.json"))
        print(f"wrote {Path(args.out).with_suffix('.truth.json')} (truth table: measured {table.measured})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
