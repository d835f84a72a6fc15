"""Engine side of the simulator: one simulated request, one simulated instance (running batch,
queue, adapter residency LRU, link), and the duration of a prefill step with cold adapters by
LoRA mode (`PREFILL_WITH_COLD`; the rules are in `simulator.py`'s docstring).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Callable

from caraserve_router.contracts.names import LoraMode
from caraserve_router.evaluation.sim_config import SimConfig
from caraserve_router.evaluation.workload import Request
from caraserve_router.scheduling.scheduler_state import RequestInfo

# Life of a SimRequest (plain ints: the event loop compares them millions of times).
QUEUED, PREFILLING, RUNNING, DONE = 0, 1, 2, 3


class SimRequest:
    __slots__ = ("req", "info", "state", "inst", "first_t", "finish_t")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.info = RequestInfo(req.index, req.adapter, req.rank, req.prompt_tokens, req.output_tokens)
        self.state = QUEUED
        self.inst = -1
        self.first_t = self.finish_t = None


class SimInstance:
    """Engine-side state of one simulated instance."""

    def __init__(self, index: int, cfg: SimConfig) -> None:
        self.index = index
        self.queue: deque[SimRequest] = deque()
        self.running = 0
        self.sum_r = 0
        self.max_r = 0
        self.rank_counts: dict[int, int] = {}
        self.steps = 0
        self.finish_heap: list = []
        self.wait = 0
        self.busy = False
        self.step_batch: list[SimRequest] | None = None     # the prefill batch in flight, else None
        self.assist_until = 0.0                              # cpu-assist: a load is still running
        self.link_free = 0.0
        self.cached = cfg.lora_mode.preloads
        self.capacity = cfg.adapter_capacity_ranks
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.resident_ranks = 0
        self.pins: dict[str, int] = {}
        self.cold_loads = 0
        self.busy_s = 0.0

    def add_running(self, rank: int) -> None:
        self.running += 1
        self.sum_r += rank
        self.rank_counts[rank] = self.rank_counts.get(rank, 0) + 1
        if rank > self.max_r:
            self.max_r = rank

    def remove_running(self, rank: int) -> None:
        self.running -= 1
        self.sum_r -= rank
        left = self.rank_counts[rank] - 1
        if left:
            self.rank_counts[rank] = left
        else:
            del self.rank_counts[rank]
            if rank == self.max_r:
                self.max_r = max(self.rank_counts, default=0)

    def touch(self, adapter: str, rank: int) -> bool:
        """Use ``adapter`` in a prefill; True if it had to be loaded (cold)."""
        self.pins[adapter] = self.pins.get(adapter, 0) + 1
        if self.cached:
            return False
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            return False
        self.resident[adapter] = rank
        self.resident_ranks += rank
        self.cold_loads += 1
        self._evict(adapter)
        return True

    def _evict(self, keep: str) -> None:
        if self.capacity is None:
            return
        for name in list(self.resident):
            if self.resident_ranks <= self.capacity:
                return
            if name != keep and not self.pins.get(name):
                self.resident_ranks -= self.resident.pop(name)

    def unpin(self, adapter: str) -> None:
        left = self.pins[adapter] - 1
        if left:
            self.pins[adapter] = left
        else:
            del self.pins[adapter]

    def resident_stats(self) -> list[dict[str, Any]]:
        return [{"name": a, "rank": r} for a, r in self.resident.items()]


def _cold_cached(inst, t, prefill_ms, loads_ms, pm):
    return prefill_ms


def _cold_on_demand(inst, t, prefill_ms, loads_ms, pm):
    load_end = max(t, inst.link_free) + loads_ms / 1000.0
    inst.link_free = load_end
    return (load_end - t) * 1000.0 + prefill_ms


def _cold_pipeline(inst, t, prefill_ms, loads_ms, pm):
    load_end = max(t, inst.link_free) + loads_ms / 1000.0
    inst.link_free = load_end
    return max(prefill_ms, (load_end - t) * 1000.0)


def _cold_cpu_assist(inst, t, prefill_ms, loads_ms, pm):
    load_end = max(t, inst.link_free) + loads_ms / 1000.0
    inst.link_free = load_end
    inst.assist_until = max(inst.assist_until, load_end)
    return prefill_ms * (1.0 + pm.cpu_assist_overhead)


def _cold_auto(inst, t, prefill_ms, loads_ms, pm):
    """The step as the cheapest of on-demand, pipeline and cpu-assist would run it (by this
    module's own rules, so auto is the best fixed mode per step here: an oracle of the model)."""
    wait_ms = (max(t, inst.link_free) - t) * 1000.0 + loads_ms
    options = ((wait_ms + prefill_ms, _cold_on_demand), (max(prefill_ms, wait_ms), _cold_pipeline),
               (prefill_ms * (1.0 + pm.cpu_assist_overhead), _cold_cpu_assist))
    return min(options, key=lambda o: o[0])[1](inst, t, prefill_ms, loads_ms, pm)


# Duration (ms) of a prefill step with ``loads_ms`` > 0 of cold adapters, by LoRA mode.
PREFILL_WITH_COLD: dict[LoraMode, Callable] = {
    LoraMode.CACHED: _cold_cached,
    LoraMode.ON_DEMAND: _cold_on_demand,
    LoraMode.PIPELINE: _cold_pipeline,
    LoraMode.CPU_ASSIST: _cold_cpu_assist,
    LoraMode.AUTO: _cold_auto,
}
