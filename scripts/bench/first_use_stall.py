#!/usr/bin/env python
"""Does a running stream stall when another request's adapter is used for the first time?

One server (default model, `--lora-mode`, one instance); one long streaming request on the base
model; while it streams, requests for `--cold` adapters that no one has used yet arrive one by
one (each needs its file read into host memory, then a copy to the device). The stream's
inter-token gaps (at the client) are compared between the quiet part and the windows after each
cold arrival. Before the reads moved to a reader thread, the router thread read the file (tens
to hundreds of ms per adapter) while the running batch waited.

    python scripts/bench/first_use_stall.py --out docs/results/first_use_stall.json

Adapters: `--adapters-dir` (default: the distinct adapters of scripts/bench/many_adapters.py),
the largest ones used first. The link is emulated on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

from caraserve_router.contracts.configs import LoRAConfig
from caraserve_router.evaluation.bench_adapters import DISTINCT_DIR, have_adapters
from common import add_server_arguments, server_flags, start_server, write_result

LORA_FLAGS = (LoRAConfig(mode="cpu-assist"), ("mode",), "lora_")  # the server's --lora-mode


def stream(url: str, tokens: int, stamps: list) -> None:
    body = {"inputs": "Tell me a long story about a lighthouse keeper.", "adapter": None,
            "parameters": {"max_new_tokens": tokens, "ignore_eos": True}}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                stamps.append(time.monotonic())


def cold_request(url: str, adapter: str, out: dict) -> None:
    start = time.monotonic()
    r = requests.post(url + "/generate", json={"inputs": "Hello", "adapter": adapter,
                                               "parameters": {"max_new_tokens": 2}}, timeout=600)
    out[adapter] = {"status": r.status_code, "latency_s": time.monotonic() - start, "sent": start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters-dir", type=Path, default=DISTINCT_DIR,
                   help="directory of PEFT adapter directories for the default model")
    p.add_argument("--cold", type=int, default=4, help="cold adapters used while the stream runs (default 4)")
    p.add_argument("--every-s", type=float, default=3.0, help="seconds between cold arrivals (default 3)")
    p.add_argument("--window-s", type=float, default=1.0, help="gaps counted after each arrival (default 1 s)")
    p.add_argument("--tokens", type=int, default=400, help="tokens of the running stream (default 400)")
    add_server_arguments(p, *LORA_FLAGS)
    p.add_argument("--out", type=Path, default=Path("first_use_stall.json"), help="JSON result")
    args = p.parse_args(argv)
    if not have_adapters(args.adapters_dir):
        return 2
    by_size = sorted(os.listdir(args.adapters_dir),
                     key=lambda n: -(args.adapters_dir / n / "adapter_model.safetensors").stat().st_size)
    cold = by_size[: args.cold]
    log = args.out.with_suffix(".server.log")
    server_args = ["--adapters", str(args.adapters_dir), *server_flags(args, *LORA_FLAGS), "--policy", "most-idle",
                   "--lora-max-rank", "128", "--lora-pool-mb", "2048"]
    with start_server(server_args, log, startup_s=600) as server:
        stamps: list = []
        streamer = threading.Thread(target=stream, args=(server.url, args.tokens, stamps))
        streamer.start()
        while len(stamps) < 20:  # streaming steadily
            time.sleep(0.05)
        results: dict = {}
        senders = []
        for adapter in cold:
            t = threading.Thread(target=cold_request, args=(server.url, adapter, results))
            t.start()
            senders.append(t)
            time.sleep(args.every_s)
        for t in senders:
            t.join()
        streamer.join()
    gaps = [(b, b - a) for a, b in zip(stamps, stamps[1:])]
    sent = [results[a]["sent"] for a in cold]
    in_window = [g for t, g in gaps if any(s <= t <= s + args.window_s for s in sent)]
    quiet = [g for t, g in gaps if not any(s - 0.2 <= t <= s + args.window_s + 1.0 for s in sent)]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores",
        "lora_mode": str(args.lora_mode), "link": "emulated (no GPU)" if not os.path.exists("/dev/nvidia0") else "cuda",
        "cold_adapters": cold, "cold_requests": results,
        "quiet_gap_ms": {"median": 1e3 * statistics.median(quiet), "max": 1e3 * max(quiet), "n": len(quiet)},
        "after_cold_arrival_gap_ms": {"median": 1e3 * statistics.median(in_window), "max": 1e3 * max(in_window),
                                      "n": len(in_window)},
        "per_arrival_max_gap_ms": [1e3 * max([g for t, g in gaps if s <= t <= s + args.window_s], default=0.0)
                                   for s in sent],
        "stream_tokens": len(stamps),
    }
    write_result(args.out, report)
    print(json.dumps({k: report[k] for k in ("quiet_gap_ms", "after_cold_arrival_gap_ms", "per_arrival_max_gap_ms",
                                             "lora_mode")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
