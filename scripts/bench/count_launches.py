#!/usr/bin/env python3
"""Kernel launches of one decode step on the GPU path, counted on the CPU (TRITON_INTERPRET=1).

The engine runs LightLLM's llama Triton kernels (the CUDA op set of lightllm_patches/llama_ops.py)
and CaraServe's Triton LoRA kernels under the Triton interpreter on CPU tensors, fp16, so the
kernels and torch operators a decode step issues are those it issues on a GPU. Counted per
decode step and per layer (the first layer's `token_forward`):

- `triton`: Triton kernel launches (by kernel name; `lora` = CaraServe's shrink / expand);
- `torch`: torch operators that launch work (views, reshapes and other metadata-only ops are
  not counted: on a GPU they launch nothing);
- `host_syncs`: operators that wait for the device (`.item()` / `int()` of a tensor: aten
  `_local_scalar_dense`; `nonzero`, whose output size is read on the host).

`step` counts everything the step runs, including the host-side tensor work of its set-up
(descriptors built on the host, the KV allocator): on the CPU those cannot be told apart from
device work. `graph_body` is what a graph captures (on a GPU: one replay launch).

Three paths over the same batch (rows with all-seven adapters of mixed ranks, base rows):
`eager_before` (the q|k|v delta through a scratch tensor and two adds: the route before
issue 21), `eager` (the expand accumulating into q and the KV staging rows), `graph` (the body a
CUDA graph captures, `lightllm_patches.cuda_graph`; base and LoRA). A graph replays its
launches without Python, so on a GPU its host cost per step is one replay.

    TRITON_INTERPRET=1 python scripts/bench/count_launches.py --out /tmp/launches.json
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (the Triton kernels must be interpreted on the CPU)")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu as bench_gpu  # noqa: E402 - RandomWeightLlama, the model and adapter writers
import kernels.decode_step as decode_step  # noqa: E402
from caraserve_router.contracts.configs import LoRAConfig  # noqa: E402
from caraserve_router.lora.shapes import ModelShapes  # noqa: E402
from lightllm_patches import cuda_graph, llama_ops  # noqa: E402
from lightllm_patches.cuda_graph import DecodeGraphRunner  # noqa: E402
from lightllm_patches.model import CaraPostLayerInfer  # noqa: E402
from lightllm_patches.offline import OfflineEngine  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=256)  # head_dim 64 (LightLLM's attention wants 16..256)
LORA_KERNELS = ("_shrink_kernel", "_expand_kernel")
# aten ops that only make views or read metadata: no launch on a GPU
NO_LAUNCH = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "expand", "as_strided", "detach", "alias",
             "unsqueeze", "squeeze", "permute", "reshape", "split", "split_with_sizes", "unbind", "narrow",
             "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty", "is_same_size", "sym_size",
             "sym_stride", "sym_numel", "sym_storage_offset", "_reshape_alias", "set_", "contiguous"}
SYNCS = {"_local_scalar_dense", "nonzero"}


class Counts:
    def __init__(self):
        self.torch, self.triton, self.syncs = collections.Counter(), collections.Counter(), collections.Counter()
        self.in_triton = 0

    def summary(self) -> dict:
        lora = sum(self.triton[k] for k in LORA_KERNELS)
        return {"launches": sum(self.torch.values()) + sum(self.triton.values()), "torch": sum(self.torch.values()),
                "triton": sum(self.triton.values()), "lora": lora, "host_syncs": sum(self.syncs.values()),
                "syncs_by_op": dict(self.syncs), "triton_by_kernel": dict(self.triton), "torch_by_op": dict(self.torch)}


class _Mode(TorchDispatchMode):
    def __init__(self, counts_stack):
        super().__init__()
        self.stack = counts_stack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        for c in self.stack:
            if c.in_triton:
                continue
            if name in SYNCS:
                c.syncs[name] += 1
            if name not in NO_LAUNCH and name not in SYNCS:
                c.torch[name] += 1
        return func(*args, **(kwargs or {}))


class Counter:
    """Counts launches while a `count()` block runs (nested blocks count into each)."""

    def __init__(self):
        self.stack: list[Counts] = []
        real_run = InterpretedFunction.run
        counter = self

        def run(fn_self, *args, **kwargs):
            for c in counter.stack:
                c.triton[fn_self.fn.__name__] += 1
                c.in_triton += 1
            try:
                return real_run(fn_self, *args, **kwargs)
            finally:
                for c in counter.stack:
                    c.in_triton -= 1

        InterpretedFunction.run = run

    @contextmanager
    def count(self):
        c = Counts()
        self.stack.append(c)
        mode = _Mode(self.stack) if len(self.stack) == 1 else None
        try:
            if mode is not None:
                with mode:
                    yield c
            else:
                yield c
        finally:
            self.stack.remove(c)


def use_cuda_ops(model) -> None:
    """The GPU's op set (LightLLM's Triton kernels) on this CPU model."""
    ops = llama_ops._OPS_FACTORIES["cuda"]()
    model.ops = ops
    CaraPostLayerInfer.ops = ops
    for layer in model.layers_infer:
        layer.bind_ops(ops)


def measure(rows: int = 4, layers: int = 2) -> dict:
    config = dict(TINY, num_hidden_layers=layers)
    shapes = ModelShapes.from_config(config)
    counter = Counter()
    with tempfile.TemporaryDirectory(prefix="count_launches_") as tmp:
        root = Path(tmp)
        model_dir = bench_gpu.write_model_dir(root / "model", config)
        adapters = {**bench_gpu.write_qkv_adapters(root / "a", shapes, 2, 8, "cpu", bench_gpu.ALL_SEVEN),
                    **bench_gpu.write_qkv_adapters(root / "b", shapes, 1, 4, "cpu", bench_gpu.ALL_SEVEN)}
        names = list(adapters)
        lora = LoRAConfig(mode="cached", pool_mb=4, max_rank=8, link_bandwidth_mbps=1e5)
        engine = OfflineEngine(model_dir, dtype="float16", lora=lora, adapters=adapters, max_seq=64, max_req=16,
                               max_total_tokens=1024, model_class=bench_gpu.RandomWeightLlama)
        try:
            use_cuda_ops(engine.model)
            runtime = engine.runtime
            runtime.step_context = dataclasses.replace(runtime.step_context, kernel_backend="triton")
            prompts = [[(5 * i + j) % 200 + 3 for j in range(6 + i)] for i in range(rows)]
            row_names = [names[i % len(names)] if i % 4 != 3 else None for i in range(rows)]
            result = {"rows": rows, "layers": layers, "dtype": "float16", "model": config,
                      "adapters": "all seven modules, ranks 8 and 4; every fourth row base"}
            logits = {}
            for label in ("eager_before", "eager", "graph_lora", "graph_base"):
                engine.graphs = None
                if label.startswith("graph"):
                    engine.graphs = DecodeGraphRunner(engine.model, runtime.step_context, max_batch=8)
                step_names = [None] * rows if label == "graph_base" else row_names
                logits[label], result[label] = _one_decode_step(engine, counter, prompts, step_names,
                                                                scratch=label == "eager_before")
            result["graph_matches_eager"] = bool((logits["graph_lora"].argmax(-1) == logits["eager"].argmax(-1)).all())
            result["graph_max_abs_diff"] = float((logits["graph_lora"] - logits["eager"]).abs().max())
        finally:
            engine.close()
    groups = 4
    for label in ("eager_before", "eager", "graph_lora"):
        r = result[label]
        r["lora_launches_per_layer_group"] = r["layer"]["lora"] / groups
    return result


def _one_decode_step(engine, counter: Counter, prompts, names, scratch: bool):
    """Counts of the decode step after the prefill (the step, and its first layer alone)."""
    model = engine.model
    layer0 = model.layers_infer[0]
    real_layer = layer0.token_forward
    real_split = decode_step.DecodeStep.split
    recorded = {}

    def counted_layer(*args, **kwargs):
        with counter.count() as c:
            out = real_layer(*args, **kwargs)
        recorded["layer"] = c.summary()
        return out

    def scratch_split(self, x, W, out_lo, out_hi):  # the route before issue 21
        delta = torch.zeros((self.rows, self.out_features), dtype=x.dtype, device=x.device)
        self(x, W, delta)
        out_lo.add_(delta[:, : out_lo.shape[1]])
        out_hi.add_(delta[:, out_lo.shape[1]:])

    real_replay = cuda_graph._DirectCall.replay

    def counted_replay(self):  # what a CUDA graph captures (on a GPU: replayed in one launch)
        with counter.count() as c:
            real_replay(self)
        recorded["graph_body"] = c.summary()

    real_step = engine._step

    def step(kwargs, reqs, on_step):
        if kwargs["is_prefill"]:
            return real_step(kwargs, reqs, on_step)
        layer0.token_forward = counted_layer
        try:
            with counter.count() as c:
                out = real_step(kwargs, reqs, on_step)
        finally:
            layer0.token_forward = real_layer
        recorded["step"] = c.summary()
        return out

    engine._step = step
    cuda_graph._DirectCall.replay = counted_replay
    if scratch:
        decode_step.DecodeStep.split = scratch_split
    try:
        out = engine.run(prompts, names, steps=1)
    finally:
        engine._step = real_step
        cuda_graph._DirectCall.replay = real_replay
        decode_step.DecodeStep.split = real_split
    counts = {"step": _brief(recorded["step"]), "layer": _brief(recorded["layer"])}
    if "graph_body" in recorded:
        counts["graph_body"] = _brief(recorded["graph_body"])
    return out[1], counts


def _brief(summary: dict) -> dict:
    return {k: summary[k] for k in ("launches", "torch", "triton", "lora", "host_syncs", "syncs_by_op",
                                    "triton_by_kernel", "torch_by_op")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON result (default: stdout only)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    result = measure(args.rows, args.layers)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({k: {"step": v["step"]["launches"], "layer": v["layer"]["launches"],
                          "graph_body": v["graph_body"]["launches"] if "graph_body" in v else None,
                          "lora_per_group": v.get("lora_launches_per_layer_group"),
                          "host_syncs_step": v["step"]["syncs_by_op"]}
                      for k, v in result.items() if isinstance(v, dict) and "step" in v}, indent=1))
    return result


if __name__ == "__main__":
    main()
