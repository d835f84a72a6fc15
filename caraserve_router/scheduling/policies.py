"""Cluster scheduling policies: pick the instance for a new request.

One interface for all of them (the live router and the simulator call the same objects)::

    policy = make_policy("rank-aware", PolicyConfig(slo_tpot_ms=40, mean_output_len=60))
    index = policy.choose(request, cluster.instances, perf_model)   # int, or None
    moves = policy.rebalance(cluster.instances, perf_model)         # [Move]; only dlora moves

``choose`` returns None when no instance can take the request now (none healthy, or every
healthy one is full: ``load >= limit``, limit = min(max_batch, instance.max_batch) +
max_queue); the caller keeps it and asks again when capacity frees up. ``choose`` never
mutates the instances; the caller records the dispatch in its ClusterState.

Exact rules (also in docs/SCHEDULER.md):

rank-aware (the paper). For each candidate i with n = running + queued requests of ranks R:
    d_decode  = decode(R + [r]) - decode(R)                       (decode(empty) = 0)
    d_prefill = prefill_factor * (prefill(T, r)               if i has no queued request
                                  prefill_marginal(T, r)      if a prefill is pending there anyway)
    cost      = d_prefill / mean_output_len + d_decode
    tpot_pred = decode(R + [r]) + d_prefill / mean_output_len
    cost      = inf  if tpot_pred > slo_tpot_ms
    score     = cost * n
  pick the least (score, cost, n, i): ties on score go to the smaller marginal cost, then to
  the less loaded instance, then to the lower index. If every candidate is infinite, fall
  back to the least loaded one (least (n, tpot_pred, i)) instead of refusing.
rank-residency-aware: the same, with the predicted cold start added to d_prefill when the
  adapter is not resident on i (by i's LoRA mode): cached 0; on-demand load (the whole
  batch stalls for it); pipeline max(0, load - prefill); cpu-assist overhead * prefill.
random: uniform among candidates (seeded). round-robin: the next candidate after the last
  choice, cyclically. first-fit (Punica): the first instance in index order with batch room
  (n < max_batch), else the first candidate. most-idle: least (n, i).
dlora: see DLoRAPolicy.
"""
from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

from caraserve_router.contracts.names import LoraMode
from caraserve_router.scheduling.cold_costs import cold_extra_ms
from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.scheduler_state import InstanceState, RequestInfo

INF = math.inf


class PolicyError(ValueError):
    """Bad policy name or configuration."""


