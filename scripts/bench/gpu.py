#!/usr/bin/env python3
"""GPU benchmarks on a Llama-2-7B-shaped model with random fp16 weights built on the device.

Nothing is downloaded: the weights are drawn on the device, the adapters (rank 64 on q, k, v:
the paper's setting) are written as PEFT files from tensors drawn there. Four parts, each
measured side by side in one run (medians over repeats; CUDA events on the GPU):

1. kernels: shrink + expand of the qkv group (4096 -> 3 x 4096) for decode (bgmv, mbgmv) and
   prefill (sgmv) against a per-adapter torch loop (gather the rows of each adapter, two
   matmuls per slice, scatter-add), every row its own adapter.
2. steps: the weights-only floor measured on the device, prefill, and decode step times at
   batches 1 / 8 / 32 / 64 with CUDA graphs and eagerly, without adapters, with rank-64 qkv
   adapters and with rank-16 adapters on all seven projections (gpu_steps.py: the JSON
   shape); the dry run adds the launch counts per step and layer (count_launches.py).
3. coldstart: time to first token of one request whose adapter is not on the device, per
   LoRA mode (on-demand, pipeline, cpu-assist) on the real host->device link, against cached.
4. sidecar: the CPU sidecar's synchronisation round trip and one CUDA-path call (device->host
   x, workers, host->device delta) per size.

    python scripts/bench/gpu.py --out results/bench_gpu.json              # on the GPU machine
    python scripts/bench/gpu.py --device cpu --dry-run --out /tmp/b.json  # rehearsal, tiny shapes

On the CPU (`--device cpu`) the link is the emulated one and the JSON says so ("emulated").
`--layers` below 32 shortens the model (the JSON records it); `--budget-s` skips what would not
fit (listed under "skipped"). The JSON is rewritten after every part.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import gpu_steps  # scripts/bench/: the steps part
import kernels
import lightllm_patches  # noqa: F401 - patches LightLLM before any of its modules is imported
from caraserve_router.assets.llama_layout import expected_shapes, write_llama_config
from caraserve_router.contracts.configs import LoRAConfig, SidecarConfig
from caraserve_router.lora.shapes import MODULE_PARENT, ModelShapes
from lightllm.models.llama.model import LlamaTpPartModel
from lightllm_patches.model import CaraLlamaModel, CaraTransformerLayerWeight
from lightllm_patches.offline import OfflineEngine

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
DRY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, vocab_size=512)
QKV = ("q_proj", "k_proj", "v_proj")
ALL_SEVEN = QKV + ("o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("cpu-assist", "pipeline", "on-demand")  # CaraServe first: the budget may cut the last


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class DeviceDrawnLayerWeight(CaraTransformerLayerWeight):
    """Overrides `BaseLayerWeight._try_cat_to` (LightLLM 0.0.1) for the bench's weights only.

    Upstream asserts that the parts it fuses (k + v, gate + up) are host tensors, concatenates them
    on the host and then copies the result to the device. The bench draws its weights on the
    device, so they are concatenated there: no 7.7 GB round trip through host memory per engine.
    """

    def _try_cat_to(self, source_tensor_names, dest_name, cat_dim, handle_func=None):
        with self.lock:
            if not all(hasattr(self, name) for name in source_tensor_names) or hasattr(self, dest_name):
                return
            fused = torch.cat([getattr(self, name) for name in source_tensor_names], dim=cat_dim)
            setattr(self, dest_name, handle_func(fused) if handle_func is not None else self._cuda(fused))
            for name in source_tensor_names:
                delattr(self, name)


class RandomWeightLlama(CaraLlamaModel):
    """CaraLlamaModel whose weights are drawn on its device (N(0, 0.02), norms 1) instead of read
    from safetensors; LightLLM's own weight classes load them from that dict as from a file."""

    transformer_weight_class = DeviceDrawnLayerWeight

    def _init_weights(self):
        self.transformer_weight_class.device = self.device
        self.pre_and_post_weight_class.device = self.device
        g = torch.Generator(device=self.device).manual_seed(0)
        self.weight_dict = {
            name: (torch.ones(shape, dtype=self.data_type, device=self.device) if name.endswith("norm.weight") else
                   0.02 * torch.randn(shape, generator=g, dtype=self.data_type, device=self.device))
            for name, shape in expected_shapes(self.config).items()}
        LlamaTpPartModel._init_weights(self)  # upstream: build the weight objects, load the dict
        self.weight_dict = None


