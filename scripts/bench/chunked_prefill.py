#!/usr/bin/env python
"""Chunked prefill on the real model worker: what it costs and what it buys.

Drives `CaraBackend` in process (`lightllm_patches.offline_backend`), the base model, greedy:

1. Decode cost: `--batch` requests decode together, with chunking off and on, the two workers
   stepping in turn (paired steps: machine noise hits both alike). Steps without any prompt
   to prefill run the same decode code either way; the JSON gives the median decode step of
   each, the median and p10-p90 of the paired throughput ratios, and whether the greedy
   tokens are identical.
2. Stall: while the batch decodes, one `--long-prompt`-token request arrives. Without
   chunking its whole prefill is one step that every running request waits for; with chunk c
   the longest step is one chunk beside the decode rows. Per chunk size (all sizes stepping in
   turn): the longest step, the mean prompt-step time, and the time from the long request's
   arrival to its first token (sum of its steps).

The CPU stands in for the device (`--threads` torch threads). Writes `--out` (JSON) and a PNG.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from common import write_result


def make_driver(model_dir: str, chunk: int, args, long_prompt: bool):
    """A worker for `chunk` and its step-by-step run of the benchmark's requests."""
    from lightllm_patches.offline_backend import BackendDriver, Job

    jobs = [Job([1000 + (i * 131 + k * 7) % 20000 for k in range(args.prompt)], None, args.decode_tokens, arrive=0)
            for i in range(args.batch)]
    if long_prompt:
        jobs.append(Job([3000 + (k * 17) % 20000 for k in range(args.long_prompt)], None, 2, arrive=args.arrive_step))
    driver = BackendDriver(model_dir, chunk, None, torch_threads=args.threads, max_batch=args.batch + 2,
                           max_total_tokens=args.batch * (args.prompt + args.decode_tokens) + 2 * args.long_prompt + 64,
                           max_input=max(args.long_prompt, args.prompt) + 8,
                           max_total_len=max(args.long_prompt, args.prompt) + args.decode_tokens + 16)
    return driver, driver.stepper(jobs)


def lockstep(model_dir: str, chunks: list, args, long_prompt: bool) -> dict:
    """Run one worker per chunk size *step by step in turn* (so machine noise hits them alike);
    returns chunk -> (tokens, step samples)."""
    drivers = {c: make_driver(model_dir, c, args, long_prompt) for c in chunks}
    live = dict(drivers)
    try:
        while live:
            for c in list(live):
                if next(live[c][1], None) is None:
                    del live[c]
        return {c: (d.tokens, list(d.backend.step_samples)) for c, (d, _) in drivers.items()}
    finally:
        for d, _ in drivers.values():
            d.close()


