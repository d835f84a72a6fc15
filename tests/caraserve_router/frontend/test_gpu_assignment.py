"""`--instances N` on one host with several GPUs (no Ray): instance i gets GPU i."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from caraserve_router.frontend.gpu_assignment import assign_gpus, gpu_env, visible_gpus


def test_instance_i_gets_gpu_i_and_more_instances_than_gpus_are_refused():
    assert assign_gpus(3, share=False, gpus=["0", "1", "2", "3"]) == ["0", "1", "2"]
    assert assign_gpus(2, share=False, gpus=["4", "7"]) == ["4", "7"]  # the ids the front end was given
    with pytest.raises(ValueError, match="3 local instances but 2 GPU"):
        assign_gpus(3, share=False, gpus=["0", "1"])
    assert assign_gpus(5, share=True, gpus=["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert assign_gpus(3, share=False, gpus=[]) == [None, None, None]  # CPU host: as before


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    env = gpu_env("5")
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["PATH"] == os.environ["PATH"]
    assert gpu_env(None) is None


def test_api_server_refuses_more_instances_than_gpus(tiny_llama_dir, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    proc = subprocess.run([sys.executable, "-m", "caraserve_router.api_server", "--model-dir", str(tiny_llama_dir),
                           "--instances", "3", "--log-dir", str(tmp_path), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "3 local instances but 2 GPU(s)" in proc.stderr and "--share-gpus" in proc.stderr
    assert not os.listdir(tmp_path), "nothing may be started"
