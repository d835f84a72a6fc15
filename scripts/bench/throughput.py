#!/usr/bin/env python
"""Base-model decode throughput of CaraServe against the machine's ceiling, side by side.

For each batch size B, in one run:
- the *ceiling*: the time of a weights-only forward step at batch B (every projection and the
  lm_head as plain matmuls on the model's own weights; no attention, norms or sampling), so
  `ceiling_tokens_per_s = B / step`;
- the engine: LightLLM's llama with CaraServe's patches (offline engine API), B prompts of
  `--prompt-len` tokens, `--new-tokens` greedy decode steps, median step time;
- with `--server`, the same batch through a real server (HTTP, router, detokenizer processes).

Writes `--out` (JSON: {"1": {...}, "8": {...}, "32": {...}}) and prints a table.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from caraserve_router.contracts.configs import WEIGHT_LAYOUTS
from lightllm_patches.offline import OfflineEngine
from common import write_result


def matmul_gflops(repeats: int = 20) -> float:
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 512 * 576 * 1536 * repeats / (time.perf_counter() - start) / 1e9


def weights_only_step_ms(model, batch: int, repeats: int) -> float:
    """Median time of every weight matmul of one decode step at `batch` rows."""
    hidden = model.config["hidden_size"]
    inter = model.config["intermediate_size"]
    x = torch.randn(batch, hidden)
    head = model.pre_post_weight.lm_head_weight_

    def step():
        for w in model.trans_layers_weight:
            torch.mm(x, w.q_weight_)
            torch.mm(x, w.kv_weight_)
            torch.mm(x, w.o_weight_)
            gate_up = torch.mm(x, w.gate_up_proj)
            torch.mm(gate_up[:, :inter].contiguous(), w.down_proj)
        torch.mm(head, x.t())

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def prompts_for(batch: int, length: int) -> list[list[int]]:
    return [[1000 + (i * 131 + j * 17) % 28000 for j in range(length)] for i in range(batch)]


def engine_step_ms(engine: OfflineEngine, batch: int, prompt_len: int, new_tokens: int) -> float:
    times = []
    engine.run(prompts_for(batch, prompt_len), steps=new_tokens,
               on_step=lambda kind, s: times.append(s * 1000) if kind == "decode" else None)
    return statistics.median(times[2:])  # the first steps warm caches


def server_tokens_per_s(url: str, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Output tokens/s while all `batch` requests decode together (streamed token arrival times)."""
    import requests

    prompts = prompts_for(batch, prompt_len)
    arrivals: dict[int, list[float]] = {}

    def one(i: int) -> None:
        body = {"input_ids": prompts[i], "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}
        times = []
        with requests.post(url + "/generate_stream", json=body, stream=True, timeout=900) as r:
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    times.append(time.perf_counter())
        arrivals[i] = times

    with cf.ThreadPoolExecutor(batch) as pool:
        list(pool.map(one, range(batch)))
    start = max(t[0] for t in arrivals.values())  # every request is decoding from here ...
    end = min(t[-1] for t in arrivals.values())  # ... until the first one finishes
    tokens = sum(sum(1 for x in t if start < x <= end) for t in arrivals.values())
    return tokens / (end - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/throughput.json", help="JSON output path")
    parser.add_argument("--model-dir", default="", help="model directory (default: the prepared default model)")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per request")
    parser.add_argument("--repeats", type=int, default=10, help="repeats of the weights-only step")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ceiling and engine "
                        "measurements per batch (the best of each is kept: this machine is noisy)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--server", action="store_true", help="also measure through a real server")
    parser.add_argument("--cpu-weight-layouts", default="lightllm",
                        help=f"comma-separated engine weight layouts to measure side by side, from "
                             f"{sorted(WEIGHT_LAYOUTS)} (the first is reported as the engine and used by the server)")
    args = parser.parse_args()
    layouts = args.cpu_weight_layouts.split(",")
    if not layouts or any(layout not in WEIGHT_LAYOUTS for layout in layouts):
        parser.error(f"--cpu-weight-layouts: choose from {sorted(WEIGHT_LAYOUTS)}")
    from caraserve_router.assets.model_prep import prepare_default_model

    model_dir = args.model_dir or str(prepare_default_model())
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"model {model_dir}; torch threads {torch.get_num_threads()}; cores {os.cpu_count()}", flush=True)
    gflops = matmul_gflops()
    print(f"fp32 matmul rate (512x576 @ 576x1536): {gflops:.1f} GFLOP/s", flush=True)
    engines = {layout: OfflineEngine(model_dir, max_total_tokens=max(batches) * (args.prompt_len + args.new_tokens) + 64,
                                     max_seq=args.prompt_len + args.new_tokens + 8, max_req=max(batches) + 8,
                                     cpu_weight_layout=layout) for layout in layouts}
    engine = engines[layouts[0]]
    results = {}
    try:
        for batch in batches:
            ceilings, by_layout = [], {layout: [] for layout in layouts}
            for _ in range(args.rounds):  # interleaved, so all see the same machine noise
                ceilings.append(weights_only_step_ms(engine.model, batch, args.repeats))
                for layout, e in engines.items():
                    by_layout[layout].append(engine_step_ms(e, batch, args.prompt_len, args.new_tokens))
            steps = by_layout[layouts[0]]
            ceiling_ms, step_ms = min(ceilings), min(steps)
            results[str(batch)] = {
                "tokens_per_s": batch / step_ms * 1000,
                "ms_per_step": step_ms,
                "ceiling_tokens_per_s": batch / ceiling_ms * 1000,
                "ceiling_ms_per_step": ceiling_ms,
                "fraction_of_ceiling": ceiling_ms / step_ms,
                "matmul_gflops": gflops,
                "ceiling_ms_rounds": ceilings,
                "engine_ms_rounds": steps,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "cpu_weight_layout": layouts[0],
                "by_layout": {layout: {"tokens_per_s": batch / min(ms) * 1000, "ms_per_step": min(ms),
                                       "engine_ms_rounds": ms} for layout, ms in by_layout.items()},
            }
            print(f"batch {batch:3d}: engine {step_ms:7.1f} ms/step = {batch / step_ms * 1000:7.1f} tok/s; "
                  f"ceiling {ceiling_ms:7.1f} ms/step = {batch / ceiling_ms * 1000:7.1f} tok/s; "
                  f"{ceiling_ms / step_ms:5.1%} of the ceiling", flush=True)
            for layout in layouts[1:]:
                ms = min(by_layout[layout])
                print(f"           layout {layout}: {ms:7.1f} ms/step = {batch / ms * 1000:7.1f} tok/s "
                      f"({step_ms / ms:.2f}x the {layouts[0]} layout)", flush=True)
    finally:
        for e in engines.values():
            e.close()
    if args.server:
        from caraserve_router.evaluation.server_process import RunningServer

        log = Path(args.out).with_suffix(".server.log")
        with RunningServer("caraserve_router.api_server", ["--model-dir", model_dir, "--lora-mode", "pipeline",
                                                           "--policy", "round-robin",
                                                           "--cpu-weight-layout", layouts[0]], log) as srv:
            for batch in batches:
                tps = server_tokens_per_s(srv.url, batch, args.prompt_len, args.new_tokens)
                results[str(batch)]["server_tokens_per_s"] = tps
                print(f"batch {batch:3d}: server {tps:7.1f} tok/s", flush=True)
    for entry in results.values():
        entry["machine"] = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
        entry["date"] = time.strftime("%Y-%m-%d %H:%M")
    write_result(Path(args.out), results, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
