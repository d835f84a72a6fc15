"""The instance side of `--lora-mode auto`: the inputs of the rule, measured here, and its record.

The rule itself is `contracts/auto_choice.py` (shared with the policies and the simulator). This
module gathers what it needs when a step first meets an adapter that is still loading:

- the link's rate, measured at start (`measure_link`): on CUDA a timed pinned host -> device
  copy; on the emulated link its configured rate (labelled emulated, it *is* the emulation);
- the bytes still to copy (the layers of the entry not yet resident), and the link time of the
  loads queued ahead of it (`DeviceLink.ms_ahead`: the link serves one load at a time);
- the prompt tokens of the step's rows that use the adapter, and the step's prefill time from
  a PerfModel-shaped fit (`ms = p0 + p_tok x tokens`) of this instance's own prefill steps,
  less their waits (`observe_step`); until two steps are seen the rule answers
  `no-prefill-estimate`;
- the sidecar's time per token and rank, from its start-up profile, its workers (0 when it is
  not healthy), and the tokens x rank the step already gives it for other loads.

The choice for a load holds until the load is done; `AutoMode` (modes.py) carries it out. Each
choice is counted by (mode, reason) in the runtime's stats (`/stats` lora.auto, `/metrics`
`caraserve_instance_auto_choices`) and logged.
"""
from __future__ import annotations

import collections
import logging
import math
import time
from typing import Optional

from caraserve_router.contracts.auto_choice import AutoChoice, ColdLoadCosts, choose, load_ms_of
from caraserve_router.contracts.names import LoraMode

log = logging.getLogger("caraserve.lora.auto")
PREFILL_WINDOW = 64  # warm prefill steps the fit keeps
# Per layer waited on / handed to the sidecar when `--lora-auto-layer-sync-us` is -1 (by link).
# cuda: what pipeline paid beyond on-demand's load wait in the H200 7B run, over 32 layers
# (docs/GPU.md: cold - warm 8.3 vs 6.2 ms with a 2.7 ms wait -> 0.15 ms; cold TTFT 30.1 vs 26.3
# ms -> 0.20 ms); emulated: the emulated link's default copy latency.
LAYER_SYNC_US = {"cuda": 180.0, "emulated": 20.0}


