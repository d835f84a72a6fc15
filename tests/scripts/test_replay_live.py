"""scripts/replay.py against a real one-instance server on a tiny model: every request sent is
in the JSON, with its measured latencies."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import fixtures
from caraserve_router.evaluation.server_process import REPO, RunningServer

pytestmark = pytest.mark.slow


def test_short_replay_against_a_real_server(tmp_path):
    model_dir, adapters = fixtures.tiny_llama_with_adapters(tmp_path / "tiny", ranks=(2, 4, 8))
    flags = ["--model-dir", str(model_dir), "--adapters", str(adapters[0].parent), "--policy", "round-robin",
             "--lora-mode", "cpu-assist", "--lora-max-rank", "8", "--lora-pool-mb", "4", "--log-dir", str(tmp_path)]
    out = tmp_path / "replay.json"
    with RunningServer("caraserve_router.api_server", flags, tmp_path / "server.log") as srv:
        proc = subprocess.run(
            [sys.executable, "scripts/replay.py", "--url", srv.url, "--arrival", "poisson", "--rate", "4",
             "--max-requests", "12", "--duration", "30", "--length-source", "fixed", "--prompt-len", "24",
             "--output-len", "6", "--num-adapters", "3", "--ranks", "2,4,8", "--slo-tpot-ms", "1000",
             "--out", str(out), "--no-plots", "--progress-s", "0"],
            cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert len(result["requests"]) == 12
    assert all(r["status"] == "ok" for r in result["requests"]), [r["status"] for r in result["requests"]]
    assert all(r["tokens"] == 6 and r["ttft_ms"] > 0 and r["e2e_ms"] >= r["ttft_ms"] for r in result["requests"])
    summary = result["summary"]
    assert summary["ok"] == 12 and 0 <= summary["slo_attainment"] <= 1
    assert {r["model"] for r in result["requests"]} <= {a.name for a in adapters} | {"base"}
