"""Which device an instance computes on: CUDA when present, else the CPU. One setting."""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Map a config value to a torch device; "auto" picks CUDA when available."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but this torch build has no usable CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Model dtype; "auto" is float32 on the CPU (no fast half kernels there), float16 on CUDA."""
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    }
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in table:
        raise ValueError(f"dtype must be auto or one of {sorted(table)}, got {name!r}")
    return table[name]