def measure_link(link, pool, lora_config) -> tuple[float, bool]:
    """(bytes per ms of the host -> device link, emulated?) measured now."""
    if link.emulated:
        return lora_config.link_bandwidth_mbps * 1e3, True
    import torch

    nbytes = 64 * 2**20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=pool.device)
    best = math.inf
    for _ in range(4):
        torch.cuda.synchronize(pool.device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(pool.device)
        best = min(best, time.perf_counter() - start)
    del host, dev
    return nbytes / (best * 1e3), False


class PrefillFit:
    """ms = p0 + p_tok x tokens over the last warm prefill steps (least squares)."""

    def __init__(self) -> None:
        self.points: collections.deque = collections.deque(maxlen=PREFILL_WINDOW)

    def observe(self, tokens: int, ms: float) -> None:
        if tokens > 0 and ms > 0:
            self.points.append((tokens, ms))

    def predict(self, tokens: int) -> Optional[float]:
        if len(self.points) < 2:
            return None
        n = len(self.points)
        mx = sum(t for t, _ in self.points) / n
        my = sum(m for _, m in self.points) / n
        sxx = sum((t - mx) ** 2 for t, _ in self.points)
        if sxx == 0:  # one length seen: proportional
            return my * tokens / mx
        slope = max(0.0, sum((t - mx) * (m - my) for t, m in self.points) / sxx)
        return max(0.0, my - slope * mx) + slope * tokens


class AutoChooser:
    """Chooses a mode per cold load (`decide`) and keeps the choices for `AutoMode`."""

    def __init__(self, runtime, lora_config) -> None:
        self.runtime = runtime
        self.bytes_per_ms, self.emulated = runtime.link_bytes_per_ms, runtime.link.emulated
        kind = "emulated" if self.emulated else "cuda"
        sync_us = lora_config.auto_layer_sync_us if lora_config.auto_layer_sync_us >= 0 else LAYER_SYNC_US[kind]
        self.layer_sync_ms = sync_us / 1e3
        self.latency_ms = lora_config.link_latency_us / 1e3 if self.emulated else 0.0
        self.group_size = lora_config.layer_group_size
        self.prefill = PrefillFit()
        self.choices: dict = {}  # storage key -> LoraMode, while its load runs (AutoMode reads it)
        self._entries: dict = {}  # storage key -> PoolEntry of a decided load
        self.counts: collections.Counter = collections.Counter()  # (mode, reason) -> loads
        self.last: Optional[AutoChoice] = None
        self._predicted_ms: Optional[float] = None  # the step time predicted for the last deciding step
        log.info("auto mode: link %.1f MB/s (%s), %.0f us per layer sync", self.bytes_per_ms / 1e3,
                 "emulated" if self.emulated else "measured", sync_us)

    def sidecar_ms_per_token_rank(self) -> float:
        sidecar = self.runtime.sidecar
        if sidecar is None:
            return math.inf
        prof = sidecar.profile
        if prof:  # one worker, one layer (all four groups), at the profile's rank
            return prof["per_token_us"] / 1e3 / prof["rank"]
        from caraserve_router.lora.sidecar.profiling import PROFILE_LAYER_BUDGET_MS, PROFILE_RANK

        return PROFILE_LAYER_BUDGET_MS / max(1, sidecar.tokens_per_core) / PROFILE_RANK

    def _forget_done(self) -> None:
        for key in [k for k, e in self._entries.items()
                    if e.residency.all_ready() or self.runtime.pool.get(k) is not e]:
            del self._entries[key]
            del self.choices[key]

    def decide(self, entries: list, seg_lens: Optional[list]) -> None:
        """Choose for every entry of this step that is still loading and has no choice yet."""
        self._forget_done()
        loading = {e.name: e for e in entries if e is not None and not e.residency.all_ready()}
        # a key decided for an earlier pool entry (evicted, placed again) is a new load
        new = [e for k, e in loading.items() if self._entries.get(k) is not e]
        if not new:
            return
        lens = seg_lens or [1] * len(entries)
        step_tokens = sum(lens)
        layers = self.runtime.shapes.num_layers
        sidecar = self.runtime.sidecar
        workers = sidecar.num_workers if sidecar is not None and sidecar.healthy() else 0

        def all_module_rank(entry) -> float:
            # the sidecar's profile ran a rank-r adapter on all seven projections; an adapter on
            # fewer costs its bytes' worth of that: bytes / bytes of one all-projection rank
            return self.runtime.pool.entry_bytes(entry) / self.runtime.page_bytes

        def token_rank(entry) -> float:
            return sum(n for e, n in zip(entries, lens) if e is entry) * all_module_rank(entry)

        queued = sum(token_rank(e) for k, e in loading.items() if self.choices.get(k) is LoraMode.CPU_ASSIST)
        for entry in new:
            tokens = sum(n for e, n in zip(entries, lens) if e is entry)
            pending = sum(1 for i in range(layers) if not entry.residency.is_ready(i))
            store = self.runtime.store  # the host copy's bytes are what the link moves
            nbytes = store.get(entry.name).nbytes if entry.name in store else self.runtime.pool.entry_bytes(entry)
            load_bytes = nbytes * pending / layers
            costs = ColdLoadCosts(
                load_ms=load_ms_of(load_bytes, self.bytes_per_ms, math.ceil(pending / self.group_size),
                                   self.latency_ms),
                prompt_tokens=tokens, rank=all_module_rank(entry), prefill_ms=self.prefill.predict(step_tokens), layers=layers,
                queued_ms=self.runtime.link.ms_ahead(entry, self.bytes_per_ms),
                sidecar_ms_per_token_rank=self.sidecar_ms_per_token_rank(),
                sidecar_workers_free=workers, sidecar_queued_token_rank=queued, layer_sync_ms=self.layer_sync_ms)
            choice = choose(costs)
            if choice.mode is LoraMode.CPU_ASSIST:
                queued += token_rank(entry)
            self.choices[entry.name] = choice.mode
            self._entries[entry.name] = entry
            self.counts[(choice.mode.value, choice.reason.value)] += 1
            self.last = choice
            log.info("auto: adapter %s (rank %d, %.1f MB, %.1f ms behind other loads, %d tokens, step of %d "
                     "predicted %s ms): %s", entry.name, entry.rank, load_bytes / 1e6, costs.queued_ms, tokens,
                     step_tokens, "-" if costs.prefill_ms is None else f"{costs.prefill_ms:.0f}", choice.describe())
            self._predicted_ms = costs.prefill_ms

    def observe_step(self, batch, seconds: float) -> None:
        """A prefill (or mixed) step's device time for the fit: its time less what it waited for
        loads and for the sidecar beyond the overlap (`sidecar_s`: time spent collecting its
        answers). Assisted steps count too: in a workload where most prompts are cold they are
        most of the prefills, and leaving them out left auto without an estimate."""
        if not batch.is_prefill:
            return
        c = batch.counters
        waited = c.get("full_wait_s", 0.0) + c.get("layer_wait_s", 0.0) + c.get("sidecar_s", 0.0)
        if self._predicted_ms is not None:  # a step that decided a load: how far the estimate was
            log.debug("auto: step of %d tokens took %.1f ms (predicted %.1f), waited %.1f ms for loads, "
                      "%.1f for the sidecar", batch.row_starts[-1], seconds * 1e3, self._predicted_ms,
                      1e3 * (c.get("full_wait_s", 0.0) + c.get("layer_wait_s", 0.0)), 1e3 * c.get("sidecar_s", 0.0))
            self._predicted_ms = None
        self.prefill.observe(batch.row_starts[-1], (seconds - waited) * 1e3)

    def stats(self) -> dict:
        return {"link_mb_s": self.bytes_per_ms / 1e3, "link_emulated": self.emulated,
                "layer_sync_us": self.layer_sync_ms * 1e3,
                "sidecar_us_per_token_rank": 1e3 * self.sidecar_ms_per_token_rank()
                if math.isfinite(self.sidecar_ms_per_token_rank()) else None,
                "prefill_points": len(self.prefill.points),
                "choices": [{"mode": m, "reason": r, "loads": n} for (m, r), n in sorted(self.counts.items())]}
