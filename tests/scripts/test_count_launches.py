"""scripts/bench/count_launches.py: a decode step's kernel launches on the GPU path (LightLLM's and
CaraServe's Triton kernels interpreted on the CPU, fp16), in a child process (TRITON_INTERPRET
must be set before Triton is imported).

Holds the GPU path's LoRA to two launches per layer group (shrink, expand straight into the
projection outputs) in the eager and the graph step, the graph step to no host sync, and the
graph's logits to the eager step's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_lora_is_two_launches_per_layer_group(tmp_path):
    out = tmp_path / "launches.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "count_launches.py"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r = json.loads(out.read_text())
    groups, layers = 4, r["layers"]
    for path in ("eager", "graph_lora"):
        layer = r[path]["layer"]
        assert layer["lora"] == 2 * groups, (path, layer["triton_by_kernel"])  # every group has a rank here
        assert r[path]["step"]["lora"] == 2 * groups * layers
        assert "zeros" not in layer["torch_by_op"], (path, layer["torch_by_op"])  # no scratch for the qkv delta
    # before: the qkv delta went through a zeroed scratch and two adds
    before, after = r["eager_before"]["layer"], r["eager"]["layer"]
    assert before["torch_by_op"].get("zeros") == 1 and before["launches"] - after["launches"] == 3
    # LoRA adds exactly its launches to the graph's layer (2 per group); nothing waits on the device in it
    assert r["graph_lora"]["layer"]["launches"] - r["graph_base"]["layer"]["launches"] == 2 * groups
    for path in ("graph_lora", "graph_base"):  # nor in the step around it (KV slots found on the host)
        assert r[path]["graph_body"]["host_syncs"] == 0, r[path]["graph_body"]["syncs_by_op"]
        assert r[path]["step"]["host_syncs"] == 0, r[path]["step"]["syncs_by_op"]
    assert r["graph_matches_eager"] and r["graph_max_abs_diff"] < 2e-2, r["graph_max_abs_diff"]
