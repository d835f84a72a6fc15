"""The `steps` part of scripts/bench/gpu.py: decode step times, CUDA graphs on and off, against the
weights-only floor measured on the same device.

JSON (`steps`), so results stay comparable between runs:

    floor_ms                       model weight bytes / the device's measured read bandwidth
    bandwidth_gbps, weight_bytes   what floor_ms is made of
    decode.graphs / decode.eager   keyed by batch size as a string ("1", "8", "32", "64"), each
                                   {base, lora, lora_all16} of {median_ms, min_ms, max_ms}:
                                   base: no adapter; lora: rows over >= 8 distinct rank-64 q,k,v
                                   adapters; lora_all16: rows over rank-16 adapters on all seven
                                   projections; plus lora_over_base
    prefill                        the prompt batch's time, base and lora (eager)
    launches                       dry run on the CPU: scripts/bench/count_launches.py's counts

A decode step's time is (a run with S decode steps - the same run with none) / S, medians over
repeats, synchronised at both ends; graphs and eager use separate engines over the same weights
(drawn from one seed). On the CPU (dry run) the graph engine runs the graph path's static
buffers with the capture replaced by a direct call (`graph_emulation`): its times say nothing,
its launch counts do.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def measure_floor(engine, device, repeats: int = 10) -> dict:
    """The weights-only floor: every weight byte of the model read once at the device's read
    bandwidth, measured by summing a 1 GiB buffer (CUDA events; a small buffer on the CPU)."""
    model = engine.model
    tensors = [t for w in [model.pre_post_weight, *model.trans_layers_weight] for t in vars(w).values()
               if isinstance(t, torch.Tensor) and t.device.type == device.type]
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    n = (2**30 if device.type == "cuda" else 2**24) // 2
    buf = torch.ones(n, dtype=torch.float16, device=device)
    samples = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        buf.sum(dtype=torch.float32)
        _sync(device)
        if i >= 2:
            samples.append(time.perf_counter() - t0)
    seconds = sorted(samples)[len(samples) // 2]
    bandwidth = buf.numel() * buf.element_size() / seconds  # bytes / s
    del buf
    return {"floor_ms": weight_bytes / bandwidth * 1e3, "bandwidth_gbps": bandwidth / 1e9, "weight_bytes": weight_bytes}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_times(engine, device, timed_run, summary, batches, row_sets: dict, repeats: int, steps: int) -> dict:
    """{str(batch): {label: summary of per-step ms}} for every row set (label -> adapter names, or
    None for base rows)."""
    out = {}
    for batch in batches:
        prompts = [[(3 * i + j) % 500 + 3 for j in range(64)] for i in range(batch)]
        row = {}
        for label, names in row_sets.items():
            rows = [None] * batch if names is None else [names[i % len(names)] for i in range(batch)]
            with_steps, without = [], []
            for _ in range(repeats + 1):  # the first is a warm-up (captures a graph variant on first use)
                without.append(timed_run(engine, device, prompts, rows, 0))
                with_steps.append(timed_run(engine, device, prompts, rows, steps))
            row[label] = summary([(w - p) / steps for w, p in zip(with_steps[1:], without[1:])])
        row["lora_over_base"] = row["lora"]["median_ms"] / row["base"]["median_ms"]
        out[str(batch)] = row
    return out


def count_launches_dry() -> dict:
    """scripts/bench/count_launches.py in a child process (TRITON_INTERPRET must be set before Triton is
    imported): the launch counts per step and per layer, before and after."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"count_launches_{os.getpid()}.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "count_launches.py"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    result = json.loads(out.read_text())
    out.unlink()
    for path in ("eager_before", "eager", "graph_lora", "graph_base"):  # the per-op tables stay in the script's own JSON
        for part in result[path].values():
            if isinstance(part, dict):
                part.pop("torch_by_op", None)
    return result


def bench(make_engine, device, timed_run, summary, log, qkv_names, all16_names, *, dry: bool, repeats: int,
          steps: int, batches) -> dict:
    """The steps part: `make_engine(cuda_graphs)` builds an engine with both adapter sets."""
    row_sets = {"base": None, "lora": qkv_names, "lora_all16": all16_names}
    result = {"decode": {}, "batches": list(batches), "decode_steps": steps, "repeats": repeats,
              "adapters": {"lora": f"{len(qkv_names)} distinct rank-64 q,k,v", "lora_all16":
                           f"{len(all16_names)} distinct rank-16 on all seven projections"}}
    captured = False
    for label, graphs in (("graphs", True), ("eager", False)):
        engine = make_engine(graphs)
        try:
            if label == "eager":
                result.update(measure_floor(engine, device))
                prompts = [[(7 * i + j) % 500 + 3 for j in range(16 if dry else 256)] for i in range(2 if dry else 4)]
                result["prefill"] = {
                    lab: summary([timed_run(engine, device, prompts, [None if n is None else n[0]] * len(prompts), 0)
                                  for _ in range(repeats + 1)][1:]) for lab, n in row_sets.items()}
            if graphs:
                captured = engine.graphs is not None and engine.graphs.capture  # CPU: direct calls
                result["graph_emulation"] = engine.graphs is not None and not engine.graphs.capture
                result["graph_buckets"] = engine.graphs.buckets if engine.graphs is not None else []
            result["decode"][label] = decode_times(engine, device, timed_run, summary, batches, row_sets, repeats,
                                                   steps)
            if graphs and engine.graphs is not None:
                result["graph_counters"] = dict(engine.graphs.counters)
        finally:
            engine.close()
            engine.model = engine.runtime = engine.graphs = None
        for b, row in result["decode"][label].items():
            log(f"decode {label} batch {b}: base {row['base']['median_ms']:.2f} ms, lora {row['lora']['median_ms']:.2f}, "
                f"lora_all16 {row['lora_all16']['median_ms']:.2f}")
    log(f"floor {result['floor_ms']:.2f} ms ({result['weight_bytes'] / 1e9:.2f} GB at {result['bandwidth_gbps']:.0f} GB/s)")
    if dry:
        result["launches"] = count_launches_dry()
    return {"steps": result, "cuda_graphs": captured}
