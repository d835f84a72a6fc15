"""The adapter resolver (`--lora-adapter-dir DIR`, vLLM's filesystem resolver) and the default
device pool size.

A request naming an adapter that is not registered registers `DIR/<name>` on first use, so a
directory of thousands of adapters needs no registration calls. Names are plain directory
names: anything else (`..`, a `/`, an absolute path, a name whose real path leaves DIR through a
symlink) is refused with 400 and never read.
"""
from __future__ import annotations

import os
import re

import torch

from caraserve_router.lora.adapter_store import AdapterError

_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CPU_POOL_MB = 256.0


class AdapterResolver:
    def __init__(self, directory: str):
        self.root = os.path.realpath(directory)

    def path(self, name: str) -> str:
        """DIR/name for a plain name that names a directory inside DIR."""
        if not isinstance(name, str) or not _PLAIN.match(name) or ".." in name:
            raise AdapterError(f"adapter name {name!r} is not a plain name (letters, digits, . _ -; no '..', "
                               "no '/'): the resolver does not look it up", 400)
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.dirname(path) != self.root:
            raise AdapterError(f"adapter {name!r} resolves outside the adapter directory", 400)
        if not os.path.isdir(path):
            raise AdapterError(f"adapter {name!r} is not registered and not in the adapter directory", 404)
        return path


def pool_mb(lora_config, device: torch.device) -> float:
    """--lora-pool-mb, or its default: a fraction of the GPU's memory (the KV cache is sized by
    LightLLM's token budget, not by free memory, so the pool is a fixed slice beside it), 256 MiB
    on the CPU."""
    if lora_config.pool_mb:
        return lora_config.pool_mb
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return lora_config.pool_fraction * total / 2**20
    return CPU_POOL_MB