# ---- timing --------------------------------------------------------------------------------------

class Timer:
    """Median milliseconds of `fn` over `repeats` calls after `warmup`: CUDA events on the GPU,
    perf_counter on the CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 3):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return summary(samples)


def summary(samples_ms: list) -> dict:
    samples_ms = sorted(samples_ms)
    return {"median_ms": statistics.median(samples_ms), "min_ms": samples_ms[0], "max_ms": samples_ms[-1],
            "n": len(samples_ms)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. kernels ----------------------------------------------------------------------------------

class KernelCase:
    """One qkv-group batch in the pool layout the engine uses (docs/DESIGN.md): every row
    (decode) or segment (prefill) its own adapter, of rank `ranks[i]`, every slice targeted.
    The loop baseline holds each adapter's A and B as its own dense tensors (what a per-adapter
    implementation keeps) with the same values."""

    def __init__(self, shapes: ModelShapes, ranks: list, seg_len: int, dtype, device, gen):
        g = shapes.group("qkv")
        self.slices, self.in_f, self.out_total = g.num_slices, g.in_features, g.out_total
        self.rows, self.seg_len, rank = len(ranks), seg_len, max(ranks)
        unit = math.gcd(g.in_features, *g.out_features)
        widths = {"A": g.in_features // unit, **{s: o // unit for s, o in enumerate(g.out_features)}}
        cursor = max(widths.values())  # units 0..: the zero row padded bgmv rows read
        a_rows = torch.full((self.rows, self.slices, rank), -1, dtype=torch.int32)
        b_rows = torch.full((self.rows, self.slices, rank), -1, dtype=torch.int32)
        for i, r in enumerate(ranks):
            for s in range(self.slices):
                for table, width in ((a_rows, widths["A"]), (b_rows, widths[s])):
                    cursor = -(-cursor // width) * width  # a row starts at a multiple of its width
                    table[i, s, :r] = torch.arange(cursor, cursor + r * width, width, dtype=torch.int32)
                    cursor += r * width
        flat = torch.randn(cursor * unit, generator=gen, device=device)
        flat[: max(widths.values()) * unit] = 0.0
        self.W = (flat / self.in_f ** 0.5).to(dtype).view(cursor, unit)  # A rows ~ N(0, 1/IN), B rows small
        self.ranks = torch.tensor([[r] * self.slices for r in ranks], dtype=torch.int32, device=device)
        self.a_rows, self.b_rows = a_rows.to(device), b_rows.to(device)
        self.padded = kernels.pad_to_max_rank(self.a_rows, self.b_rows, self.ranks, 0)
        self.scales = torch.ones(self.rows, self.slices, device=device)
        self.offsets = torch.tensor(g.slice_offsets, dtype=torch.int32, device=device)
        tokens = self.rows * seg_len
        self.seg_starts = torch.arange(0, tokens + 1, seg_len, dtype=torch.int32, device=device)
        self.x = torch.randn(tokens, self.in_f, generator=gen, device=device).to(dtype)
        self.out = torch.zeros(tokens, self.out_total, dtype=dtype, device=device)
        self.y = torch.empty(tokens, self.slices, rank, device=device)
        cpu = device.type == "cpu"
        self.plan = kernels.plan_rows(self.a_rows, self.b_rows, self.ranks) if cpu else None
        self.padded_plan = kernels.plan_rows(*self.padded) if cpu else None
        # per-adapter dense copies for the loop: A [S, r, IN], B [S, r, OUT_s]
        rows_of = lambda table, i, s, r, width: self.W.view(-1)[  # noqa: E731
            (table[i, s, :r].long()[:, None] * unit + torch.arange(width, device=device)[None, :])]
        self.dense = [(torch.stack([rows_of(self.a_rows, i, s, r, self.in_f) for s in range(self.slices)]),
                       [rows_of(self.b_rows, i, s, r, g.out_features[s]) for s in range(self.slices)])
                      for i, r in enumerate(ranks)]
        self.cols = [slice(a, b) for a, b in zip(g.slice_offsets[:-1], g.slice_offsets[1:])]

    def mbgmv(self):
        kernels.mbgmv_shrink(self.x, self.W, self.a_rows, self.ranks, self.y, plan=self.plan)
        kernels.mbgmv_expand(self.y, self.W, self.b_rows, self.ranks, self.scales, self.offsets, self.out,
                             plan=self.plan)

    def bgmv(self):
        """Punica's bgmv: mbgmv over descriptors padded to the batch's max rank."""
        a_rows, b_rows, ranks = self.padded
        kernels.mbgmv_shrink(self.x, self.W, a_rows, ranks, self.y, plan=self.padded_plan)
        kernels.mbgmv_expand(self.y, self.W, b_rows, ranks, self.scales, self.offsets, self.out,
                             plan=self.padded_plan)

    def sgmv(self):
        kernels.sgmv_shrink(self.x, self.W, self.seg_starts, self.a_rows, self.ranks, self.y)
        kernels.sgmv_expand(self.y, self.W, self.seg_starts, self.b_rows, self.ranks, self.scales, self.offsets,
                            self.out)

    def agreement(self, paths) -> dict:
        """Max |path - loop| of one call from a zeroed output, over max |loop| (a benchmark of a
        wrong result is worthless: checked before timing)."""
        outs = {}
        for path in ["loop", *paths]:
            self.out.zero_()
            getattr(self, path)()
            outs[path] = self.out.float().clone()
        scale = float(outs["loop"].abs().max())
        return {path: float((outs[path] - outs["loop"]).abs().max()) / max(scale, 1e-6) for path in paths}

    def loop(self):
        """The baseline: per adapter, its rows' x @ A_s^T @ B_s per slice, added back."""
        for i, (a, bs) in enumerate(self.dense):
            rows = slice(i * self.seg_len, (i + 1) * self.seg_len)
            x = self.x[rows]
            for s, cols in enumerate(self.cols):
                self.out[rows, cols] += (x @ a[s].t()) @ bs[s]


