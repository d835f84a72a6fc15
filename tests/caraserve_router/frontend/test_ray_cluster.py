"""`--cluster ray`, end to end, inside a private network namespace.

Ray binds and connects on the machine's interface address, which tests here must not use, so
the cases (`ray_cluster_cases.py`: placement, outputs against HF + PEFT, adapters shipped as
bytes, vLLM metrics, a killed instance restarted by Ray, clean shutdown) run in a pytest of
their own under `unshare -n` with only loopback up. Needs root (or user namespaces), as CI has.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CASES = Path(__file__).with_name("ray_cluster_cases.py")
REPO = Path(__file__).resolve().parents[3]
BUDGET_S = 900


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.timeout(BUDGET_S + 60)
def test_ray_cluster_cases_in_a_private_network_namespace():
    pytest.importorskip("ray")
    if not _can_unshare():
        pytest.skip("`unshare -n` is not permitted here (needs root or user namespaces)")
    ray_tmp = tempfile.mkdtemp(prefix="rayt_", dir="/tmp")  # all of Ray's files, removed below
    env = {**os.environ, "CARASERVE_RAY_NETNS": "1", "RAY_TMPDIR": ray_tmp, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    inner = f"ip link set lo up && exec {sys.executable} -m pytest -x -q -p no:cacheprovider {CASES}"
    try:
        proc = subprocess.run(["unshare", "-n", "bash", "-c", inner], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=BUDGET_S, start_new_session=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    report = proc.stdout[-12000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], report
