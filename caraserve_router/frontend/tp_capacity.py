"""Refuse a `--tp` this host cannot hold, in the front end, before any instance starts.

Without this a bad `--tp` surfaced only when an instance started (late: the front end was up,
and under Ray the actor was restarted three times first). Checked here, without torch:

- the base model splits evenly over `tp` ranks (`contracts/tensor_parallel.py`);
- local instances on GPUs: `instances x tp` GPUs are visible (or `--share-gpus`), and one rank's
  shard of the weights (checkpoint bytes / tp) fits in the smallest GPU's memory with room left
  for the KV cache and the adapter pool (`GPU_WEIGHT_FRACTION`);
- local instances on the CPU: the host's available memory holds every instance's weights.

Under Ray the actor asks Ray for `tp` GPUs (ray_cluster.py) and Ray refuses what no node has;
only the model split is checked here then.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
from typing import Optional

from caraserve_router.contracts.configs import InstanceConfig
from caraserve_router.contracts.tensor_parallel import tp_split_problem
from caraserve_router.frontend.gpu_assignment import assign_gpus, visible_gpus

# At most this share of a GPU's memory may go to its rank's weights: the rest is the KV cache,
# the LoRA pool (12% by default) and CUDA's own.
GPU_WEIGHT_FRACTION = 0.8


def checkpoint_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(model_dir, "*.safetensors")))


def gpu_memory_bytes() -> Optional[int]:
    """The smallest visible GPU's memory (nvidia-smi), or None when it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    values = [int(v) for v in out.stdout.split() if v.strip().isdigit()] if out.returncode == 0 else []
    return min(values) * 2**20 if values else None


def available_host_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_tp_capacity(template: InstanceConfig, instances: int, share_gpus: bool, local: bool) -> None:
    """ValueError (with the reason) when `instances` local instances of `template.tp` ranks do
    not fit this host; nothing when tp = 1 (the existing checks cover that)."""
    tp = template.tp
    if tp == 1:
        return
    with open(os.path.join(template.model_dir, "config.json")) as f:
        problem = tp_split_problem(json.load(f), tp)
    if problem:
        raise ValueError(problem)
    if not local or instances == 0:
        return
    weights = checkpoint_bytes(template.model_dir)
    gpus = visible_gpus() if template.device != "cpu" else []
    if template.device == "cuda" and not gpus:
        raise ValueError(f"--tp {tp} with --device cuda, but this host shows no GPU")
    if gpus:
        assign_gpus(instances, share_gpus, gpus, per_instance=tp)  # refuses too few GPUs, with the counts
        memory = gpu_memory_bytes()
        if memory is not None and weights / tp > GPU_WEIGHT_FRACTION * memory:
            raise ValueError(
                f"--tp {tp}: one rank's shard of the weights is {weights / tp / 2**30:.1f} GiB, more than "
                f"{GPU_WEIGHT_FRACTION:.0%} of a {memory / 2**30:.0f} GiB GPU; use a larger --tp")
        return
    available = available_host_bytes()
    if available is not None and weights * instances > available:
        raise ValueError(
            f"--tp {tp} on the CPU: {instances} instance(s) need {weights * instances / 2**30:.1f} GiB of weights, "
            f"the host has {available / 2**30:.1f} GiB available")