def _warn_if_apart(row: dict, limit: float = 2e-2) -> None:
    for path, err in row["rel_error_vs_loop"].items():
        if err > limit:
            log(f"WARNING: {path} differs from the loop by {err:.2e} (relative) in {row['phase']} case {row}")


def bench_kernels(shapes, dtype, device, timer, batches, ranks, prefill) -> list:
    """Decode: for each batch size, every row at one rank, and "mixed" (ranks drawn from `ranks`)."""
    gen = torch.Generator(device=device).manual_seed(0)
    draw = torch.Generator().manual_seed(1)
    results = []
    for rows in batches:
        for rank in list(ranks) + ["mixed"]:
            row_ranks = ([ranks[int(k)] for k in torch.randint(len(ranks), (rows,), generator=draw)]
                         if rank == "mixed" else [rank] * rows)
            case = KernelCase(shapes, row_ranks, 1, dtype, device, gen)
            row = {"phase": "decode", "rows": rows, "rank": rank, "ranks": row_ranks,
                   "rel_error_vs_loop": case.agreement(["mbgmv", "bgmv"])}
            for name in ("loop", "mbgmv", "bgmv"):
                row[name] = timer(getattr(case, name))
            row["mbgmv_speedup"] = row["loop"]["median_ms"] / row["mbgmv"]["median_ms"]
            _warn_if_apart(row)
            results.append(row)
            log(f"decode rows {rows} rank {rank}: loop {row['loop']['median_ms']:.3f} ms, "
                f"mbgmv {row['mbgmv']['median_ms']:.3f}, bgmv {row['bgmv']['median_ms']:.3f}")
    for segments, seg_len in prefill:
        case = KernelCase(shapes, [64] * segments, seg_len, dtype, device, gen)
        row = {"phase": "prefill", "segments": segments, "tokens_per_segment": seg_len, "rank": 64,
               "rel_error_vs_loop": case.agreement(["sgmv"]), "loop": timer(case.loop), "sgmv": timer(case.sgmv)}
        row["sgmv_speedup"] = row["loop"]["median_ms"] / row["sgmv"]["median_ms"]
        _warn_if_apart(row)
        results.append(row)
        log(f"prefill {segments} x {seg_len}: loop {row['loop']['median_ms']:.3f} ms, sgmv {row['sgmv']['median_ms']:.3f}")
    return results


