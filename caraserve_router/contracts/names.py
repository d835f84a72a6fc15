"""Names shared by the front end, the scheduler, the simulator and the instance, each defined once.

A mode or kernel is an enum member whose value is the string users type (`--lora-mode
cpu-assist`) and that travels in JSON; code asks its capabilities (`mode.uses_sidecar`), never
compares strings. Pure Python: importable without torch or LightLLM.
"""
from __future__ import annotations

import enum


class LoraMode(str, enum.Enum):
    """What happens when a batch uses an adapter that is not (fully) on the device."""

    CACHED = "cached"          # every adapter preloaded and pinned: the ideal
    ON_DEMAND = "on-demand"    # the whole step waits for the full load (S-LoRA)
    PIPELINE = "pipeline"      # layer-wise load; the forward waits per layer (vLLM / SGLang)
    CPU_ASSIST = "cpu-assist"  # layer-wise load; the CPU sidecar computes missing layers (CaraServe)
    AUTO = "auto"              # per cold load, the cheapest of the three above (contracts/auto_choice.py)

    @property
    def preloads(self) -> bool:
        """Adapters are loaded and pinned at registration, so no request is ever cold."""
        return self is LoraMode.CACHED

    @property
    def uses_sidecar(self) -> bool:
        """The instance runs CPU LoRA worker processes."""
        return self in (LoraMode.CPU_ASSIST, LoraMode.AUTO)

    def __str__(self) -> str:
        return self.value


class DecodeKernel(str, enum.Enum):
    """The decode LoRA kernel, and the batch feature its step latency grows with."""

    BGMV = "bgmv"    # Punica: adapters padded to the batch's max rank -> batch x max rank
    MBGMV = "mbgmv"  # S-LoRA: heterogeneous ranks unpadded -> sum of ranks

    @property
    def pads_to_max_rank(self) -> bool:
        return self is DecodeKernel.BGMV

    def __str__(self) -> str:
        return self.value


def values(enum_cls) -> tuple[str, ...]:
    """The user-facing strings of an enum, in definition order (CLI choices, error messages)."""
    return tuple(m.value for m in enum_cls)
