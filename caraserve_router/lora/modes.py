"""The four LoRA modes: what a step does with an adapter not (fully) on the device.

All modes give the same tokens; only the timing differs.

| mode | admission | a layer not yet resident |
|---|---|---|
| `cached` | every adapter is preloaded and pinned at registration (the ideal) | never happens |
| `on-demand` | load starts | the whole step waits for the full load before the forward (S-LoRA): the running batch stalls |
| `pipeline` | load starts, layer group by group | the forward waits for that layer only (vLLM / SGLang overlap loading) |
| `cpu-assist` | load starts, layer group by group | the CPU sidecar computes that layer's LoRA term for the rows of that adapter; the device kernel runs for the rest (CaraServe). If the sidecar fails or is late, it falls back to waiting, like `pipeline` |
| `auto` | load starts, layer group by group | per load, what `on-demand`, `pipeline` or `cpu-assist` would do, whichever the rule of `contracts/auto_choice.py` finds cheapest (chosen by `lora/auto_mode.py` when a step first meets the load; `pipeline` until chosen) |

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


class AutoMode(Mode):
    """Each loading adapter takes the mode chosen for its load (`choices`: storage key ->
    LoraMode, written by `AutoChooser.decide` before the step is built); undecided: pipeline."""

    kind = LoraMode.AUTO

    def __init__(self, choices: dict | None = None) -> None:
        self.choices = {} if choices is None else choices

    def _of(self, entries, mode: LoraMode) -> tuple:
        return tuple(e for e in entries if self.choices.get(e.name, LoraMode.PIPELINE) is mode)

    def step(self, loading: list) -> StepDecision:
        return StepDecision(wait_full=self._of(loading, LoraMode.ON_DEMAND),
                            arm_sidecar=bool(self._of(loading, LoraMode.CPU_ASSIST)))

    def layer(self, pending: list) -> LayerDecision:
        return LayerDecision(wait=self._of(pending, LoraMode.PIPELINE), sidecar=self._of(pending, LoraMode.CPU_ASSIST))


# AUTO's entry here has no choices (all pipeline); the runtime builds its own with its chooser's.
MODES: dict[LoraMode, Mode] = {m.kind: m() for m in (CachedMode, OnDemandMode, PipelineMode, CpuAssistMode,
                                                      AutoMode)}


def mode_for(mode: LoraMode) -> Mode:
    """The policy of `mode` (`LoRAConfig.mode`, parsed once into the enum)."""
    return MODES[mode]