# ---- model, adapters, engines -----------------------------------------------------------------

def write_model_dir(path: Path, config: dict) -> Path:
    """config.json only: RandomWeightLlama draws the weights."""
    path.mkdir(parents=True, exist_ok=True)
    write_llama_config(path, **config, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, dtype="float16")
    return path


def write_qkv_adapters(root: Path, shapes: ModelShapes, count: int, rank: int, device, modules=QKV) -> dict:
    """`count` PEFT adapters of `rank` on `modules` (default q, k, v; fp16 files; drawn on `device`)."""
    g = torch.Generator(device=device).manual_seed(1 + rank + len(modules))
    dirs = {}
    for i in range(count):
        tensors = {}
        for layer in range(shapes.num_layers):
            for module in modules:
                in_f, out_f = shapes.module_shape(module)
                key = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
                a = torch.randn(rank, in_f, generator=g, device=device) / in_f ** 0.5
                b = 0.01 * torch.randn(out_f, rank, generator=g, device=device)
                tensors[f"{key}.lora_A.weight"] = a.half().cpu()
                tensors[f"{key}.lora_B.weight"] = b.half().cpu()
        path = root / f"{'qkv' if tuple(modules) == QKV else 'all'}-r{rank}-{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules)}))
        dirs[path.name] = path
    return dirs


def make_engine(model_dir, device, dtype, adapters, mode, pool_mb, workers, max_tokens, link,
                cuda_graphs: bool = False) -> OfflineEngine:
    lora = LoRAConfig(mode=mode, pool_mb=pool_mb, max_rank=64, link=link, link_bandwidth_mbps=2000.0)
    # max_req 72: batches of up to 64 rows (8 request slots stay spare), the largest graph bucket
    return OfflineEngine(model_dir, device=str(device), dtype=dtype, lora=lora, adapters=adapters,
                         sidecar=SidecarConfig(workers=workers, deadline_ms=2000.0), max_total_tokens=max_tokens,
                         max_seq=1024, max_req=72, model_class=RandomWeightLlama, cuda_graphs=cuda_graphs)


def close(engine) -> None:
    """Stop the engine and free its device memory now (the caller's name for it lives on until
    the next engine is built, and two 7B models at once would be wasteful)."""
    engine.close()
    engine.model = engine.runtime = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        log(f"device memory after close: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")


