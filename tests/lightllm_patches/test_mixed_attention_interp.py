"""Runs interp_mixed_attention.py (the CUDA path of a chunked-prefill step: LightLLM's Triton
attention kernels) under TRITON_INTERPRET=1 in a child pytest (Triton decides at decoration
time whether a kernel is compiled or interpreted)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_mixed_step_cuda_attention_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interp_mixed_attention.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreted attention tests failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-5000:]
