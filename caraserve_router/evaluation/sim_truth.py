"""Simulated steps drawn from a measured truth table (`--truth`), while the policies keep
predicting with their fitted PerfModel.

A prefill batch with cold adapters runs as its instance's mode would run it, on the table's
costs: the link is the table's (loads of one instance serial), and

- on-demand: the load, then the prefill;
- pipeline: the prefill, late by its worst layer's wait (`pipeline_late_ms`: the loads ahead on
  the link, then layer i lands at (i+1) L / N), + a sync per layer;
- cpu-assist: the layers not yet resident when the forward reaches them (`covered_layers`) have
  their LoRA term computed by the host's sidecar workers (`SidecarHost`: concurrent
  cpu-assisted prefills of the instances of one host queue for them); the step ends when both
  the device's prefill and the sidecar's work are done, + a sync per layer;
- auto: what the instance would choose *predicting with the PerfModel* (scheduling/cold_costs),
  then run as above on the table's costs: auto is graded on measured costs, not on its own.

Decode steps during a cpu-assisted load pay nothing extra here (one token per row: the sidecar's
share is far under a step); that flatters cpu-assist and auto slightly.
"""
from __future__ import annotations

import random

from caraserve_router.contracts.auto_choice import covered_layers, pipeline_late_ms
from caraserve_router.contracts.names import LoraMode
from caraserve_router.evaluation.truth_table import SidecarHost, TruthTable
from caraserve_router.scheduling.cold_costs import auto_choice


class TruthSteps:
    def __init__(self, table: TruthTable, mode: LoraMode, num_instances: int, instances_per_host: int,
                 seed: int = 0) -> None:
        self.table = table
        self.mode = mode
        self.rng = random.Random(seed)
        self.per_host = max(1, instances_per_host)
        workers = (table.sidecar or {}).get("workers", 1)
        self.hosts = [SidecarHost(workers) for _ in range((num_instances + self.per_host - 1) // self.per_host)]
        self.choices: dict = {}  # auto: LoraMode -> prefills

    def decode_ms(self, batch: int, sum_ranks: int, max_rank: int, kernel) -> float:
        return self.table.decode_ms(batch, sum_ranks, max_rank, str(kernel), self.rng)

    def prefill_ms(self, inst, t: float, prompts: list, cold: list, pm) -> float:
        """Duration (ms) of a prefill batch of (tokens, rank) `prompts` starting at `t` (s), of
        which `cold` are (tokens, rank) of adapters not resident."""
        tab = self.table
        prefill = tab.prefill_batch_ms(prompts, self.rng)
        if not cold or self.mode is LoraMode.CACHED:
            return prefill
        mode = self.mode
        start = max(t, inst.link_free)
        queued = (start - t) * 1000.0  # the instance's earlier loads still on the link
        if mode is LoraMode.AUTO:
            tokens = sum(p for p, _ in cold)
            rank = max(r for _, r in cold)
            predicted = pm.prefill_batch_ms(sum(p for p, _ in prompts), sum(p * r for p, r in prompts))
            mode = auto_choice(pm, tokens, rank, predicted, queued_ms=queued).mode
            self.choices[mode.value] = self.choices.get(mode.value, 0) + 1
        load_ms = sum(tab.load_ms(r) for _, r in cold)
        inst.link_free = start + load_ms / 1000.0
        n = tab.layers
        sync = n * tab.load.get("layer_sync_ms", 0.0)
        if mode is LoraMode.ON_DEMAND:
            return queued + load_ms + prefill
        if mode is LoraMode.PIPELINE or not tab.sidecar:
            return prefill + pipeline_late_ms(load_ms, prefill, n, queued) + sync
        covered = covered_layers(load_ms, prefill, n, queued)
        work = sum(tab.sidecar_ms(p, r, covered) for p, r in cold)
        end = self.hosts[inst.index // self.per_host].run(t, work)
        inst.assist_until = max(inst.assist_until, inst.link_free)
        return max(prefill, (end - t) * 1000.0) + sync

    def stats(self) -> dict:
        return {"truth": "measured", "truth_table": self.table.name, "truth_device": self.table.device,
                "sidecar_jobs": sum(h.jobs for h in self.hosts),
                "sidecar_queued_s": sum(h.queued_s for h in self.hosts), "auto_choices": dict(self.choices)}
