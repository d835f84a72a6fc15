"""Building truth tables from what was measured: a profile of this machine, the H200 run's files.

Each builder says, in the table's `measured` / `not_measured`, what its numbers are: a step the
instance timed, or a value derived (and from what). Nothing here is fitted to the policies'
PerfModel; a table only interpolates between its own measured points.
"""
from __future__ import annotations

import json
from pathlib import Path

from caraserve_router.contracts.device_kind import kind_name
from caraserve_router.evaluation.truth_table import KERNEL_FEATURE, TruthTable

SMOLLM2_LAYERS = 30


def _feature(kernel: str, ranks: list) -> int:
    return sum(ranks) if KERNEL_FEATURE[kernel] == "sum_ranks" else len(ranks) * max(ranks)


def from_profile(profile: dict, name: str, layers: int, sidecar: dict | None, layer_sync_ms: float,
                 notes: tuple = ()) -> TruthTable:
    """A table from a raw profile (scripts/profile_instance.py's `.profile.json`): prefill repeats
    grouped by (tokens, rank); a decode point's `ms_samples` (the sweep keeps every cycle) or its
    median; the link from the profile's `link`."""
    prefill: dict = {}
    for p in profile["prefill"]:
        prefill.setdefault((p["tokens"], p["rank"]), []).append(p["ms"])
    decode = [{"kernel": p["kernel"], "batch": len(p["ranks"]), "feature": _feature(p["kernel"], p["ranks"]),
               "ranks": p["ranks"], "ms": list(p.get("ms_samples") or [p["ms"]])} for p in profile["decode"]]
    link = profile["link"]
    meta = profile.get("metadata", {})
    measured = [f"prefill: {len(prefill)} (tokens, rank) points x repeats, timed by the instance",
                f"decode: {len(decode)} (kernel, rank mix) points, "
                + ("every cycle kept" if any("ms_samples" in p for p in profile["decode"]) else
                   "median cycle only (no decode spread: decode draws have no noise)")]
    not_measured = [f"link: {'measured' if link.get('measured') else 'EMULATED'} at "
                    f"{link['bandwidth_gbps'] * 1e3:.0f} MB/s"] + list(notes)
    return TruthTable(
        name=name, device=str(meta.get("device", "")), source=f"profile of {meta.get('date', '?')}",
        prefill=[{"tokens": t, "rank": r, "ms": ms} for (t, r), ms in sorted(prefill.items())], decode=decode,
        load={"fixed_ms": link.get("latency_ms", 0.0) * layers, "bytes_per_rank": link["bytes_per_rank"],
              "bytes_per_ms": link["bandwidth_gbps"] * 1e6, "layer_sync_ms": layer_sync_ms},
        layers=layers, sidecar=sidecar, measured=measured, not_measured=not_measured)


def cpu_vm_table(repo: Path) -> TruthTable:
    """This VM: the shipped profile (docs/results/perf_model_smollm2_cpu.profile.json, both decode
    kernels) and the sidecar's time from bench_modes' calibration (docs/results/bench_modes.json)."""
    profile = json.loads((repo / "docs/results/perf_model_smollm2_cpu.profile.json").read_text())
    cal = json.loads((repo / "docs/results/bench_modes.json").read_text())["calibration"]
    # the calibration's sidecar ran a rank-64 q,k,v adapter over the mean prompt through all
    # layers on one worker: per token x rank x layer of a q,k,v adapter (the simulated adapters')
    per = cal["sidecar_lora_ms"] / (cal["prompt_tokens"] * 64 * SMOLLM2_LAYERS)
    profile = {**profile, "link": {**profile["link"], "bytes_per_rank": 20.7e6 / 64},
               "metadata": {**profile["metadata"], "device": kind_name("cpu")}}
    return from_profile(profile, "cpu-vm-smollm2", SMOLLM2_LAYERS,
                        {"ms_per_token_rank": per, "workers": 1}, layer_sync_ms=0.02,
                        notes=("sidecar: one worker's rank-64 q,k,v LoRA time from bench_modes' calibration "
                               f"({cal['sidecar_lora_ms']:.1f} ms for {cal['prompt_tokens']} tokens), per token x "
                               "rank x layer of a q,k,v adapter", "layer sync: the emulated link's 20 us latency",
                               "load: bytes per rank of a q,k,v adapter (20.7 MB at rank 64)"))


