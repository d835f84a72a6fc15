"""Joining a tensor-parallel instance's process group (every rank, before its model is built).

Replaces the part of upstream `ModeBackend.init_model` that calls
`dist.init_process_group("nccl", ...)` and `torch.cuda.set_device(rank)`: NCCL with rank k on
GPU k on CUDA, as upstream, and gloo over loopback on the CPU (upstream has no CPU path).
LightLLM's TP llama then all-reduces and all-gathers on the default group.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# A collective whose peer is gone fails after this long instead of torch's 30-minute default
# (the instance's rank monitor normally notices a dead rank first and stops the instance).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def join_group(device: torch.device, rank: int, world_size: int, port: int) -> torch.device:
    """Join the group of `world_size` ranks rendezvousing at 127.0.0.1:`port`; returns the
    rank's device (cuda:rank on CUDA, the CPU otherwise)."""
    if device.type == "cuda":
        if torch.cuda.device_count() < world_size:
            raise ValueError(f"tp={world_size} needs {world_size} GPUs; this host has {torch.cuda.device_count()}")
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks of one host talk over loopback
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    return device


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
