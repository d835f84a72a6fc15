#!/usr/bin/env python
"""Base-projection matmul on the CPU: LightLLM's weight layout vs nn.Linear's, by batch size.

LightLLM keeps every projection weight as W_kn = W.T ([in, out], contiguous) and computes
`x @ W_kn`. The same product can be computed from nn.Linear's layout W_nk ([out, in],
contiguous) as `(W_nk @ x.T).T`. On this machine's BLAS the two differ a lot for small batches:
the decode PerfModel's `multi_row` term (a step of 2+ rows costs 25-48 ms more than one row) is
this effect. This script measures both for the default model's projection shapes, with the
weights rotated through more memory than the caches hold (as in a decode step), and prints
which layout wins per batch size.

    python scripts/bench/cpu_matmul_layout.py --out results/matmul_layout.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# SmolLM2-135M: hidden 576, q 576, fused k+v 2 x 192, fused gate+up 2 x 1536, down 1536 -> 576.
SHAPES = {"q": (576, 576), "kv": (576, 384), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
LAYOUTS = {
    "x @ W_kn (LightLLM)": lambda x, kn, nk: torch.mm(x, kn),
    "(W_nk @ x.T).T (nn.Linear layout)": lambda x, kn, nk: torch.mm(nk, x.t()),
}


def median_us(fn, reps: int) -> float:
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def measure(batches: list[int], reps: int, cache_mb: int) -> dict:
    result = {}
    for name, (k, n) in SHAPES.items():
        copies = max(4, int(cache_mb * 1e6 / (k * n * 4)))
        kn = [torch.randn(k, n) for _ in range(copies)]
        nk = [w.t().contiguous() for w in kn]
        for m in batches:
            x = torch.randn(m, k)
            # interleaved so both layouts see the same machine state
            for layout, op in LAYOUTS.items():
                us = median_us(lambda i: op(x, kn[i % copies], nk[i % copies]), reps)
                result.setdefault(name, {}).setdefault(str(m), {})[layout] = us
        print(f"  {name} done", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/matmul_layout.json", help="JSON to write")
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="comma-separated batch sizes (rows)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per cell (median)")
    parser.add_argument("--cache-mb", type=int, default=150, help="weight copies rotated through, MB")
    args = parser.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        parser.error("--batches must be comma-separated integers >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU matmul layouts, {torch.get_num_threads()} threads, fp32", flush=True)
    result = measure(batches, args.reps, args.cache_mb)
    step = {}
    names = list(LAYOUTS)
    for m in map(str, batches):
        totals = [sum(result[s][m][layout] for s in SHAPES) for layout in names]
        step[m] = dict(zip(names, totals))
    print(f"{'batch':>5s} {'LightLLM us':>12s} {'nn.Linear us':>13s} {'ratio':>6s}   (one layer's 5 projections)")
    for m, totals in step.items():
        a, b = totals[names[0]], totals[names[1]]
        print(f"{m:>5s} {a:12.0f} {b:13.0f} {a / b:6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "dtype": "float32",
                                          "date": time.strftime("%Y-%m-%d %H:%M"), "shapes": SHAPES,
                                          "per_projection_us": result, "per_layer_us": step}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
