"""The four LoRA modes: what a step does with an adapter not (fully) on the device.

All modes give the same tokens; only the timing differs.

| mode | admission | a layer not yet resident |
|---|---|---|
| `cached` | every adapter is preloaded and pinned at registration (the ideal) | never happens |
| `on-demand` | load starts | the whole step waits for the full load before the forward (S-LoRA): the running batch stalls |
| `pipeline` | load starts, layer group by group | the forward waits for that layer only (vLLM / SGLang overlap loading) |
| `cpu-assist` | load starts, layer group by group | the CPU sidecar computes that layer's LoRA term for the rows of that adapter; the device kernel runs for the rest (CaraServe). If the sidecar fails or is late, it falls back to waiting, like `pipeline` |

A mode only *decides*; it holds no state and writes nowhere. Per step the flow runs one way
(nano-vllm's schedule -> run -> postprocess): the runtime asks the mode for a `StepDecision`
when it builds the step's `LoraBatch`, the batch asks it for a `LayerDecision` per layer
whose adapters are still loading and carries both out (waits, sidecar calls, per-step
counters), and the runtime folds the batch's counters in after the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

from caraserve_router.contracts.names import LoraMode


@dataclass(frozen=True)
class StepDecision:
    """What a step does before its forward, given the adapters of the batch still loading."""

    wait_full: tuple = ()      # PoolEntry: wait for the whole load of each before the forward
    arm_sidecar: bool = False  # the sidecar's workers stop napping for this step


@dataclass(frozen=True)
class LayerDecision:
    """What a layer does with the adapters (PoolEntry) not resident at it."""

    wait: tuple = ()     # wait for these adapters' copy of this layer, then run the device kernel
    sidecar: tuple = ()  # the CPU sidecar computes these adapters' rows (device kernel skips them)


class Mode:
    """The waiting behaviour shared by `pipeline` and the fallback of the others."""

    kind = LoraMode.PIPELINE

    def step(self, loading: list) -> StepDecision:
        return StepDecision()

    def layer(self, pending: list) -> LayerDecision:
        return LayerDecision(wait=tuple(pending))


class CachedMode(Mode):
    kind = LoraMode.CACHED  # adapters are preloaded (LoraMode.preloads): nothing is ever pending


class OnDemandMode(Mode):
    kind = LoraMode.ON_DEMAND

    def step(self, loading: list) -> StepDecision:
        return StepDecision(wait_full=tuple(loading))


class PipelineMode(Mode):
    kind = LoraMode.PIPELINE


class CpuAssistMode(Mode):
    kind = LoraMode.CPU_ASSIST

    def step(self, loading: list) -> StepDecision:
        return StepDecision(arm_sidecar=bool(loading))

    def layer(self, pending: list) -> LayerDecision:
        return LayerDecision(sidecar=tuple(pending))


MODES: dict[LoraMode, Mode] = {m.kind: m() for m in (CachedMode, OnDemandMode, PipelineMode, CpuAssistMode)}


def mode_for(mode: LoraMode) -> Mode:
    """The policy of `mode` (`LoRAConfig.mode`, parsed once into the enum)."""
    return MODES[mode]
