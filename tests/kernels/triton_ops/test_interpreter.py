"""Runs the Triton kernel tests (interp_*.py) under TRITON_INTERPRET=1 in a child pytest.

Triton decides at decoration time whether a @triton.jit function is compiled or interpreted,
so the variable must be set before any kernel module is imported; a child process keeps the
interpreter out of every other test of this session.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


@pytest.mark.parametrize("module", ["interp_decode.py", "interp_prefill.py"])
def test_triton_kernels_under_interpreter(module):
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / module)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreted Triton tests failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-5000:]
