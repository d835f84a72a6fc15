"""Benchmark the CPU LoRA sidecar on this machine: synchronisation round trips, per-group call
latency per rank and worker count, the worker kernel inline (no IPC), and the profiled `c`.

    python scripts/bench/sidecar.py [--workers 1 2] [--ranks 8 16 32 64] [--tokens 128] [--json out.json]
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Optional

import torch

from caraserve_router.contracts.configs import SidecarConfig
from caraserve_router.lora.shapes import GROUPS, ModelShapes
from caraserve_router.lora.sidecar import CpuLoraSidecar
from caraserve_router.lora.sidecar.profiling import ProfileAdapter

# The default model (SmolLM2-135M-Instruct); --model-dir takes another's config.json.
DEFAULT_SHAPES = ModelShapes(num_layers=30, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate=1536)


def _percentiles_ms(samples: list) -> dict:
    samples = sorted(samples)
    return {"median_ms": 1e3 * samples[len(samples) // 2],
            "p99_ms": 1e3 * samples[min(len(samples) - 1, int(0.99 * len(samples)))]}


def _bench_inline(shapes: ModelShapes, rank: int, tokens: int, repeats: int) -> dict:
    """The worker's kernel (`lora_delta`) in this process, one thread: compute with no IPC."""
    from caraserve_router.lora.sidecar.worker import lora_delta

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {}
        for group in GROUPS:
            shape = shapes.group(group)
            x = torch.randn(tokens, shape.in_features)
            a = torch.randn(rank, shape.num_slices, shape.in_features)
            b = torch.randn(rank, shape.out_total)
            out = torch.empty(tokens, shape.out_total)
            samples = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                lora_delta(x, a, b, (rank,) * shape.num_slices, shape.slice_offsets, out)
                samples.append(time.perf_counter() - start)
            result[group] = _percentiles_ms(samples[1:])
        return result
    finally:
        torch.set_num_threads(threads)


def _bench_calls(sidecar: CpuLoraSidecar, name: str, tokens: int, repeats: int) -> dict:
    """Engine-side latency of compute() per group (copy in, workers, copy out), armed, cycling
    through the layers so each call reads a layer block that was not just used."""
    result = {}
    sidecar.arm()
    try:
        for group in GROUPS:
            shape = sidecar.shapes.group(group)
            x = torch.randn(tokens, shape.in_features).to(sidecar.dtype)
            out = torch.zeros(tokens, shape.out_total, dtype=sidecar.dtype)
            samples = []
            for i in range(repeats + 1):
                start = time.perf_counter()
                if not sidecar.compute(i % sidecar.shapes.num_layers, group, x, [(0, tokens, name)], out):
                    raise RuntimeError("benchmark call fell back (see the log)")
                samples.append(time.perf_counter() - start)
            result[group] = _percentiles_ms(samples[1:])
    finally:
        sidecar.disarm()
    return result


def benchmark(shapes: ModelShapes, dtype: torch.dtype, workers: list, ranks: list, tokens: int,
              roundtrips: int, repeats: int) -> dict:
    """Round trips, per-group call latency per rank and worker count, inline kernel times, and
    the profiled tokens per core (with one worker)."""
    import uuid

    report: dict = {"shapes": dataclasses.asdict(shapes), "dtype": str(dtype), "tokens": tokens,
                    "inline": {r: _bench_inline(shapes, r, tokens, repeats) for r in ranks}, "runs": {}}
    for k in workers:
        prefix = "scbench" + uuid.uuid4().hex[:8]
        # c = 1: every call uses all k workers, so the numbers show the k-way split
        sidecar = CpuLoraSidecar(SidecarConfig(workers=k, tokens_per_core=1), shapes, dtype, prefix, tokens)
        try:
            sidecar.start()
            run = {"roundtrip_us": sidecar.sync_roundtrip_us(roundtrips), "calls": {}}
            for rank in ranks:
                adapter = ProfileAdapter(shapes, dtype, f"{prefix}_r{rank}", rank, name=f"bench-r{rank}")
                try:
                    sidecar.register_adapter(adapter.host)
                    run["calls"][rank] = _bench_calls(sidecar, adapter.host.spec.name, tokens, repeats)
                finally:
                    sidecar.unregister_adapter(adapter.host.spec.name)
                    adapter.close()
            if k == 1:
                sidecar.profile_tokens_per_core()
                run["profile"] = sidecar.profile
            run["stats"] = sidecar.stats()
            report["runs"][k] = run
        finally:
            sidecar.stop()
    return report


def _print_report(report: dict) -> None:
    print(f"tokens {report['tokens']}, dtype {report['dtype']}, shapes {report['shapes']}")
    for k, run in report["runs"].items():
        rt = run["roundtrip_us"]
        print(f"\n{k} worker(s): sync round trip median {rt['median_us']:.1f} us, p99 {rt['p99_us']:.1f} us")
        print("rank | " + " | ".join(f"{g} median/p99 ms" for g in GROUPS) + " | layer (sum of medians) ms")
        for rank, groups in run["calls"].items():
            cells = " | ".join(f"{groups[g]['median_ms']:.3f} / {groups[g]['p99_ms']:.3f}" for g in GROUPS)
            print(f"{rank} | {cells} | {sum(groups[g]['median_ms'] for g in GROUPS):.3f}")
        if "profile" in run:
            print(f"profile: {run['profile']}")
    print("\ninline lora_delta, one thread, no IPC (median ms):")
    for rank, groups in report["inline"].items():
        print(f"{rank} | " + " | ".join(f"{groups[g]['median_ms']:.3f}" for g in GROUPS))


def main(argv: Optional[list] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Benchmark the CPU LoRA sidecar on this machine")
    parser.add_argument("--model-dir", default=None, help="take shapes from this model's config.json "
                        "(default: SmolLM2-135M's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--roundtrips", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shapes = ModelShapes.from_model_dir(args.model_dir) if args.model_dir else DEFAULT_SHAPES
    report = benchmark(shapes, getattr(torch, args.dtype), args.workers, args.ranks, args.tokens,
                       args.roundtrips, args.repeats)
    _print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