def cpu_vm_1thread_table(repo: Path) -> TruthTable:
    """This VM with one torch thread per instance (the live validation cluster's setting): the raw
    points kept in docs/results/validation/perf_model.json's grid (profiled 2026-11-23)."""
    model = json.loads((repo / "docs/results/validation/perf_model.json").read_text())
    grid, load = model["grid"], model["load"]
    profile = {"metadata": {**model["metadata"], "device": kind_name("cpu") + " (1 torch thread)"},
               "prefill": grid["prefill"], "decode": grid["decode"],
               "link": {"bandwidth_gbps": load["bandwidth_gbps"], "bytes_per_rank": load["bytes_per_rank"],
                        "latency_ms": load["fixed_ms"] / SMOLLM2_LAYERS}}
    return from_profile(profile, "cpu-vm-smollm2-1thread", SMOLLM2_LAYERS, None, layer_sync_ms=0.02,
                        notes=("sidecar: not measured in this profile (cpu-assist falls back to pipeline)",))


def h200_table(gpu_dir: Path) -> TruthTable:
    """The H200 run (docs/results/gpu): 7B-shaped engine steps of bench_gpu_engine*.json, the
    link's 100.7 MB in 2.4 ms, the sidecar's profile. Only what those files hold is measured."""
    runs = [json.loads((gpu_dir / f).read_text()) for f in ("bench_gpu_engine.json", "bench_gpu_engine_r10.json",
                                                               "bench_gpu_steps_p.json")]
    rank, n = runs[0]["adapters"]["rank"], runs[0]["adapters"]["count"]
    prefill, decode = {}, {}
    for run in runs:
        steps = run["steps"]
        tokens = steps["prefill"]["tokens"]
        for key, r in (("base", 0), ("lora", rank)):
            s = steps["prefill"][key]
            prefill.setdefault((tokens, r), []).extend([s["min_ms"], s["median_ms"], s["max_ms"]])
        for batch, d in steps["decode"].items():
            b = int(batch)
            for key, r in (("base", 0), ("lora", rank)):
                s = d[key]
                decode.setdefault((b, r), []).extend([s["min_ms"], s["median_ms"], s["max_ms"]])
        warm = (run.get("coldstart") or {}).get("cached", {}).get("warm")
        if warm:  # one 256-token prompt, rank-64 q,k,v, warm: its TTFT is its prefill (+ the host's loop)
            prefill.setdefault((256, rank), []).extend([warm["min_ms"], warm["median_ms"], warm["max_ms"]])
    # base 256-token prefill: not timed; the warm rank-64 one scaled by base / LoRA at 1024 tokens
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    ratio = mean(prefill[(1024, 0)]) / mean(prefill[(1024, rank)])
    prefill[(256, 0)] = [v * ratio for v in prefill[(256, rank)]]
    layers = runs[0]["model"]["num_hidden_layers"]
    side = runs[1]["sidecar"]["stats"]
    prof = side["profile"]
    h, inter = runs[0]["model"]["hidden_size"], runs[0]["model"]["intermediate_size"]
    qkv = 3 * (h + h)                                 # elements per rank per layer of a q,k,v adapter
    every = 4 * (h + h) + 2 * (h + inter) + (inter + h)  # ... of one on all seven projections
    # the profile ran all seven projections at its rank: a q,k,v adapter does qkv / every of that
    per_token_rank = prof["per_token_us"] / 1e3 / prof["rank"] * qkv / every
    bytes_per_rank = layers * 2 * qkv  # fp16: 100.7 MB at rank 64
    return TruthTable(
        name="h200-llama7b-shapes", device="cuda:NVIDIA H200", source="docs/results/gpu (2026-11-26)",
        prefill=[{"tokens": t, "rank": r, "ms": ms} for (t, r), ms in sorted(prefill.items())],
        decode=[{"kernel": "mbgmv", "batch": b, "feature": b * r if r else 0, "ranks": [r] * b, "ms": ms}
                for (b, r), ms in sorted(decode.items())],
        load={"fixed_ms": 0.0, "bytes_per_rank": bytes_per_rank, "bytes_per_ms": 100.7e6 / 2.4,
              "layer_sync_ms": 0.18},
        layers=layers, sidecar={"ms_per_token_rank": per_token_rank, "workers": int(side["workers"])},
        measured=["prefill: 1024 tokens (4 x 256), base and rank-64 q,k,v, 3 runs (min/median/max each); "
                  "256 tokens rank-64 q,k,v: the warm TTFT of the cold-start runs in cached mode, 2 runs",
                  "decode: batch 1, 16, 32, base and rank-64 q,k,v, 3 runs (min/median/max each)",
                  "link: 100.7 MB in 2.4 ms of device time (docs/GPU.md)",
                  f"sidecar: one worker's profile ({prof['per_token_us']:.1f} us per token per layer at rank "
                  f"{prof['rank']} on all projections; scaled to q,k,v by their share of the elements), "
                  f"{side['workers']} workers"],
        not_measured=["prefill at other lengths: piecewise linear between 256 and 1024 tokens, extrapolated "
                      "linearly (NOT measured)", "base 256-token prefill: the warm rank-64 one x (base / "
                      "LoRA at 1024 tokens) (derived, NOT measured)",
                      "decode past batch 32 and other rank mixes: linear in sum of ranks between base and "
                      "all-rank-64 (NOT measured)", "bgmv decode: not measured (mbgmv only)",
                      "layer sync 0.18 ms: from pipeline's cold TTFT minus on-demand's over 32 layers (derived)",
                      "model: Llama-2-7B shapes with random weights; no trace was served on the H200"])


