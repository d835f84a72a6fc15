#!/usr/bin/env python
"""Multi-LoRA decode throughput: CaraServe vs base-only vs HF transformers + PEFT, one run.

A batch of `--batch` requests spread over `--adapters` adapters (ranks cycling 8/16/32/64,
zipf popularity over the adapters), `--new-tokens` greedy decode steps:
- CaraServe with LoRA (offline engine API: LightLLM's llama + the LoRA kernels),
- the same batch base-only through CaraServe,
- HF transformers + PEFT, every adapter loaded into one PeftModel, mixed-adapter batched
  `generate(adapter_names=...)` on the same prompts.
Decode-phase tokens/s for each (HF: (time of N tokens - time of 1 token) / (N - 1) steps).
Writes `--out` JSON with `caraserve_lora_tokens_per_s`, `caraserve_base_tokens_per_s`,
`hf_peft_tokens_per_s`, `batch` and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from caraserve_router.contracts.configs import WEIGHT_LAYOUTS, LoRAConfig
from lightllm_patches.offline import OfflineEngine

RANKS = (8, 16, 32, 64)


def zipf_assignment(batch: int, num_adapters: int, alpha: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_adapters + 1) ** alpha
    return rng.choice(num_adapters, size=batch, p=weights / weights.sum()).tolist()


def prompts_for(batch: int, length: int) -> list[list[int]]:
    return [[1000 + (i * 131 + j * 17) % 28000 for j in range(length)] for i in range(batch)]


def engine_tokens_per_s(engine, prompts, names, steps) -> tuple[float, float]:
    times = []
    engine.run(prompts, names, steps, on_step=lambda kind, s: times.append(s) if kind == "decode" else None)
    step = statistics.median(times[2:])
    return len(prompts) / step, step * 1000


def _decode_tokens_per_s(generate, batch: int, steps: int) -> float:
    """(time of `steps` tokens - time of 1 token) / (steps - 1) decode steps."""
    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            generate(n)
        return time.perf_counter() - start

    timed(2)  # warm up
    one, full = timed(1), timed(steps)
    return batch * (steps - 1) / (full - one)


def hf_tokens_per_s(model_dir, adapter_dirs, prompts, names, steps) -> tuple[float, float]:
    """(HF transformers base-only, HF + PEFT mixed-adapter) decode tokens/s."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    base = _decode_tokens_per_s(lambda n: model.generate(max_new_tokens=n, min_new_tokens=n, **kw), len(prompts),
                                steps)
    peft = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=adapter_dirs[0].name)
    for d in adapter_dirs[1:]:
        peft.load_adapter(str(d), adapter_name=d.name)
    peft.eval()
    mixed = _decode_tokens_per_s(lambda n: peft.generate(max_new_tokens=n, min_new_tokens=n, adapter_names=names,
                                                         **kw), len(prompts), steps)
    return base, mixed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/lora.json", help="JSON output path")
    parser.add_argument("--model-dir", default="", help="model (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--adapters-dir", default=str(REPO / ".cache" / "bench_adapters"),
                        help="where the benchmark's adapters are made (reused if present)")
    parser.add_argument("--batch", type=int, default=32, help="concurrent requests")
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters")
    parser.add_argument("--targets", default="all", help="projections the adapters adapt (all, attn, qkv, ...)")
    parser.add_argument("--zipf", type=float, default=1.0, help="zipf exponent of adapter popularity")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps")
    parser.add_argument("--decode-kernel", default="mbgmv", choices=("mbgmv", "bgmv"), help="CaraServe decode kernel")
    parser.add_argument("--skip-hf", action="store_true", help="skip the HF+PEFT baseline (slow)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved base/LoRA rounds (best of each kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the popularity draw")
    parser.add_argument("--cpu-weight-layout", default="lightllm", choices=sorted(WEIGHT_LAYOUTS),
                        help="CaraServe engine's base weight layout on the CPU (see InstanceConfig)")
    args = parser.parse_args()
    from caraserve_router.assets.demo_adapters import make_random_adapter
    from caraserve_router.assets.model_prep import prepare_default_model

    model_dir = args.model_dir or str(prepare_default_model())
    root = Path(args.adapters_dir)
    dirs = []
    for i in range(args.adapters):
        d = root / f"{args.targets}-r{RANKS[i % 4]}-{i}"
        if not (d / "adapter_model.safetensors").exists():
            make_random_adapter(model_dir, d, rank=RANKS[i % 4], target_modules=args.targets, seed=i, overwrite=True)
        dirs.append(d)
    picks = zipf_assignment(args.batch, args.adapters, args.zipf, args.seed)
    names = [dirs[i].name for i in picks]
    prompts = prompts_for(args.batch, args.prompt_len)
    print(f"{args.batch} requests over {len(set(names))} distinct adapters (zipf {args.zipf}); ranks in batch: "
          f"{sorted(RANKS[i % 4] for i in picks)}", flush=True)
    pool_mb = sum(RANKS[i % 4] for i in range(args.adapters)) * 1.3 + 64
    engine = OfflineEngine(model_dir, lora=LoRAConfig(mode="cached", pool_mb=pool_mb, decode_kernel=args.decode_kernel),
                           adapters={d.name: d for d in dirs},
                           max_total_tokens=args.batch * (args.prompt_len + args.new_tokens) + 64,
                           max_seq=args.prompt_len + args.new_tokens + 8, max_req=args.batch + 8,
                           cpu_weight_layout=args.cpu_weight_layout)
    base_runs, lora_runs = [], []
    try:
        for _ in range(args.rounds):  # interleaved, best of each: this machine is noisy
            base_runs.append(engine_tokens_per_s(engine, prompts, [None] * args.batch, args.new_tokens))
            lora_runs.append(engine_tokens_per_s(engine, prompts, names, args.new_tokens))
    finally:
        engine.close()
    base_tps, base_ms = max(base_runs)
    lora_tps, lora_ms = max(lora_runs)
    print(f"CaraServe base-only: {base_tps:.1f} tok/s ({base_ms:.1f} ms/step)", flush=True)
    print(f"CaraServe LoRA:      {lora_tps:.1f} tok/s ({lora_ms:.1f} ms/step); LoRA costs "
          f"{1 - lora_tps / base_tps:.1%} of base throughput", flush=True)
    result = {"batch": args.batch, "caraserve_lora_tokens_per_s": lora_tps, "caraserve_base_tokens_per_s": base_tps,
              "lora_cost_fraction": 1 - lora_tps / base_tps, "distinct_adapters": len(set(names)),
              "targets": args.targets, "decode_kernel": args.decode_kernel, "new_tokens": args.new_tokens,
              "cpu_weight_layout": args.cpu_weight_layout,
              "prompt_len": args.prompt_len, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M")}
    if not args.skip_hf:
        hf_base, hf = hf_tokens_per_s(model_dir, dirs, prompts, names, args.new_tokens)
        result.update(hf_peft_tokens_per_s=hf, hf_base_tokens_per_s=hf_base, speedup_over_hf_peft=lora_tps / hf)
        print(f"HF base-only:        {hf_base:.1f} tok/s", flush=True)
        print(f"HF + PEFT:           {hf:.1f} tok/s; CaraServe with LoRA is {lora_tps / hf:.2f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
