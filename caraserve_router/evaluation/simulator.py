"""Discrete-event simulator of a CaraServe cluster, driven by the live router's own policies.

Each simulated instance does LightLLM's continuous batching at decode-step granularity
(``lightllm/server/router/manager.py`` ``_step``):

- idle with requests queued -> prefill a new batch;
- otherwise decode the running batch; after every ``max_wait_steps`` decode steps (LightLLM's
  ``router_max_wait_tokens``, default 10) it tries to prefill a new batch from its queue
  instead (FIFO, up to ``max_batch`` running requests and ``max_prefill_tokens`` prompt
  tokens); the prefill step stalls decoding; the counter restarts after each try;
- a prefill step produces each new request's first token; each decode step one token of
  every running request. Step durations come from the PerfModel.

Adapter residency per instance: an LRU of adapters on the device (capacity in rank units,
``adapter_capacity_ranks``; adapters of queued-for-prefill or running requests are never
evicted). A prefill batch that holds non-resident adapters pays a cold start by LoRA mode
(loads of one instance share its link, serially):

- cached: nothing (every adapter preloaded);
- on-demand: the step first loads every cold adapter, then prefills (the running batch waits);
- pipeline: layer-wise overlap: the step ends at max(prefill end, load end) (the device
  waits per layer; the last layer's own compute after its load is ignored);
- cpu-assist: the prefill starts at once, CPUs compute the cold adapters' LoRA terms
  (step time x (1 + cpu_assist_overhead)); the load continues in the background, and
  decode steps that start before it ends also run with CPU help (x (1 + overhead)), as
  caraserve_router/lora/modes.py does for any step whose adapter is still loading.

The router side is the live router's code: a ``ClusterState`` of ``InstanceState`` views
fed with the same events (dispatched, first token, decode steps, finished), and the policy
object from ``policies.make_policy``. When the policy returns None the request waits in a
router queue (FIFO) and is offered again whenever a request finishes. The views' adapter
residency is reconciled with the simulated instances every ``sync_interval_s`` through
``apply_stats`` (as the api_server polls instance stats); dlora's ``rebalance`` hook runs on
the same tick, moving requests that are still in an instance's queue.

Per request: TTFT (first token - arrival), TPOT ((finish - first token) / (output - 1)),
E2E, and the paper artifact's per-token latency E2E / output tokens.
"""
from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from caraserve_router.contracts.names import DecodeKernel, LoraMode, values
from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.policies import Policy, PolicyConfig, make_policy
from caraserve_router.scheduling.scheduler_state import ClusterState, InstanceState, RequestInfo
from caraserve_router.evaluation.workload import Request, Workload

_STEP, _SYNC = 0, 1
_QUEUED, _PREFILLING, _RUNNING, _DONE = 0, 1, 2, 3


class SimulatorError(ValueError):
    """Bad simulator configuration."""


