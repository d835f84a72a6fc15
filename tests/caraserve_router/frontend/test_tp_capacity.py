"""The front end refuses a --tp the host cannot hold before it starts anything, with the reason."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from caraserve_router.contracts.configs import InstanceConfig
from caraserve_router.frontend import tp_capacity
from caraserve_router.frontend.gpu_assignment import assign_gpus


def template(model_dir, tp, device="auto") -> InstanceConfig:
    return InstanceConfig(model_dir=str(model_dir), tp=tp, device=device)


def test_api_server_refuses_a_model_that_does_not_split(tiny_llama_dir, tmp_path):
    """The tiny llama has 2 KV heads: --tp 4 cannot split them; nothing is started."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "caraserve_router.api_server", "--model-dir", str(tiny_llama_dir),
                           "--tp", "4", "--log-dir", str(tmp_path), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "num_key_value_heads 2 is not divisible by tp=4" in proc.stderr
    assert not os.listdir(tmp_path), "nothing may be started"


def test_gpus_per_instance_and_gpu_memory(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(tp_capacity, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setattr(tp_capacity, "gpu_memory_bytes", lambda: 80 * 2**30)
    tp_capacity.check_tp_capacity(template(tiny_llama_dir, 2), instances=2, share_gpus=False, local=True)
    with pytest.raises(ValueError, match=r"3 local instances but 4 GPU\(s\) \(0,1,2,3\) for 2 GPUs each"):
        tp_capacity.check_tp_capacity(template(tiny_llama_dir, 2), instances=3, share_gpus=False, local=True)
    weights = tp_capacity.checkpoint_bytes(str(tiny_llama_dir))
    monkeypatch.setattr(tp_capacity, "gpu_memory_bytes", lambda: int(weights / 2 * 0.9))  # the shard needs more
    with pytest.raises(ValueError, match="one rank's shard of the weights.*use a larger --tp"):
        tp_capacity.check_tp_capacity(template(tiny_llama_dir, 2), instances=1, share_gpus=False, local=True)
    # Ray places the actors itself: only the model split is checked here
    tp_capacity.check_tp_capacity(template(tiny_llama_dir, 2), instances=3, share_gpus=False, local=False)


def test_cpu_host_memory(tiny_llama_dir, monkeypatch):
    weights = tp_capacity.checkpoint_bytes(str(tiny_llama_dir))
    monkeypatch.setattr(tp_capacity, "available_host_bytes", lambda: int(weights * 1.5))
    tp_capacity.check_tp_capacity(template(tiny_llama_dir, 2, "cpu"), instances=1, share_gpus=False, local=True)
    with pytest.raises(ValueError, match="2 instance\\(s\\) need .* GiB of weights"):
        tp_capacity.check_tp_capacity(template(tiny_llama_dir, 2, "cpu"), instances=2, share_gpus=False, local=True)
    monkeypatch.setattr(tp_capacity, "visible_gpus", lambda: [])
    with pytest.raises(ValueError, match="no GPU"):
        tp_capacity.check_tp_capacity(template(tiny_llama_dir, 2, "cuda"), instances=1, share_gpus=False, local=True)


def test_a_tp_instance_gets_consecutive_gpus():
    assert assign_gpus(2, share=False, gpus=["0", "1", "2", "3"], per_instance=2) == ["0,1", "2,3"]
    assert assign_gpus(3, share=True, gpus=["0", "1", "2", "3"], per_instance=2) == ["0,1", "2,3", "0,1"]
    with pytest.raises(ValueError, match="--tp 8 needs 8 GPUs per instance; this host has 4"):
        assign_gpus(1, share=True, gpus=["0", "1", "2", "3"], per_instance=8)


def test_perf_models_are_per_tp_size(tiny_llama_dir, tmp_path):
    """A TP instance's start-up profile is cached under its own name; a --perf-model profiled at
    another TP size (the paper's A100 7B model: tp 1) is refused before anything starts."""
    from caraserve_router.frontend.perf_bootstrap import cache_path

    one, two = (cache_path(str(tmp_path), str(tiny_llama_dir), "cpu", "mbgmv", "pipeline", tp) for tp in (1, 2))
    assert one != two and two.name.endswith("-tp2.json") and "tp" not in one.name
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    paper = os.path.join(repo, "data", "perf_models", "paper_a100_llama2_7b.json")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "caraserve_router.api_server", "--model-dir", str(tiny_llama_dir),
                           "--tp", "2", "--perf-model", paper, "--log-dir", str(tmp_path / "logs"), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "was profiled with tp=1; these instances run tp=2" in proc.stderr
    assert not (tmp_path / "logs").exists() or not os.listdir(tmp_path / "logs")
