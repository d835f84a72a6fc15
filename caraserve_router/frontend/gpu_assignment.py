"""One host, many GPUs, no Ray: local instance i gets GPU i.

Each local instance process is started with `CUDA_VISIBLE_DEVICES` set to one GPU, so its
`cuda` device is that GPU (without this every instance resolves `cuda` to GPU 0). More
instances than GPUs are refused unless `--share-gpus` (then instance i gets GPU i mod n).
The GPUs are found without CUDA or torch (the front end never imports them): the
`CUDA_VISIBLE_DEVICES` the front end was given, else the NVIDIA driver's `/proc` entries, else
`nvidia-smi -L`; a host with none runs its instances on the CPU as before.
"""
from __future__ import annotations

import glob
import os
import subprocess
from typing import Optional


def visible_gpus() -> list[str]:
    """The GPU ids (as CUDA_VISIBLE_DEVICES spells them) this front end may hand out."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and g.strip() != "-1"]
    count = len(glob.glob("/proc/driver/nvidia/gpus/*"))
    if not count:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            count = sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0
        except (OSError, subprocess.SubprocessError):
            count = 0
    return [str(i) for i in range(count)]


def assign_gpus(count: int, share: bool, gpus: Optional[list[str]] = None, per_instance: int = 1) -> list[Optional[str]]:
    """The GPU(s) of each of `count` local instances, as CUDA_VISIBLE_DEVICES (None everywhere
    on a host without GPUs). A tensor-parallel instance (`per_instance` = tp) gets that many
    consecutive GPUs, its rank k the k-th of them."""
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return [None] * count
    if per_instance > len(gpus):
        raise ValueError(f"--tp {per_instance} needs {per_instance} GPUs per instance; this host has "
                         f"{len(gpus)} ({','.join(gpus)})")
    if count * per_instance > len(gpus) and not share:
        each = f" for {per_instance} GPUs each (--tp {per_instance})" if per_instance > 1 else ""
        raise ValueError(f"{count} local instances but {len(gpus)} GPU(s) ({','.join(gpus)}){each}: give at most "
                         f"{len(gpus) // per_instance} instances, or --share-gpus to put several on one GPU")
    return [",".join(gpus[(i * per_instance + k) % len(gpus)] for k in range(per_instance)) for i in range(count)]



def gpu_env(gpu: Optional[str]) -> Optional[dict]:
    """The environment of an instance process bound to `gpu` (None: inherit unchanged)."""
    if gpu is None:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