def fitted_model(table: TruthTable):
    """The PerfModel a policy predicts with beside `table`: the usual linear fit of the table's own
    mean points (so the policy's error is the linear model's, against measured, noisy steps)."""
    from caraserve_router.scheduling.perf_model import PerfModel

    mean = lambda v: sum(v) / len(v)  # noqa: E731
    prefill = [{"tokens": p["tokens"], "rank": p["rank"], "ms": mean(p["ms"])} for p in table.prefill]
    decode = [{"kernel": d["kernel"], "ranks": d.get("ranks") or [d["feature"] // max(1, d["batch"])] * d["batch"],
               "ms": mean(d["ms"])} for d in table.decode]
    side = table.sidecar or {}
    profile = {"metadata": {"source": f"fitted to truth table {table.name}", "device": table.device},
               "prefill": prefill, "decode": decode,
               "link": {"bandwidth_gbps": table.load["bytes_per_ms"] / 1e6, "bytes_per_rank": table.load["bytes_per_rank"],
                        "latency_ms": table.load["fixed_ms"]},
               "cpu_assist": {"sidecar_ms_per_token_rank": side.get("ms_per_token_rank"),
                              "sidecar_workers": side.get("workers", 1), "layers": table.layers,
                              "layer_sync_ms": table.load.get("layer_sync_ms", 0.0)}}
    return PerfModel.fit(profile)


def shipped_for(kind: str, directory: Path) -> TruthTable | None:
    """The shipped table whose device is the longest one contained in `kind` (None: none)."""
    tables = [TruthTable.load_file(p) for p in sorted(Path(directory).glob("*.json"))]
    matches = [t for t in tables if t.device and t.device.lower() in kind.lower()]
    return max(matches, key=lambda t: len(t.device)) if matches else None


def resolve_truth(arg: str, perf_model_path, default_model_path, tables_dir: Path):
    """(truth table or None, the PerfModel the policies predict with, a line saying which) for
    `--truth` ('machine', 'none' or a path) and `--perf-model` (None: the table's fit)."""
    from caraserve_router.scheduling.perf_model import PerfModel

    if arg == "none":
        path = perf_model_path or default_model_path
        return None, PerfModel.load(path), f"truth: the PerfModel itself ({Path(path).name}), NOT measured"
    if arg == "machine":
        kind = kind_name("cpu")
        try:
            import torch  # noqa: PLC0415 - only to name a GPU of this machine

            if torch.cuda.is_available():
                kind = kind_name("cuda", torch.cuda.get_device_name(0))
        except ImportError:
            pass
        table = shipped_for(kind, tables_dir)
        if table is None:
            path = perf_model_path or default_model_path
            return None, PerfModel.load(path), (f"truth: no shipped truth table for {kind!r} in {tables_dir.name}/; "
                                                 f"the PerfModel itself ({Path(path).name}), NOT measured")
    else:
        table = TruthTable.load_file(arg)
    pm = PerfModel.load(perf_model_path) if perf_model_path else fitted_model(table)
    return table, pm, (f"truth: MEASURED table {table.name} ({table.device}); policies predict with "
                       f"{Path(perf_model_path).name if perf_model_path else 'its linear fit'}")
