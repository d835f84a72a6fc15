#!/usr/bin/env python
"""Multi-LoRA generation throughput: CaraServe vs HF transformers + PEFT, measured the same way.

A batch of `--batch` requests spread over `--adapters` adapters (ranks cycling 8/16/32/64,
zipf popularity over the adapters); every engine generates the *same requests end to end*:
one prefill of the prompts and `--new-tokens` greedy decode steps (`--new-tokens` + 1 tokens
per request):
- CaraServe with LoRA (offline engine API: LightLLM's llama + the LoRA kernels), and base-only;
- HF transformers + PEFT, every adapter loaded into one PeftModel, mixed-adapter batched
  `generate(adapter_names=...)`, and HF base-only.
Rounds are interleaved (the order rotates every round) and every engine gets the same
statistic: the median wall time of its rounds (tokens/s = batch x tokens / time); each round's
value is kept in the JSON as the noise. The greedy tokens of CaraServe and HF+PEFT are compared.
Writes `--out` JSON with `caraserve_lora_tokens_per_s`, `caraserve_base_tokens_per_s`,
`hf_peft_tokens_per_s`, `hf_base_tokens_per_s`, `speedup_over_hf_peft`, `batch`.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]

from caraserve_router.contracts.configs import WEIGHT_LAYOUTS, LoRAConfig
from lightllm_patches.offline import OfflineEngine
from common import add_server_arguments, write_result

RANKS = (8, 16, 32, 64)


def zipf_assignment(batch: int, num_adapters: int, alpha: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_adapters + 1) ** alpha
    return rng.choice(num_adapters, size=batch, p=weights / weights.sum()).tolist()


def prompts_for(batch: int, length: int) -> list[list[int]]:
    return [[1000 + (i * 131 + j * 17) % 28000 for j in range(length)] for i in range(batch)]


def caraserve_generate(engine, prompts, names, steps):
    """Greedy tokens [batch][steps + 1] of one end-to-end run (prefill + `steps` decode steps)."""
    logits = engine.run(prompts, names, steps)
    return [[int(step[i].argmax()) for step in logits] for i in range(len(prompts))]


def hf_models(model_dir, adapter_dirs):
    """(HF base model, HF + PEFT with every adapter loaded)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(peft_base, str(adapter_dirs[0]), adapter_name=adapter_dirs[0].name)
    for d in adapter_dirs[1:]:
        peft.load_adapter(str(d), adapter_name=d.name)
    return base, peft.eval()


def hf_generate(model, prompts, names, steps):
    ids = torch.tensor(prompts)
    kw = {"adapter_names": names} if names is not None else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                             max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
    return out[:, ids.shape[1]:].tolist()


def caraserve_generate_fn(engine, prompts, names, steps):
    return lambda: caraserve_generate(engine, prompts, names, steps)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


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
    add_server_arguments(parser, LoRAConfig(), ("decode_kernel",))  # CaraServe's --lora-decode-kernel, here unprefixed
    parser.add_argument("--skip-hf", action="store_true", help="skip the HF+PEFT baseline (slow)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine, interleaved (median kept)")
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
                           cpu_weight_layout=args.cpu_weight_layout, shm_prefix="csbench_lora")
    runs = {"caraserve_lora": caraserve_generate_fn(engine, prompts, names, args.new_tokens),
            "caraserve_base": caraserve_generate_fn(engine, prompts, [None] * args.batch, args.new_tokens)}
    if not args.skip_hf:
        hf_base, hf_peft = hf_models(model_dir, dirs)
        runs["hf_peft"] = lambda: hf_generate(hf_peft, prompts, names, args.new_tokens)
        runs["hf_base"] = lambda: hf_generate(hf_base, prompts, None, args.new_tokens)
    order = list(runs)
    times = {k: [] for k in runs}
    tokens = {}
    try:
        for name in order:  # warm-up round, not timed
            tokens[name] = runs[name]()
        for r in range(args.rounds):  # interleaved, the order rotated every round: this machine is noisy
            for name in order[r % len(order):] + order[: r % len(order)]:
                seconds, _ = timed(runs[name])
                times[name].append(seconds)
    finally:
        engine.close()
    per_request = args.new_tokens + 1
    tps = {k: args.batch * per_request / statistics.median(v) for k, v in times.items()}
    result = {"batch": args.batch, "tokens_per_request": per_request, "statistic": "median end-to-end generation "
              "time over interleaved rounds (prefill + decode steps), same for every engine",
              "rounds": args.rounds, "round_seconds": times,
              "caraserve_lora_tokens_per_s": tps["caraserve_lora"], "caraserve_base_tokens_per_s": tps["caraserve_base"],
              "lora_cost_fraction": 1 - tps["caraserve_lora"] / tps["caraserve_base"],
              "distinct_adapters": len(set(names)), "targets": args.targets, "decode_kernel": args.decode_kernel,
              "new_tokens": args.new_tokens, "cpu_weight_layout": args.cpu_weight_layout, "prompt_len": args.prompt_len,
              "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M")}
    for name in order:
        spread = ", ".join(f"{args.batch * per_request / t:.0f}" for t in times[name])
        print(f"{name:<15} {tps[name]:8.1f} tok/s (median of {args.rounds}; rounds: {spread})", flush=True)
    if not args.skip_hf:
        same = sum(a == b for x, y in zip(tokens["caraserve_lora"], tokens["hf_peft"]) for a, b in zip(x, y))
        result.update(hf_peft_tokens_per_s=tps["hf_peft"], hf_base_tokens_per_s=tps["hf_base"],
                      speedup_over_hf_peft=tps["caraserve_lora"] / tps["hf_peft"],
                      speedup_base_over_hf_base=tps["caraserve_base"] / tps["hf_base"],
                      greedy_tokens_equal_to_hf_peft=same / (args.batch * per_request))
        print(f"CaraServe with LoRA is {tps['caraserve_lora'] / tps['hf_peft']:.2f}x HF + PEFT (same requests, same "
              f"statistic); greedy tokens equal to HF+PEFT's: {100 * same / (args.batch * per_request):.1f}%",
              flush=True)
    write_result(Path(args.out), result, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
