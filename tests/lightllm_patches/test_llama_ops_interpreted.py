"""Runs interp_llama_ops.py (LightLLM's llama Triton kernels through our CUDA op set) under
TRITON_INTERPRET=1 in a child pytest, as tests/kernels/triton_ops/test_interpreter.py does for
the LoRA kernels: the interpreter must be chosen before Triton is first imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_lightllm_llama_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interp_llama_ops.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreted LightLLM kernels failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert "6 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-5000:]