def timed_run(engine, device, prompts, names, steps) -> float:
    """Wall milliseconds of engine.run (synchronised at both ends)."""
    sync(device)
    t0 = time.perf_counter()
    engine.run(prompts, names, steps)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def profile_decode(engine, device, names, batch: int, steps: int, path: Path) -> None:
    """cProfile (host) and torch.profiler (operators) of `batch` requests decoding `steps` tokens
    after a 64-token prefill, base-only and with adapters; the tables go to `path`."""
    prompts = [[(3 * i + j) % 500 + 3 for j in range(64)] for i in range(batch)]
    parts = []
    for label, rows in (("base", [None] * batch), ("lora", [names[i % len(names)] for i in range(batch)])):
        timed_run(engine, device, prompts, rows, steps)  # warm
        host = cProfile.Profile()
        wall = host.runcall(timed_run, engine, device, prompts, rows, steps)
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(30)
        parts.append(f"== {label}: batch {batch}, 64-token prefill + {steps} decode steps: {wall:.1f} ms under "
                     f"cProfile (sorted by own time)\n{text.getvalue()}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            wall = timed_run(engine, device, prompts, rows, steps)
        parts.append(f"== {label}: the same, {wall:.1f} ms under torch.profiler (host operators)\n"
                     + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    path.write_text("\n\n".join(parts))
    log(f"profile of decode: {path}")


def bench_ttft(engine, device, names, prompt_len, profile: Path | None = None) -> dict:
    """TTFT of one request per adapter in `names` (each cold on first use: in host memory, page-
    locked, not on the device, as in the paper), then warm again. With `profile`, two more cold
    requests (the adapters after `names`) run under torch.profiler (device and operator times) and
    cProfile (where the host's time goes); both tables go there."""
    spare = engine.runtime.store.names()[len(names):len(names) + 2] if profile is not None else []
    for name in names + spare:  # read the files now: the cold start measured is the host->device one
        engine.runtime.store.materialize(engine.runtime.names.key(name))
    prompt = [[(5 * j) % 500 + 3 for j in range(prompt_len)]]
    cold = [timed_run(engine, device, prompt, [name], 0) for name in names]
    warm = [timed_run(engine, device, prompt, [name], 0) for name in names]
    result = {"cold": summary(cold), "warm": summary(warm), "counters": dict(engine.runtime.counters)}
    if spare:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            result["profiled_cold_ms"] = timed_run(engine, device, prompt, spare[:1], 0)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        host = cProfile.Profile()
        result["cprofiled_cold_ms"] = host.runcall(timed_run, engine, device, prompt, spare[1:], 0)
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(45)
        profile.write_text(
            f"one cold request of {prompt_len} tokens, adapter {spare[0]}: {result['profiled_cold_ms']:.1f} ms "
            f"under torch.profiler (sorted by {sort})\n"
            + prof.key_averages().table(sort_by=sort, row_limit=30)
            + f"\n\none cold request, adapter {spare[1]}: {result['cprofiled_cold_ms']:.1f} ms under cProfile\n"
            + text.getvalue())
        log(f"profile of a cold request: {profile}")
    return result


def bench_sidecar(engine, device, shapes, dtype) -> dict:
    sidecar = engine.runtime.sidecar
    name = next(iter(engine.runtime.store.names()))
    result = {"roundtrip_us": sidecar.sync_roundtrip_us(500), "compute_ms": {}}
    sidecar.arm()
    try:
        g = shapes.group("qkv")
        for rows in (1, 128):
            x = torch.randn(rows, g.in_features, device=device).to(dtype)
            out = torch.zeros(rows, g.out_total, device=device, dtype=dtype)
            samples = []
            for _ in range(21):
                sync(device)
                t0 = time.perf_counter()
                ok = sidecar.compute(0, "qkv", x, [(0, rows, name)], out)
                sync(device)
                samples.append((time.perf_counter() - t0) * 1e3)
                if not ok:
                    raise RuntimeError("sidecar call fell back (see the log)")
            result["compute_ms"][rows] = summary(samples[1:])
    finally:
        sidecar.disarm()
    result["stats"] = sidecar.stats()
    return result


# ---- driver -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench_gpu.json"), help="JSON result")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the current CUDA device) or cpu (emulated link; for rehearsal)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and few repeats: proves the script runs")
    p.add_argument("--layers", type=int, default=0, help="transformer layers (0 = 32 for Llama-2-7B, 2 dry)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per point (0 = 20 kernels / 3 engine)")
    p.add_argument("--adapters", type=int, default=8, help="rank-64 qkv adapters registered per engine")
    p.add_argument("--cold-requests", type=int, default=3, help="cold requests (distinct adapters) per mode")
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="also profile two more cold requests per mode (torch.profiler, cProfile: profile_<mode>.txt) "
                        "and a decode batch, base and LoRA (profile_decode.txt)")
    p.add_argument("--sidecar-workers", type=int, default=8, help="CPU sidecar workers (cpu-assist)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip parts that would start after this")
    p.add_argument("--parts", default="kernels,steps,coldstart,sidecar", help="comma-separated parts to run")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dry = args.dry_run or device.type == "cpu"
    config = dict(DRY if dry else LLAMA2_7B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    shapes = ModelShapes.from_config(config)
    # fp16 on the GPU (the serving dtype); fp32 on the CPU, which has no fast half kernels
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).replace("torch.", "")
    kernel_timer = Timer(device, args.repeats or (3 if dry else 20))
    engine_repeats = args.repeats or (1 if dry else 3)
    link = "cuda" if device.type == "cuda" else "emulated"
    parts = set(args.parts.split(","))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
              "link": link, "emulated": link == "emulated", "dry_run": dry, "dtype": dtype_name,
              "model": {**config, "note": "Llama-2-7B shapes, random fp16 weights drawn on the device"
                        if not dry else "tiny shapes (rehearsal)"},
              "adapters": {"count": args.adapters, "rank": 64, "targets": list(QKV)}, "skipped": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["elapsed_s"] = time.monotonic() - start
        if device.type == "cuda":
            result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    def due(part: str) -> bool:
        if part not in parts:
            return False
        if time.monotonic() - start > args.budget_s:
            result["skipped"].append(f"{part}: over the {args.budget_s:.0f} s budget")
            log(f"skipping {part}: over budget")
            return False
        return True

    if due("kernels"):
        batches, ranks = ((1, 4), (8, 16)) if dry else ((1, 8, 32, 64), (8, 32, 64, 128))
        prefill = ((2, 8),) if dry else ((1, 512), (4, 128), (16, 32))
        result["kernels"] = bench_kernels(shapes, dtype, device, kernel_timer, batches, ranks, prefill)
        save()
    if not parts & {"steps", "coldstart", "sidecar"}:
        return result
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root = Path(tmp)
        model_dir = write_model_dir(root / "model", config)
        adapters = write_qkv_adapters(root / "adapters", shapes, args.adapters, 64, device)
        names = list(adapters)
        cold_n = args.cold_requests
        if cold_n + 2 * (args.profile_dir is not None) > len(names):
            raise SystemExit(f"--cold-requests {cold_n} (+2 profiled) needs as many --adapters")
        if args.profile_dir is not None:
            args.profile_dir.mkdir(parents=True, exist_ok=True)

        def profile_path(mode):
            return None if args.profile_dir is None else args.profile_dir / f"profile_{mode}.txt"
        max_tokens = 4096 if dry else 8192
        page_bytes = shapes.floats_per_rank_per_layer() * shapes.num_layers * torch.empty((), dtype=dtype).element_size()
        pool_mb = (args.adapters * 64 + 64) * page_bytes / 2**20  # every adapter fits: cached mode pins them all
        prompt_len = 16 if dry else 256
        if due("steps"):
            all16 = write_qkv_adapters(root / "all16", shapes, 2 if dry else 8, 16, device, ALL_SEVEN)
            steps_pool_mb = pool_mb + len(all16) * 16 * page_bytes / 2**20

            def steps_engine(graphs: bool):
                return make_engine(model_dir, device, dtype_name, {**adapters, **all16}, "cached", steps_pool_mb, 1,
                                   max_tokens, link, cuda_graphs=graphs)

            part = gpu_steps.bench(steps_engine, device, timed_run, summary, log, names, list(all16), dry=dry,
                                         repeats=engine_repeats, steps=2 if dry else 16,
                                         batches=(1, 2) if dry else (1, 8, 32, 64))
            result.update(part)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save()
            if args.profile_dir is not None:
                engine = make_engine(model_dir, device, dtype_name, adapters, "cached", pool_mb, 1, max_tokens, link)
                try:
                    profile_decode(engine, device, names, 2 if dry else 32, 2 if dry else 16,
                                   args.profile_dir / "profile_decode.txt")
                finally:
                    close(engine)
        if due("coldstart"):
            engine = make_engine(model_dir, device, dtype_name, adapters, "cached", pool_mb, 1, max_tokens, link)
            try:
                result.setdefault("coldstart", {})["cached"] = bench_ttft(engine, device, names[:cold_n], prompt_len,
                                                                         profile_path("cached"))
            finally:
                close(engine)
            save()
        for mode in MODES:
            cold = due("coldstart")
            side = mode == "cpu-assist" and due("sidecar")
            if not (cold or side):
                continue
            engine = make_engine(model_dir, device, dtype_name, adapters, mode, pool_mb, args.sidecar_workers,
                                 max_tokens, link)
            try:
                if cold:
                    ttft = result.setdefault("coldstart", {})[mode] = bench_ttft(engine, device, names[:cold_n],
                                                                                 prompt_len, profile_path(mode))
                    ttft["link_bytes"] = engine.runtime.link.bytes_moved
                    log(f"TTFT {mode}: cold {ttft['cold']['median_ms']:.1f} ms, warm {ttft['warm']['median_ms']:.1f} ms")
                if side:
                    result["sidecar"] = bench_sidecar(engine, device, shapes, dtype)
            finally:
                close(engine)
            save()
    save()
    return result


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    out = main()
    print(json.dumps({k: out[k] for k in ("device", "torch", "triton", "link", "elapsed_s", "skipped")}, indent=1))
