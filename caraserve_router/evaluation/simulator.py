"""Discrete-event simulator of a CaraServe cluster, driven by the live router's own policies.

Each simulated instance does LightLLM's continuous batching at decode-step granularity
(``lightllm/server/router/manager.py`` ``_step``):

- idle with requests queued -> prefill a new batch;
- otherwise decode the running batch; after every ``max_wait_steps`` decode steps (LightLLM's
  ``router_max_wait_tokens``, default 10) it tries to prefill a new batch from its queue
  instead (FIFO, up to ``max_batch`` running requests and ``max_prefill_tokens`` prompt
  tokens); the prefill step stalls decoding; the counter restarts after each try;
- a prefill step produces each new request's first token; each decode step one token of
  every running request. Step durations come from the PerfModel, or, with a measured truth
  table (`truth=`, sim_truth.py), are drawn from it while the policies keep the PerfModel.

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

This module holds the event loop (`Simulation`); beside it: `sim_config.py` (`SimConfig`),
`sim_instance.py` (engine-side request and instance state, cold-start rules by mode),
`sim_metrics.py` (`summarize_records`) and `sim_sweep.py` (grids of runs for
`scripts/simulate.py`).
"""
from __future__ import annotations

import heapq
import math
import time
from collections import deque
from typing import Any, Sequence

from caraserve_router.evaluation.sim_config import SimConfig, SimulatorError
from caraserve_router.evaluation.sim_instance import (PREFILL_WITH_COLD, DONE, PREFILLING, QUEUED, RUNNING,
                                                      SimInstance, SimRequest)
from caraserve_router.evaluation.sim_metrics import summarize_records
from caraserve_router.evaluation.sim_truth import TruthSteps
from caraserve_router.evaluation.truth_table import TruthTable
from caraserve_router.evaluation.workload import Request, Workload
from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.policies import Policy, PolicyConfig, make_policy
from caraserve_router.scheduling.scheduler_state import ClusterState, InstanceState

__all__ = ["SimConfig", "SimulatorError", "Simulation", "simulate", "summarize_records"]

# Event kinds on the heap.
_STEP, _SYNC = 0, 1


class Simulation:
    """One run: a workload through a cluster under one policy."""

    def __init__(self, workload: Workload | Sequence[Request], perf_model: PerfModel, policy: Policy | str,
                 sim_config: SimConfig | None = None, policy_config: PolicyConfig | None = None,
                 label: str = "", truth: TruthTable | None = None, seed: int = 0) -> None:
        self.cfg = sim_config or SimConfig()
        self.pm = perf_model
        # measured truth: steps drawn from the table; policies still predict with perf_model
        self.truth = (TruthSteps(truth, self.cfg.lora_mode, self.cfg.num_instances, self.cfg.instances_per_host,
                                 seed) if truth is not None else None)
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
        sr.inst = index
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
        if sr is None or sr.state != QUEUED or sr.inst != src:
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
        if self.truth is not None:
            dur = self.truth.decode_ms(inst.running, inst.sum_r, inst.max_r, cfg.kernel) / 1000.0
        else:
            dur = self.pm.decode_step_ms(inst.running, inst.sum_r, inst.max_r, cfg.kernel) / 1000.0
            if t < inst.assist_until:
                dur *= 1.0 + self.pm.cpu_assist_overhead
        dur *= self._core_share(inst)
        inst.busy = True
        inst.step_batch = None
        inst.busy_s += dur
        self._push(t + dur, _STEP, inst.index)

    def _core_share(self, inst: SimInstance) -> float:
        """How much slower a step starting now runs for the other busy instances of its host
        (SimConfig.host_cores; 1 without)."""
        cores = self.cfg.host_cores
        if cores is None:
            return 1.0
        per = self.cfg.instances_per_host
        first = inst.index // per * per
        others = sum(1 for o in self.insts[first:first + per] if o is not inst and o.busy)
        return max(1.0, (others + 1) * self.cfg.threads_per_instance / cores)

    def _start_prefill(self, inst: SimInstance, t: float) -> None:
        cfg, pm = self.cfg, self.pm
        room = cfg.max_batch - inst.running
        limit = cfg.max_prefill_tokens
        batch: list[SimRequest] = []
        tokens = rank_tokens = 0
        loads_ms = 0.0
        prompts, cold = [], []
        q = inst.queue
        while q and len(batch) < room:
            sr = q[0]
            p = sr.req.prompt_tokens
            if limit is not None and batch and tokens + p > limit:
                break
            q.popleft()
            sr.state = PREFILLING
            batch.append(sr)
            tokens += p
            rank_tokens += p * sr.req.rank
            prompts.append((p, sr.req.rank))
            if sr.req.rank and inst.touch(sr.req.adapter, sr.req.rank):
                loads_ms += pm.predict_load_ms(sr.req.rank)
                cold.append((p, sr.req.rank))
        if self.truth is not None:
            dur_ms = self.truth.prefill_ms(inst, t, prompts, cold, pm)
        else:
            prefill_ms = pm.prefill_batch_ms(tokens, rank_tokens)
            dur_ms = self._prefill_with_cold(inst, t, prefill_ms, loads_ms, pm) if loads_ms else prefill_ms
        dur_ms *= self._core_share(inst)
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
            sr.state = RUNNING
            inst.add_running(sr.req.rank)
            heapq.heappush(inst.finish_heap, (inst.steps + sr.req.output_tokens - 1, sr.req.index, sr))
        if freed and self.router_queue:
            self._drain_router_queue(t)

    def _finish(self, inst: SimInstance, sr: SimRequest, t: float) -> None:
        sr.finish_t = t
        sr.state = DONE
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
            "instances_per_host": self.cfg.instances_per_host, "host_cores": self.cfg.host_cores,
            "lora_mode": self.cfg.lora_mode.value, "kernel": self.cfg.kernel.value,
            "cold_loads": sum(i.cold_loads for i in self.insts),
            "queued_moves": self.moves, "max_router_queue": self.max_router_queue,
            "instance_busy_frac": (sum(i.busy_s for i in self.insts) / (len(self.insts) * self.now)
                                   if self.now > 0 else 0.0),
            "sim_time_s": self.now, "wall_s": wall_s,
        })
        out.update(self.truth.stats() if self.truth is not None else {"truth": "perf-model"})
        return out


def simulate(workload: Workload | Sequence[Request], perf_model: PerfModel, policy: str,
             sim_config: SimConfig | None = None, policy_config: PolicyConfig | None = None,
             label: str = "", truth: TruthTable | None = None, seed: int = 0) -> tuple[dict[str, Any], Simulation]:
    """Run one simulation; returns (metrics, the Simulation with its per-request records).
    With `truth`, step times are drawn from that measured table (sim_truth.py)."""
    sim = Simulation(workload, perf_model, policy, sim_config, policy_config, label, truth, seed)
    return sim.run(), sim