def summarize_stall(samples: list) -> dict:
    """From the first pure decode step on (the batch's own prompts are done), the steps that
    carry prompt tokens are the long prompt's: one prefill, or its chunks."""
    start = next(i for i, s in enumerate(samples) if s["kind"] == "decode")
    steps = samples[start:]
    long_steps = [i for i, s in enumerate(steps) if s["tokens"] > s["batch"] or s["kind"] == "prefill"]
    window = steps[long_steps[0] : long_steps[-1] + 1]
    decode = [s["ms"] for s in steps if s["kind"] == "decode"]
    return {"longest_step_ms": max(s["ms"] for s in steps),
            "prompt_steps": len(long_steps),
            "prompt_step_ms_mean": statistics.mean(steps[i]["ms"] for i in long_steps),
            "decode_step_ms_mean": statistics.mean(decode),
            "long_prompt_ttft_ms": sum(s["ms"] for s in window)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/chunked_prefill.json", help="JSON output (PNG beside it)")
    parser.add_argument("--model-dir", default="", help="model (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=32, help="requests decoding together")
    parser.add_argument("--prompt", type=int, default=32, help="their prompt tokens")
    parser.add_argument("--decode-tokens", type=int, default=64, help="their output tokens")
    parser.add_argument("--long-prompt", type=int, default=1024, help="tokens of the prompt that arrives mid-decode")
    parser.add_argument("--arrive-step", type=int, default=0,
                        help="step at which it arrives (0 = 4 steps after the batch's own prompts are done at the "
                        "smallest chunk)")
    parser.add_argument("--chunks", default="64,128,256,512", help="chunk sizes to measure (0 = off is always run)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model (the 'device')")
    args = parser.parse_args()
    from caraserve_router.assets.model_prep import prepare_default_model

    model_dir = args.model_dir or str(prepare_default_model())
    chunks = [0] + [int(c) for c in args.chunks.split(",") if c]
    if args.arrive_step == 0:
        args.arrive_step = -(-args.batch * args.prompt // min(chunks[1:])) + 4
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # 1. decode cost at batch `--batch`: chunking off vs on, no prompt arriving mid-run, the
    #    two workers stepping in turn (paired steps)
    on_chunk = chunks[-1]
    pairs, identical = [], True
    for _ in range(args.rounds):
        res = lockstep(model_dir, [0, on_chunk], args, long_prompt=False)
        identical &= res[0][0] == res[on_chunk][0]
        off_steps = [x["ms"] for x in res[0][1] if x["kind"] == "decode"]
        on_steps = [x["ms"] for x in res[on_chunk][1] if x["kind"] == "decode"]
        pairs += list(zip(off_steps[-args.decode_tokens // 2:], on_steps[-args.decode_tokens // 2:]))
    off = statistics.median(a for a, _ in pairs)
    on = statistics.median(b for _, b in pairs)
    ratios = sorted(a / b for a, b in pairs)
    cost = {"batch": args.batch, "chunk_on": on_chunk, "paired_steps": len(pairs),
            "decode_step_ms_off_median": off, "decode_step_ms_on_median": on,
            "throughput_ratio_on_vs_off_median": statistics.median(ratios),
            "throughput_ratio_p10_p90": [ratios[len(ratios) // 10], ratios[(9 * len(ratios)) // 10]],
            "greedy_tokens_identical": identical}
    print(f"decode step at batch {args.batch} (paired, same decode steps): off {off:.1f} ms, on (chunk {on_chunk}) "
          f"{on:.1f} ms -> throughput on/off {cost['throughput_ratio_on_vs_off_median']:.3f} "
          f"(p10-p90 of pairs {ratios[len(ratios) // 10]:.2f}-{ratios[(9 * len(ratios)) // 10]:.2f}); "
          f"greedy tokens identical: {identical}", flush=True)

    # 2. the stall a long prompt causes, per chunk size (all sizes stepping in turn)
    stall = {c: [] for c in chunks}
    for _ in range(args.rounds):
        for chunk, (_, samples) in lockstep(model_dir, chunks, args, long_prompt=True).items():
            stall[chunk].append(summarize_stall(samples))
    table = {}
    for chunk, runs in stall.items():
        row = {k: statistics.mean(x[k] for x in runs) for k in runs[0]}
        row["longest_step_ms_runs"] = [x["longest_step_ms"] for x in runs]
        table[str(chunk)] = row
        print(f"chunk {chunk or 'off':>4}: longest step {row['longest_step_ms']:.0f} ms "
              f"(runs {', '.join(f'{v:.0f}' for v in row['longest_step_ms_runs'])}), "
              f"{row['prompt_steps']:.0f} prompt step(s) of {row['prompt_step_ms_mean']:.0f} ms, "
              f"decode step {row['decode_step_ms_mean']:.0f} ms, long prompt TTFT {row['long_prompt_ttft_ms']:.0f} ms",
              flush=True)
    result = {"device": "cpu", "threads": args.threads, "model_dir": Path(model_dir).name, "date": time.strftime("%Y-%m-%d %H:%M"),
              "args": {**vars(args), "out": out.name, "model_dir": Path(model_dir).name}, "decode_cost": cost, "stall_by_chunk": table}
    write_result(out, result, indent=2)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["stall_by_chunk"]
    labels = [("off" if c == "0" else c) for c in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(labels, [table[c]["longest_step_ms"] for c in table], color="tab:orange")
    axes[0].set_xlabel("prefill chunk tokens")
    axes[0].set_ylabel("longest step = longest decode stall (ms)")
    axes[1].bar(labels, [table[c]["long_prompt_ttft_ms"] for c in table], color="tab:blue")
    axes[1].set_xlabel("prefill chunk tokens")
    axes[1].set_ylabel("long prompt: steps until its first token (ms)")
    fig.suptitle(f"Chunked prefill, batch {result['args']['batch']} decoding + one "
                 f"{result['args']['long_prompt']}-token prompt (CPU, {result['threads']} thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