@dataclass(frozen=True)
class PolicyConfig:
    """Settings shared by every policy (each reads the ones it needs).

    slo_tpot_ms: per-token latency SLO (ms) that rank-aware predicts against (paper: 40).
    mean_output_len: expected output tokens per request; prefill cost is amortised over it
        (the artifact uses 60).
    max_batch: batch limit the router respects per instance (also capped by the instance's own).
    max_queue: requests an instance may hold beyond its batch limit (its own queue); 0 means
        the router keeps the overflow and asks again later (late binding).
    seed: seed of the random policy.
    prefill_factor: multiplier on predicted prefill time (the artifact uses 1.5; 1.0 = trust the model).
    dlora_load_tolerance: dlora treats instances within this fraction of the least token load
        (plus one mean output) as equally loaded and then prefers queued prefill / merging.
    dlora_imbalance: dlora rebalances when the most loaded instance holds more than
        (1 + this) x the least loaded one's token load (plus one mean output).
    dlora_max_moves: most queued requests moved per rebalance call.
    """

    slo_tpot_ms: float = 40.0
    mean_output_len: float = 60.0
    max_batch: int = 32
    max_queue: int = 0
    seed: int = 0
    prefill_factor: float = 1.0
    dlora_load_tolerance: float = 0.1
    dlora_imbalance: float = 0.5
    dlora_max_moves: int = 8

    def __post_init__(self) -> None:
        positive = ("slo_tpot_ms", "mean_output_len", "prefill_factor")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise PolicyError(f"PolicyConfig.{name} must be a finite number > 0, got {v!r}")
        for name in ("max_batch", "dlora_max_moves"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PolicyError(f"PolicyConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("max_queue", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PolicyError(f"PolicyConfig.{name} must be an integer >= 0, got {v!r}")
        for name in ("dlora_load_tolerance", "dlora_imbalance"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise PolicyError(f"PolicyConfig.{name} must be a number >= 0, got {v!r}")


@dataclass(frozen=True)
class Move:
    """Migrate queued request ``request_id`` from instance ``src`` to ``dst``."""

    request_id: object
    src: int
    dst: int


class Policy(ABC):
    """One scheduling policy; the class attributes are its capabilities, read by the callers
    (the front end, the simulator) instead of comparing names."""

    name = "?"
    needs_perf_model = False   # choose() reads the PerfModel (the front end must have one to start it)
    rebalances = False         # rebalance() may move queued requests (the caller should call it periodically)
    residency_aware = False    # predictions depend on which adapters each instance holds

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()

    def limit(self, inst: InstanceState) -> int:
        """Requests (running + queued) the router lets this instance hold."""
        return min(self.config.max_batch, inst.max_batch) + self.config.max_queue

    def candidates(self, instances: Sequence[InstanceState]) -> list[int]:
        """Indices of healthy instances with room, in index order."""
        return [i for i, inst in enumerate(instances) if inst.healthy and inst.load < self.limit(inst)]

    @abstractmethod
    def choose(self, request: RequestInfo, instances: Sequence[InstanceState], perf_model: PerfModel) -> int | None:
        """Index of the instance for ``request``, or None if none can take it now."""

    def rebalance(self, instances: Sequence[InstanceState], perf_model: PerfModel) -> list[Move]:
        """Moves of queued requests the policy wants now (default: none)."""
        return []


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._rng = random.Random(self.config.seed)

    def choose(self, request, instances, perf_model):
        cands = self.candidates(instances)
        return self._rng.choice(cands) if cands else None


class RoundRobinPolicy(Policy):
    name = "round-robin"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._next = 0

    def choose(self, request, instances, perf_model):
        n = len(instances)
        for k in range(n):
            i = (self._next + k) % n
            inst = instances[i]
            if inst.healthy and inst.load < self.limit(inst):
                self._next = (i + 1) % n
                return i
        return None


class FirstFitPolicy(Policy):
    """Punica: pack the first instance (in index order) with batch room; if every batch is
    full, the first one whose own queue has room (only when max_queue > 0)."""

    name = "first-fit"

    def choose(self, request, instances, perf_model):
        batch = self.config.max_batch
        for i, inst in enumerate(instances):
            if inst.healthy and inst.load < min(batch, inst.max_batch):
                return i
        for i, inst in enumerate(instances):
            if inst.healthy and inst.load < self.limit(inst):
                return i
        return None


class MostIdlePolicy(Policy):
    name = "most-idle"

    def choose(self, request, instances, perf_model):
        best, best_load = None, None
        for i, inst in enumerate(instances):
            if inst.healthy and inst.load < self.limit(inst) and (best_load is None or inst.load < best_load):
                best, best_load = i, inst.load
        return best


# ---------------------------------------------------------------------- rank-aware
def _cold(mode: LoraMode) -> Callable:
    return lambda inst, req, pm, prefill_ms: cold_extra_ms(pm, mode, req.prompt_tokens, req.rank, prefill_ms)


# Predicted extra prefill-step time (ms) when the adapter is not resident, by LoRA mode: the
# profiled load, sidecar and sync costs of the PerfModel (scheduling/cold_costs.py); auto: the
# cheapest of on-demand, pipeline and cpu-assist, as the instance chooses.
COLD_START_COST: dict[LoraMode, Callable] = {mode: _cold(mode) for mode in LoraMode}


@dataclass(frozen=True)
class Estimate:
    """Rank-aware prediction for one instance (exposed for tests, logs and the api_server)."""

    index: int
    load: int
    d_prefill_ms: float
    d_decode_ms: float
    tpot_pred_ms: float
    cost: float            # inf when tpot_pred_ms breaks the SLO
    score: float           # cost * load


class RankAwarePolicy(Policy):
    """The paper's rank-aware scheduler (see the module docstring for the exact rule)."""

    name = "rank-aware"
    needs_perf_model = True

    def _predict(self, inst: InstanceState, req: RequestInfo, pm: PerfModel) -> tuple[float, float, float, float]:
        """(d_prefill_ms, d_decode_ms, tpot_pred_ms, cost) of adding ``req`` to ``inst``."""
        cfg = self.config
        pm = inst.perf_model or pm  # the model of this instance's device kind, where it has one
        n, kernel, r = len(inst.running) + len(inst.queued), inst.kernel, req.rank
        before = pm.decode_step_ms(n, inst.sum_ranks, inst.max_rank, kernel)
        after = pm.decode_step_ms(n + 1, inst.sum_ranks + r, max(inst.max_rank, r), kernel)
        if inst.queued:
            prefill = pm.prefill_marginal_ms(req.prompt_tokens, r)
        else:
            prefill = pm.predict_prefill_ms(req.prompt_tokens, r)
        if self.residency_aware and not inst.is_resident(req.adapter):
            full = pm.predict_prefill_ms(req.prompt_tokens, r)
            prefill += COLD_START_COST[inst.lora_mode](inst, req, pm, full)
        d_prefill = cfg.prefill_factor * prefill
        amortised = d_prefill / cfg.mean_output_len
        tpot = after + amortised
        cost = amortised + (after - before) if tpot <= cfg.slo_tpot_ms else INF
        return d_prefill, after - before, tpot, cost

    def estimate(self, i: int, inst: InstanceState, req: RequestInfo, pm: PerfModel) -> Estimate:
        d_prefill, d_decode, tpot, cost = self._predict(inst, req, pm)
        n = inst.load
        score = INF if cost == INF else cost * n
        return Estimate(i, n, d_prefill, d_decode, tpot, cost, score)

    def estimates(self, request: RequestInfo, instances: Sequence[InstanceState], pm: PerfModel) -> list[Estimate]:
        """Predictions for every candidate (for logs and tests; ``choose`` uses the same numbers)."""
        return [self.estimate(i, instances[i], request, pm) for i in self.candidates(instances)]

    def choose(self, request, instances, perf_model):
        best_key = fallback_key = None
        best = fallback = None
        predict, limit = self._predict, self.limit
        for i, inst in enumerate(instances):
            n = len(inst.running) + len(inst.queued)
            if not inst.healthy or n >= limit(inst):
                continue
            _, _, tpot, cost = predict(inst, request, perf_model)
            if cost < INF:
                key = (cost * n, cost, n, i)
                if best_key is None or key < best_key:
                    best_key, best = key, i
            elif best is None:
                key = (n, tpot, i)
                if fallback_key is None or key < fallback_key:
                    fallback_key, fallback = key, i
        return best if best is not None else fallback


class RankResidencyAwarePolicy(RankAwarePolicy):
    """Rank-aware plus the predicted cold start of a non-resident adapter (beyond the paper)."""

    name = "rank-residency-aware"
    residency_aware = True


# ---------------------------------------------------------------------- dLoRA
def token_load(inst: InstanceState) -> int:
    """dLoRA's load measure: output tokens still to generate plus prompt tokens still to prefill."""
    return inst.outstanding_tokens + inst.queued_prompt_tokens


class DLoRAPolicy(Policy):
    """dLoRA as far as it applies without migrating running requests (approximation).

    choose: among candidates whose token load is within ``dlora_load_tolerance`` of the least
    (load <= least * (1 + tol) + mean_output_len), prefer in order: an instance that already
    has queued requests of the same adapter (they can be prefilled and served together, in
    dLoRA's merged mode), then one with any queued prefill (the prefill stall is paid anyway),
    then one where the adapter is resident, then the least token load, then the lower index.
    rebalance: while the most loaded instance (token load) holds queued requests and its load
    exceeds (1 + dlora_imbalance) x the least loaded one's + mean_output_len, move its newest
    queued request to the least loaded instance with room (at most ``dlora_max_moves``).
    Not modelled: migrating running requests with their KV cache, the merge/unmerge switch
    inside an instance, and dLoRA's ILP placement of adapters.
    """

    name = "dlora"
    rebalances = True
    residency_aware = True     # prefers instances holding the adapter

    def choose(self, request, instances, perf_model):
        cands = self.candidates(instances)
        if not cands:
            return None
        loads = {i: token_load(instances[i]) for i in cands}
        bound = min(loads.values()) * (1 + self.config.dlora_load_tolerance) + self.config.mean_output_len
        near = [i for i in cands if loads[i] <= bound]

        def key(i: int):
            inst = instances[i]
            same = inst.queued_adapter_counts.get(request.adapter, 0) > 0 if request.adapter else False
            return (not same, not inst.queued, not inst.is_resident(request.adapter), loads[i], i)

        return min(near, key=key)

    def rebalance(self, instances, perf_model):
        loads = [token_load(inst) if inst.healthy else None for inst in instances]
        queued = {i: list(inst.queued) for i, inst in enumerate(instances)}
        room = {i: self.limit(inst) - inst.load for i, inst in enumerate(instances)}
        moves: list[Move] = []
        while len(moves) < self.config.dlora_max_moves:
            move = self._one_move(instances, loads, queued, room)
            if move is None:
                break
            moves.append(move)
        return moves

    def _one_move(self, instances, loads, queued, room) -> Move | None:
        live = [i for i, v in enumerate(loads) if v is not None]
        if len(live) < 2:
            return None
        src = max(live, key=lambda i: (loads[i], -i))
        dsts = [i for i in live if i != src and room[i] > 0]
        if not queued[src] or not dsts:
            return None
        dst = min(dsts, key=lambda i: (loads[i], i))
        if loads[src] <= (1 + self.config.dlora_imbalance) * loads[dst] + self.config.mean_output_len:
            return None
        rid = queued[src].pop()                          # newest queued request
        req = instances[src].queued[rid]
        moved = req.max_new_tokens - req.generated + req.prompt_tokens
        loads[src] -= moved
        loads[dst] += moved
        room[dst] -= 1
        room[src] += 1
        return Move(rid, src, dst)


# The registry: name -> class. Callers ask a class its capabilities (`needs_perf_model`,
# `rebalances`, `residency_aware`); the names are the CLI choices, in this order.
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RankAwarePolicy, RankResidencyAwarePolicy, RandomPolicy, RoundRobinPolicy,
                              FirstFitPolicy, MostIdlePolicy, DLoRAPolicy)
}


def policy_class(name: str) -> type[Policy]:
    """The registered class of policy `name` (its capabilities are class attributes)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None


def make_policy(name: str, config: PolicyConfig | None = None) -> Policy:
    return policy_class(name)(config)
