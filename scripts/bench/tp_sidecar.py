"""CPU sidecar under tensor parallelism: a rank's shard of a layer's LoRA delta vs the whole delta.

Times the sidecar workers' own math (`sidecar.worker.group_delta`, float32, one thread: one
worker is one core) for one layer of a llama, per projection group, with every slice at rank
`--rank`: the shard a TP rank computes (its `TpShard.shapes`) against the whole delta a rank
would compute to then keep its slice. For the row-parallel groups (o, down) only the shard is
possible: a rank holds only its slice of their input.

    python scripts/bench/tp_sidecar.py --model llama2-7b --tp 2 --tokens 128 --rank 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from caraserve_router.lora.shapes import GROUPS, ModelShapes
from caraserve_router.lora.sidecar.worker import group_delta
from caraserve_router.lora.tp_shard import ROW_PARALLEL_GROUPS, TpShard

MODELS = {
    "llama2-7b": ModelShapes(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                             intermediate=11008),
    "llama2-70b": ModelShapes(num_layers=80, hidden=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                              intermediate=28672),
}


def time_group(shapes: ModelShapes, group: str, tokens: int, rank: int, repeats: int) -> list[float]:
    """ms per call of group_delta for `group` of `shapes`, `repeats` times."""
    g = shapes.group(group)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, g.in_features, generator=gen)  # x: [tokens, IN]
    a = torch.randn(rank * g.num_slices, g.in_features, generator=gen)  # a: [sum r_s, IN]
    bs = tuple(torch.randn(rank, out, generator=gen) for out in g.out_features)  # per slice [r, OUT_s]
    out = torch.empty(tokens, g.out_total)
    ranks = (rank,) * g.num_slices
    group_delta(x, a, bs, ranks, g.slice_offsets, out)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        group_delta(x, a, bs, ranks, g.slice_offsets, out)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="llama2-7b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    full = MODELS[args.model]
    shard = TpShard(0, args.tp).shapes(full)
    rows = []
    for group in GROUPS:
        part = time_group(shard, group, args.tokens, args.rank, args.repeats)
        whole = None if group in ROW_PARALLEL_GROUPS else time_group(full, group, args.tokens, args.rank, args.repeats)
        rows.append({"group": group, "shard_ms": statistics.median(part), "shard_ms_range": [min(part), max(part)],
                     "whole_ms": statistics.median(whole) if whole else None,
                     "whole_ms_range": [min(whole), max(whole)] if whole else None})
    print(json.dumps({"model": args.model, "tp": args.tp, "tokens": args.tokens, "rank": args.rank,
                      "threads": 1, "groups": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
