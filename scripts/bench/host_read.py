#!/usr/bin/env python
"""First-use read of adapters into host shared memory (`AdapterStore.materialize`).

An adapter's bytes are read from its file the first time it is used (registration reads only
the header). The read runs on the store's reader thread, so it no longer stalls the running
batch (scripts/bench/first_use_stall.py measures that), but a cold adapter's device copy cannot
start before it ends; this script measures it per adapter: the best of `--rounds` reads (the segment
unmapped in between, the file in the page cache), and, for scale, the time the kernel takes to
allocate the same number of fresh shared-memory pages with nothing copied into them.

    python scripts/bench/host_read.py --out docs/results/host_read.json
    python scripts/bench/host_read.py --adapters-dir DIR     # DIR/<name>/: PEFT adapters

Default adapters: the 16 distinct ones `scripts/bench/many_adapters.py` makes (run it first).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import torch

from caraserve_router.contracts.processes import remove_shm
from caraserve_router.evaluation.bench_adapters import DISTINCT_DIR, have_adapters
from caraserve_router.contracts import host_segments
from caraserve_router.lora.adapter_store import AdapterStore
from caraserve_router.lora.shapes import ModelShapes
from common import write_result


def page_allocation_s(nbytes: int, prefix: str, rounds: int) -> float:
    """Best time to make a segment of `nbytes` and touch every page once (no file data)."""
    best = float("inf")
    for i in range(rounds):
        start = time.perf_counter()
        seg = host_segments.attach_or_make(f"{prefix}_pages{i}", nbytes, lambda s: None)
        torch.frombuffer(seg.buf, dtype=torch.uint8)[::4096].fill_(1)
        best = min(best, time.perf_counter() - start)
        seg.close()
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters-dir", type=Path, default=DISTINCT_DIR,
                   help="directory of PEFT adapter directories (default: bench_many_adapters' distinct ones)")
    p.add_argument("--model-dir", type=Path, default=None, help="base model (default: the prepared SmolLM2-135M)")
    p.add_argument("--rounds", type=int, default=3, help="reads per adapter; the best is kept (default 3)")
    p.add_argument("--out", type=Path, default=Path("host_read.json"), help="JSON result")
    args = p.parse_args(argv)
    from caraserve_router.assets.model_prep import prepare_default_model

    if not have_adapters(args.adapters_dir):
        return 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model_dir = args.model_dir or prepare_default_model()
    shapes = ModelShapes.from_model_dir(str(model_dir))
    prefix = f"csbench_read_{uuid.uuid4().hex[:8]}"
    store = AdapterStore(shapes, torch.float32, prefix, max_rank=256, pin=False)
    rows = []
    try:
        for name in sorted(os.listdir(args.adapters_dir)):
            host = store.add(name, str(args.adapters_dir / name))
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                store.materialize(name)
                times.append(time.perf_counter() - start)
                store._unmap(host)  # read again next round
            pages = page_allocation_s(host.nbytes, prefix, args.rounds)
            rows.append({"adapter": name, "rank": host.spec.rank, "modules": len(host.spec.target_modules),
                         "mib": host.nbytes / 2**20, "read_ms": 1e3 * min(times), "rounds_ms": [1e3 * t for t in times],
                         "page_allocation_ms": 1e3 * pages})
            r = rows[-1]
            print(f"{name:32s} rank {r['rank']:3d} {r['modules']} modules {r['mib']:7.1f} MiB  read "
                  f"{r['read_ms']:6.1f} ms  (of which fresh pages ~{r['page_allocation_ms']:5.1f} ms)", flush=True)
    finally:
        store.close()
        remove_shm(prefix)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores",
              "statistic": f"best of {args.rounds} reads per adapter, file in the page cache",
              "where": "the store's reader thread: a cold adapter's device copy starts this long after its first use",
              "adapters": rows}
    write_result(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