@dataclass(frozen=True)
class SimConfig:
    """Cluster and engine settings of one simulation run.

    num_instances: instances in the cluster.
    max_batch: running requests per instance (LightLLM running_max_req_size).
    max_wait_steps: decode steps between tries to prefill new requests (router_max_wait_tokens).
    max_prefill_tokens: prompt tokens per prefill batch (None: no limit; one prompt always fits).
    lora_mode: a LoraMode (or its string), every instance.
    kernel: the DecodeKernel (or its string).
    adapter_capacity_ranks: device memory for adapters per instance, in rank units (None: no limit).
    sync_interval_s: period of the router's stats reconciliation and of dlora's rebalance.
    drain_limit_s: simulated time allowed after the last arrival; requests unfinished by
        then count as SLO misses (None: run until every request finishes).
    slo_tpot_ms: per-token latency SLO for attainment; slo_ttft_ms: optional TTFT SLO as well.
    progress_s: wall seconds between progress lines (0: silent).
    """

    num_instances: int = 8
    max_batch: int = 32
    max_wait_steps: int = 10
    max_prefill_tokens: int | None = None
    lora_mode: LoraMode = LoraMode.CACHED
    kernel: DecodeKernel = DecodeKernel.BGMV
    adapter_capacity_ranks: int | None = None
    sync_interval_s: float = 1.0
    drain_limit_s: float | None = 600.0
    slo_tpot_ms: float = 40.0
    slo_ttft_ms: float | None = None
    progress_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("num_instances", "max_batch", "max_wait_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SimulatorError(f"SimConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("max_prefill_tokens", "adapter_capacity_ranks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise SimulatorError(f"SimConfig.{name} must be None or an integer >= 1, got {v!r}")
        for name, enum_cls in (("lora_mode", LoraMode), ("kernel", DecodeKernel)):
            try:  # accept the user-facing string too (frozen: set through object)
                object.__setattr__(self, name, enum_cls(getattr(self, name)))
            except ValueError:
                raise SimulatorError(f"SimConfig.{name} must be one of {list(values(enum_cls))}, "
                                     f"got {getattr(self, name)!r}") from None
        for name in ("sync_interval_s", "slo_tpot_ms"):
            if not getattr(self, name) > 0:
                raise SimulatorError(f"SimConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("drain_limit_s", "slo_ttft_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise SimulatorError(f"SimConfig.{name} must be None or > 0, got {v!r}")
        if self.progress_s < 0:
            raise SimulatorError("SimConfig.progress_s must be >= 0")


class SimRequest:
    __slots__ = ("req", "info", "state", "inst", "dispatch_t", "first_t", "finish_t")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.info = RequestInfo(req.index, req.adapter, req.rank, req.prompt_tokens, req.output_tokens)
        self.state = _QUEUED
        self.inst = -1
        self.dispatch_t = self.first_t = self.finish_t = None


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


# Duration (ms) of a prefill step with ``loads_ms`` > 0 of cold adapters, by LoRA mode.
PREFILL_WITH_COLD: dict[LoraMode, Callable] = {
    LoraMode.CACHED: _cold_cached,
    LoraMode.ON_DEMAND: _cold_on_demand,
    LoraMode.PIPELINE: _cold_pipeline,
    LoraMode.CPU_ASSIST: _cold_cpu_assist,
}


class Simulation:
    """One run: a workload through a cluster under one policy."""

    def __init__(self, workload: Workload | Sequence[Request], perf_model: PerfModel, policy: Policy | str,
                 sim_config: SimConfig | None = None, policy_config: PolicyConfig | None = None,
                 label: str = "") -> None:
        self.cfg = sim_config or SimConfig()
        self.pm = perf_model
        if isinstance(policy, str):
            pcfg = policy_config or PolicyConfig(slo_tpot_ms=self.cfg.slo_tpot_ms, max_batch=self.cfg.max_batch)
            policy = make_policy(policy, pcfg)
        self.policy = policy
        self.requests = list(workload.requests if isinstance(workload, Workload) else workload)
        self.label = label
        cfg = self.cfg
        self.view = ClusterState([InstanceState(f"sim{i}", max_batch=cfg.max_batch, lora_mode=cfg.lora_mode,
                                                kernel=cfg.kernel) for i in range(cfg.num_instances)])
        self.insts = [SimInstance(i, cfg) for i in range(cfg.num_instances)]
        self._prefill_with_cold = PREFILL_WITH_COLD[cfg.lora_mode]
        self.events: list = []
        self._seq = 0
        self.router_queue: deque[SimRequest] = deque()
        self.records: list[SimRequest] = []
        self._by_id: dict[int, SimRequest] = {}
        self.now = 0.0
        self.moves = 0
        self.max_router_queue = 0
        self._in_system = 0

    # ------------------------------------------------------------------ event plumbing
    def _push(self, t: float, kind: int, index: int) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, index))

    def run(self) -> dict[str, Any]:
        """Simulate to the end; returns the metrics (see ``summarize``)."""
        wall0 = time.monotonic()
        reqs, n = self.requests, len(self.requests)
        last_arrival = reqs[-1].arrival_s if reqs else 0.0
        horizon = math.inf if self.cfg.drain_limit_s is None else last_arrival + self.cfg.drain_limit_s
        if n:
            self._push(reqs[0].arrival_s + self.cfg.sync_interval_s, _SYNC, -1)
        ai, events, count = 0, self.events, 0
        next_progress = wall0 + self.cfg.progress_s if self.cfg.progress_s else math.inf
        while True:
            next_arrival = reqs[ai].arrival_s if ai < n else math.inf
            if events and events[0][0] <= next_arrival:
                t, _, kind, index = heapq.heappop(events)
                if t > horizon:
                    break
                self.now = t
                if kind == _STEP:
                    self._step_end(self.insts[index], t)
                else:
                    self._sync(t, ai < n)
            elif ai < n:
                self.now = next_arrival
                self._arrive(reqs[ai], next_arrival)
                ai += 1
            else:
                break
            count += 1
            if count & 4095 == 0 and time.monotonic() >= next_progress:
                self._progress(ai, n, last_arrival, wall0)
                next_progress = time.monotonic() + self.cfg.progress_s
        return self.summarize(time.monotonic() - wall0)

    def _progress(self, ai: int, n: int, last_arrival: float, wall0: float) -> None:
        done = sum(1 for r in self.records if r.finish_t is not None)
        print(f"  [{self.label or self.policy.name}] sim t={self.now:7.1f}/{last_arrival:.0f}s "
              f"arrived {ai}/{n} finished {done} router-queue {len(self.router_queue)} "
              f"wall {time.monotonic() - wall0:5.1f}s", flush=True)

    # ------------------------------------------------------------------ router side
    def _arrive(self, req: Request, t: float) -> None:
        sr = SimRequest(req)
        self.records.append(sr)
        self._by_id[req.index] = sr
        self._in_system += 1
        if self.router_queue:
            self.router_queue.append(sr)
            self.max_router_queue = max(self.max_router_queue, len(self.router_queue))
            return
        index = self.policy.choose(sr.info, self.view.instances, self.pm)
        if index is None:
            self.router_queue.append(sr)
            self.max_router_queue = max(self.max_router_queue, len(self.router_queue))
        else:
            self._dispatch(sr, index, t)

    def _dispatch(self, sr: SimRequest, index: int, t: float) -> None:
        sr.inst, sr.dispatch_t = index, t
        self.view.dispatch(index, sr.info, t)
        inst = self.insts[index]
        inst.queue.append(sr)
        if not inst.busy:
            self._start_step(inst, t)

    def _drain_router_queue(self, t: float) -> None:
        rq = self.router_queue
        while rq:
            index = self.policy.choose(rq[0].info, self.view.instances, self.pm)
            if index is None:
                return
            self._dispatch(rq.popleft(), index, t)

    def _sync(self, t: float, more_arrivals: bool) -> None:
        """Periodic: reconcile residency views with the instances, then let the policy rebalance."""
        if not self.cfg.lora_mode.preloads:
            for inst, view in zip(self.insts, self.view.instances):
                view.apply_stats({"resident_adapters": inst.resident_stats()})
        for move in self.policy.rebalance(self.view.instances, self.pm):
            self._move(move.request_id, move.src, move.dst, t)
        if more_arrivals or self._in_system:
            self._push(t + self.cfg.sync_interval_s, _SYNC, -1)

    def _move(self, rid: int, src: int, dst: int, t: float) -> None:
        sr = self._by_id.get(rid)
        if sr is None or sr.state != _QUEUED or sr.inst != src:
            return                      # already prefilling or gone: the move does not apply
        self.insts[src].queue.remove(sr)
        self.view.move(rid, dst)
        sr.inst = dst
        self.moves += 1
        inst = self.insts[dst]
        inst.queue.append(sr)
        if not inst.busy:
            self._start_step(inst, t)

    # ------------------------------------------------------------------ engine side
    def _start_step(self, inst: SimInstance, t: float) -> None:
        cfg = self.cfg
        if inst.running == 0:
            if inst.queue:
                self._start_prefill(inst, t)
            else:
                inst.busy = False
            return
        if inst.wait >= cfg.max_wait_steps:
            inst.wait = 0
            if inst.queue and inst.running < cfg.max_batch:
                self._start_prefill(inst, t)
                return
        dur = self.pm.decode_step_ms(inst.running, inst.sum_r, inst.max_r, cfg.kernel) / 1000.0
        if t < inst.assist_until:
            dur *= 1.0 + self.pm.cpu_assist_overhead
        inst.busy = True
        inst.step_batch = None
        inst.busy_s += dur
        self._push(t + dur, _STEP, inst.index)

    def _start_prefill(self, inst: SimInstance, t: float) -> None:
        cfg, pm = self.cfg, self.pm
        room = cfg.max_batch - inst.running
        limit = cfg.max_prefill_tokens
        batch: list[SimRequest] = []
        tokens = rank_tokens = 0
        loads_ms = 0.0
        q = inst.queue
        while q and len(batch) < room:
            sr = q[0]
            p = sr.req.prompt_tokens
            if limit is not None and batch and tokens + p > limit:
                break
            q.popleft()
            sr.state = _PREFILLING
            batch.append(sr)
            tokens += p
            rank_tokens += p * sr.req.rank
            if sr.req.rank and inst.touch(sr.req.adapter, sr.req.rank):
                loads_ms += pm.predict_load_ms(sr.req.rank)
        prefill_ms = pm.prefill_batch_ms(tokens, rank_tokens)
        dur_ms = self._prefill_with_cold(inst, t, prefill_ms, loads_ms, pm) if loads_ms else prefill_ms
        inst.busy = True
        inst.step_batch = batch
        inst.busy_s += dur_ms / 1000.0
        self._push(t + dur_ms / 1000.0, _STEP, inst.index)

    def _step_end(self, inst: SimInstance, t: float) -> None:
        batch = inst.step_batch
        if batch is not None:
            self._prefill_end(inst, batch, t)
        else:
            inst.steps += 1
            inst.wait += 1
            self.view.instances[inst.index].decode_step()
            heap = inst.finish_heap
            freed = False
            while heap and heap[0][0] <= inst.steps:
                _, _, sr = heapq.heappop(heap)
                inst.remove_running(sr.req.rank)
                self._finish(inst, sr, t)
                freed = True
            if freed and self.router_queue:
                self._drain_router_queue(t)
        self._start_step(inst, t)

    def _prefill_end(self, inst: SimInstance, batch: list[SimRequest], t: float) -> None:
        view = self.view
        inst.step_batch = None
        inst.wait = 0
        freed = False
        for sr in batch:
            sr.first_t = t
            view.first_token(sr.req.index, t)
            if sr.req.output_tokens <= 1:
                self._finish(inst, sr, t)
                freed = True
                continue
            sr.state = _RUNNING
            inst.add_running(sr.req.rank)
            heapq.heappush(inst.finish_heap, (inst.steps + sr.req.output_tokens - 1, sr.req.index, sr))
        if freed and self.router_queue:
            self._drain_router_queue(t)

    def _finish(self, inst: SimInstance, sr: SimRequest, t: float) -> None:
        sr.finish_t = t
        sr.state = _DONE
        self._in_system -= 1
        self._by_id.pop(sr.req.index, None)
        self.view.finish(sr.req.index)
        if sr.req.rank:
            inst.unpin(sr.req.adapter)

    # ------------------------------------------------------------------ metrics
    def summarize(self, wall_s: float) -> dict[str, Any]:
        out = summarize_records(self.records, self.cfg.slo_tpot_ms, self.cfg.slo_ttft_ms)
        out.update({
            "policy": self.policy.name, "num_instances": self.cfg.num_instances,
            "lora_mode": self.cfg.lora_mode.value, "kernel": self.cfg.kernel.value,
            "cold_loads": sum(i.cold_loads for i in self.insts),
            "queued_moves": self.moves, "max_router_queue": self.max_router_queue,
            "instance_busy_frac": (sum(i.busy_s for i in self.insts) / (len(self.insts) * self.now)
                                   if self.now > 0 else 0.0),
            "sim_time_s": self.now, "wall_s": wall_s,
        })
        return out


def _pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def summarize_records(records: Sequence[SimRequest], slo_tpot_ms: float, slo_ttft_ms: float | None) -> dict[str, Any]:
    """Latency metrics of finished requests; SLO attainment counts unfinished requests as misses."""
    ttft, tpot, e2e, ptl = [], [], [], []
    ok = ok_ptl = 0
    tokens = 0
    first_arrival = min((r.req.arrival_s for r in records), default=0.0)
    last_finish = first_arrival
    for r in records:
        if r.finish_t is None:
            continue
        a, out = r.req.arrival_s, r.req.output_tokens
        t1 = (r.first_t - a) * 1000.0
        e = (r.finish_t - a) * 1000.0
        ttft.append(t1)
        e2e.append(e)
        ptl.append(e / out)
        tokens += out
        last_finish = max(last_finish, r.finish_t)
        tp = (r.finish_t - r.first_t) * 1000.0 / (out - 1) if out > 1 else None
        if tp is not None:
            tpot.append(tp)
        ttft_ok = slo_ttft_ms is None or t1 <= slo_ttft_ms
        ok += ttft_ok and (tp is None or tp <= slo_tpot_ms)
        ok_ptl += e / out <= slo_tpot_ms
    n = len(records)
    span = last_finish - first_arrival
    s_ttft, s_tpot, s_e2e = sorted(ttft), sorted(tpot), sorted(e2e)
    return {
        "requests": n, "completed": len(e2e), "unfinished": n - len(e2e),
        "slo_tpot_ms": slo_tpot_ms, "slo_ttft_ms": slo_ttft_ms,
        "slo_attainment": ok / n if n else None,
        "slo_attainment_per_token_e2e": ok_ptl / n if n else None,
        "tpot_ms_mean": _mean(tpot), "tpot_ms_p50": _pct(s_tpot, 50), "tpot_ms_p90": _pct(s_tpot, 90),
        "tpot_ms_p99": _pct(s_tpot, 99),
        "ttft_ms_mean": _mean(ttft), "ttft_ms_p50": _pct(s_ttft, 50), "ttft_ms_p90": _pct(s_ttft, 90),
        "ttft_ms_p99": _pct(s_ttft, 99),
        "e2e_ms_mean": _mean(e2e), "e2e_ms_p50": _pct(s_e2e, 50), "e2e_ms_p90": _pct(s_e2e, 90),
        "per_token_ms_mean": _mean(ptl),
        "throughput_tokens_s": tokens / span if span > 0 else None,
        "throughput_req_s": len(e2e) / span if span > 0 else None,
    }


def simulate(workload: Workload | Sequence[Request], perf_model: PerfModel, policy: str,
             sim_config: SimConfig | None = None, policy_config: PolicyConfig | None = None,
             label: str = "") -> tuple[dict[str, Any], Simulation]:
    """Run one simulation; returns (metrics, the Simulation with its per-request records)."""
    sim = Simulation(workload, perf_model, policy, sim_config, policy_config, label)
    return sim.run(), sim


def tpot_samples(sim: Simulation) -> list[float]:
    """Per-request TPOT (ms) of the finished requests with more than one output token."""
    return [(r.finish_t - r.first_t) * 1000.0 / (r.req.output_tokens - 1) for r in sim.records
            if r.finish_t is not None and r.req.output_tokens > 1]


def config_dict(cfg: Any) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ---------------------------------------------------------------------- sweeps
@dataclass(frozen=True)
class SweepSpec:
    """Grid of runs: every policy x rate x cluster size. ``rate_per_instance``: rates are per instance."""

    policies: tuple[str, ...]
    rates: tuple[float, ...]
    instances: tuple[int, ...]
    rate_per_instance: bool = False

    def __post_init__(self) -> None:
        if not self.policies or not self.rates or not self.instances:
            raise SimulatorError("a sweep needs at least one policy, one rate and one cluster size")
        if any(r <= 0 for r in self.rates) or any(n < 1 for n in self.instances):
            raise SimulatorError("rates must be > 0 and cluster sizes >= 1")


# (header, width, decimals or None for text/int, metrics key)
TABLE_COLUMNS = (("policy", -22, None, "policy"), ("n", 4, None, "num_instances"), ("rate", 7, 1, "rate"),
                 ("SLO", 6, 3, "slo_attainment"), ("SLO e2e/tok", 11, 3, "slo_attainment_per_token_e2e"),
                 ("TPOT", 6, 1, "tpot_ms_mean"), ("TPOT p90", 8, 1, "tpot_ms_p90"),
                 ("TTFT p50", 8, 0, "ttft_ms_p50"), ("TTFT p90", 8, 0, "ttft_ms_p90"),
                 ("E2E", 7, 0, "e2e_ms_mean"), ("tok/s", 8, 0, "throughput_tokens_s"),
                 ("unfin", 5, None, "unfinished"), ("wall s", 6, 1, "wall_s"))


def table_header() -> str:
    return " ".join(f"{name:<{-w}}" if w < 0 else f"{name:>{w}}" for name, w, _, _ in TABLE_COLUMNS)


def table_row(m: dict[str, Any]) -> str:
    cells = []
    for _, w, dec, key in TABLE_COLUMNS:
        v = m.get(key)
        text = "-" if v is None else (f"{v:.{dec}f}" if dec is not None else str(v))
        cells.append(f"{text:<{-w}}" if w < 0 else f"{text:>{w}}")
    return " ".join(cells)


def run_sweep(spec: SweepSpec, workload_config, sim_config: SimConfig, policy_config: PolicyConfig,
              perf_model: PerfModel, mean_output_len: float | None = None,
              log: Callable[[str], None] = print, keep_tpot_samples: int = 2000) -> dict[str, Any]:
    """Run the grid; returns {"runs": [...], "results": {policy: {"instances=N": {"rate=R": metrics}}},
    "tpot_samples": {(policy, n, rate): sorted sample}} (samples are not JSON; drop them before saving)."""
    from dataclasses import replace

    from caraserve_router.evaluation.workload import generate

    runs, results, samples = [], {}, {}
    workloads: dict[float, Workload] = {}
    total, k = len(spec.policies) * len(spec.rates) * len(spec.instances), 0
    log(table_header())
    for n in spec.instances:
        for rate in spec.rates:
            total_rate = rate * n if spec.rate_per_instance else rate
            if total_rate not in workloads:
                workloads[total_rate] = generate(replace(workload_config, rate=total_rate))
                log(f"# {workloads[total_rate].describe()}")
            w = workloads[total_rate]
            mol = mean_output_len or (sum(r.output_tokens for r in w.requests) / max(1, len(w)))
            pcfg = replace(policy_config, mean_output_len=mol, slo_tpot_ms=sim_config.slo_tpot_ms,
                           max_batch=sim_config.max_batch)
            scfg = replace(sim_config, num_instances=n)
            for policy in spec.policies:
                k += 1
                label = f"{k}/{total} {policy} n={n} rate={total_rate:g}"
                m, sim = simulate(w, perf_model, policy, scfg, pcfg, label=label)
                m.update({"rate": total_rate, "offered_rate": w.summary().get("rate"),
                          "mean_output_len_policy": mol})
                runs.append(m)
                results.setdefault(policy, {}).setdefault(f"instances={n}", {})[f"rate={total_rate:g}"] = m
                tp = sorted(tpot_samples(sim))
                step = max(1, len(tp) // keep_tpot_samples)
                samples[(policy, n, total_rate)] = tp[::step]
                log(table_row(m))
    return {"runs": runs, "results": results, "tpot_samples": samples}
