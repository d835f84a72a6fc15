#!/usr/bin/env python3
"""The server stack on the GPU: `python -m caraserve_router.api_server` with a random-weight model
and PEFT adapters drawn on the machine, a short trace replayed through it per LoRA mode, CUDA
graphs on; then shut down, recording TTFT / TPOT, errors and what was left behind.

Nothing above the offline engine had run on a GPU: the front end, the instance processes,
chunked prefill's mixed steps, streaming, the sidecar inside a live instance. Run by
scripts/gpu_check.sh (step "serve"); on a CPU machine `--dry-run` runs the same on tiny shapes.

The model is Llama-shaped (fp16 safetensors written here: nothing is downloaded), with a real
tokenizer carried along: `--tokenizer-dir` (default `.whl/tokenizer`, which `make gpu-bundle`
fills from the prepared default model; else the prepared default model itself). Its vocabulary
sets the model's. Adapters: rank 16 on q, k, v and rank 8 on all seven projections, written
as PEFT files from tensors drawn here.

    python scripts/gpu_serve_check.py --out results/gpu_check/serve.json               # GPU
    python scripts/gpu_serve_check.py --dry-run --out /tmp/serve.json                  # CPU rehearsal
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
import gpu as bench_gpu  # noqa: E402 - the adapter writer, the config writer
from caraserve_router.assets.llama_layout import expected_shapes  # noqa: E402
from caraserve_router.evaluation.server_process import REPO, RunningServer  # noqa: E402
from caraserve_router.lora.shapes import ModelShapes  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
GPU_SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16)  # ~1.2 GB of fp16 weights: written in seconds, Llama-2 head_dim 128
DRY_SHAPES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)


def tokenizer_dir(given: Path | None) -> Path:
    for d in ([given] if given else []) + [REPO / ".whl" / "tokenizer"]:
        if d and (d / "tokenizer.json").is_file():
            return d
    from caraserve_router.assets import model_prep

    return Path(model_prep.prepare_default_model())


def vocab_size(tok: Path) -> int:
    tj = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens", [])]
    return max(ids) + 1


def write_model(path: Path, shapes: dict, tok: Path) -> dict:
    """config.json, random fp16 safetensors (N(0, 0.02), norms 1, drawn on the CPU), the tokenizer."""
    config = dict(shapes, vocab_size=vocab_size(tok))
    bench_gpu.write_model_dir(path, config)
    g = torch.Generator().manual_seed(0)
    weights = {name: (torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=g))
               .half() for name, shape in expected_shapes(config).items()}
    save_file(weights, str(path / "model.safetensors"))
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy(tok / name, path / name)
    return config


def serve_and_replay(model_dir: Path, adapters_dir: Path, mode: str, work: Path, args) -> dict:
    flags = ["--model-dir", str(model_dir), "--adapters", str(adapters_dir), "--policy", "round-robin",
             "--lora-mode", mode, "--lora-max-rank", "16", "--lora-pool-mb", "64" if not args.dry_run else "4",
             "--log-dir", str(work), "--max-req-total-len", "1024", "--max-req-input-len", "512",
             "--max-total-token-num", "16384" if not args.dry_run else "4096"]
    if not args.dry_run:
        flags += ["--device", "cuda", "--cuda-graphs"]
    out = work / "replay.json"
    started = time.monotonic()
    record = {"mode": mode, "flags": flags}
    srv = RunningServer("caraserve_router.api_server", flags, work / "server.log", startup_s=args.startup_s)
    try:
        with srv:
            record["startup_s"] = time.monotonic() - started
            # prompt ids: replay.py's own range (ReplayConfig.token_id_range), inside the tokenizer's vocabulary
            proc = subprocess.run(
                [sys.executable, "scripts/replay.py", "--url", srv.url, "--arrival", "poisson", "--rate",
                 str(args.rate), "--max-requests", str(args.requests), "--duration", "60", "--length-source", "fixed",
                 "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len), "--num-adapters", "4",
                 "--ranks", "8,16", "--slo-tpot-ms", "1000", "--out", str(out), "--no-plots", "--progress-s", "0"],
                cwd=REPO, capture_output=True, text=True, timeout=args.replay_timeout_s)
            record["replay_exit"] = proc.returncode
            if proc.returncode != 0:
                record["replay_error"] = (proc.stdout + proc.stderr)[-3000:]
    except Exception as e:  # a server that did not start: its log says why
        record["error"] = f"{type(e).__name__}: {e}"
    record["log_tail"] = srv.tail(30) if (work / "server.log").exists() else ""
    record["leftover_processes"] = list(srv.leftover_procs)
    record["leftover_shm"] = sorted(srv.leftover_shm)
    if out.exists():
        result = json.loads(out.read_text())
        s = result["summary"]
        record["summary"] = {k: v for k, v in s.items() if k.startswith(("ttft_ms", "tpot_ms", "e2e_ms"))
                             or k in ("requests", "ok", "statuses", "throughput_tokens_s")}
        record["statuses"] = sorted({r["status"] for r in result["requests"]})
        record["requests"] = len(result["requests"])
    record["ok"] = bool(record.get("replay_exit") == 0 and record.get("statuses") == ["ok"]
                        and not record["leftover_processes"] and not record["leftover_shm"])
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu_check/serve.json"))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (rehearsal)")
    p.add_argument("--modes", default="cpu-assist,cached", help="LoRA modes, one server each")
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=8.0, help="requests per second")
    p.add_argument("--prompt-len", type=int, default=300, help="prompt tokens (above the 256-token chunk: mixed steps)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--startup-s", type=float, default=240.0)
    p.add_argument("--replay-timeout-s", type=float, default=180.0)
    args = p.parse_args(argv)
    if args.dry_run:
        args.requests, args.prompt_len, args.output_len = min(args.requests, 6), min(args.prompt_len, 40), \
            min(args.output_len, 4)
    tok = tokenizer_dir(args.tokenizer_dir)
    result = {"dry_run": args.dry_run, "tokenizer": tok.name, "modes": {}, "cuda_graphs": not args.dry_run}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_serve_") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        config = write_model(root / "model", DRY_SHAPES if args.dry_run else GPU_SHAPES, tok)
        shapes = ModelShapes.from_config(config)
        bench_gpu.write_qkv_adapters(root / "adapters", shapes, 2, 16, "cpu")
        bench_gpu.write_qkv_adapters(root / "adapters", shapes, 2, 8, "cpu", bench_gpu.ALL_SEVEN)
        result["model"] = {**config, "write_s": time.monotonic() - t0}
        for mode in args.modes.split(","):
            work = root / f"run-{mode}"
            work.mkdir()
            result["modes"][mode] = serve_and_replay(root / "model", root / "adapters", mode, work, args)
            print(json.dumps({mode: {k: result["modes"][mode].get(k) for k in ("ok", "summary", "error")}}),
                  flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["ok"] = all(r["ok"] for r in result["modes"].values())
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
