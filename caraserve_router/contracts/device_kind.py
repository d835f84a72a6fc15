"""Names of device kinds, the keys of per-kind PerfModels (`--perf-models-dir`).

A kind is `<device type>:<product>`: `cuda:NVIDIA H200` (the GPU's product name) or
`cpu:<model name of /proc/cpuinfo>`, so two GPU kinds, or a GPU and this VM's CPU, never share a
model. The instance reports its kind as `device` in its stats, the profiler writes it into the
PerfModel's `metadata.device`, and the catalog matches the longest device name contained in an
instance's kind (frontend/perf_models.py). Pure Python: the CUDA product name is passed in.
"""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says, else 'unknown'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or "unknown"
    except OSError:
        pass
    return platform.processor() or "unknown"


def kind_name(device_type: str, product: str = "") -> str:
    """`cuda:<product>` or `cpu:<model>` (the CPU's model when `product` is not given)."""
    device_type = device_type.split(":", 1)[0]
    if device_type == "cpu":
        return f"cpu:{product or cpu_model()}"
    return f"{device_type}:{product or 'unknown'}"
