"""Shared by the `pytest -m cuda` tests: the skip marker, the device, tokenizer-free tiny llamas.

Every test module here sets `pytestmark = CUDA_TESTS`: marked `cuda` (selected by
`pytest -m cuda`, see scripts/gpu_check.sh) and skipped where torch sees no CUDA device, so a
plain `pytest tests` on a CPU machine collects and skips them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
CUDA_TESTS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run on the GPU "
                                                                        "machine through scripts/gpu_check.sh)")]
# head_dim 64: LightLLM's attention kernels take head dims 16..256, and 64 is the common one
CUDA_LLAMA = dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, init_std=0.05)


def cuda_device() -> torch.device:
    """The configured CUDA device (the current one; never a hard-coded index)."""
    return torch.device("cuda", torch.cuda.current_device())


def compiled_triton() -> bool:
    """The Triton kernels are compiled here, not interpreted (TRITON_INTERPRET is a CPU aid)."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def tiny_tokenizer_dir(path: Path, vocab: int = 512) -> Path:
    """A stand-in tokenizer.json with `vocab` ids: enough for build_tiny_llama to size the
    embeddings. The GPU machine has no default model (its GGUF is not carried) and these tests
    feed token ids, never text."""
    path.mkdir(parents=True, exist_ok=True)
    vocab_map = {f"t{i}": i for i in range(vocab)}
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab_map}, "added_tokens": []}))
    return path


def build_cuda_llama(root: Path, **overrides) -> Path:
    """A tiny random llama (CUDA_LLAMA shapes unless overridden) in `root/model`."""
    from tests.fixtures import build_tiny_llama

    kw = dict(CUDA_LLAMA, **overrides)
    return build_tiny_llama(root / "model", tokenizer_dir=tiny_tokenizer_dir(root / "tokenizer"), **kw)
