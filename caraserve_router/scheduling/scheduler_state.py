"""The router's own view of every instance: what it dispatched, what runs, what is resident.

Pure Python, no I/O, no clocks of its own (callers pass ``now`` where they want timestamps).
The api_server and the simulator drive it through the same event methods:

    cluster = ClusterState([InstanceState("inst0", max_batch=32, lora_mode="cpu-assist", kernel="mbgmv"), ...])
    cluster.dispatch(index, RequestInfo("r1", "lora-3", rank=16, prompt_tokens=120, max_new_tokens=64))
    cluster.first_token("r1")        # queued -> running; the adapter is now resident there
    cluster.token("r1")              # one more output token (live router, per streamed token)
    cluster.finish("r1")             # or cluster.fail("r1"): gone from the view
    cluster.apply_stats(index, stats_dict)   # reconcile with the instance's stats endpoint

Token counting has two equivalent paths; use one per instance: ``token(request_id, n)`` (the
live router sees each request's stream) or ``InstanceState.decode_step(n)`` (the simulator:
every running request of that instance produced n tokens; O(1), counts are derived lazily).

Every aggregate a policy reads (load, sum and max of ranks over running + queued, queued
prompt tokens, outstanding tokens, per-adapter counts) is maintained incrementally, so reading
it is O(1) (max rank: O(distinct ranks)).

The stats dict ``apply_stats`` expects (every key optional)::

    {"healthy": bool, "lora_mode": "cached"|"on-demand"|"pipeline"|"cpu-assist",
     "kernel": "bgmv"|"mbgmv", "max_batch": int,
     "resident_adapters": ["name", ...] or [{"name": str, "rank": int}, ...],
     "running": [REQ, ...], "queued": [REQ, ...],     # give both or neither
     "num_running": int, "num_queued": int}           # counts, when ids are not available
    REQ = {"request_id": str (the router's id), "adapter": str|null, "rank": int,
           "prompt_tokens": int, "max_new_tokens": int, "generated": int}
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Hashable, Iterable, Mapping, Sequence

from caraserve_router.contracts.names import DecodeKernel, LoraMode
from caraserve_router.contracts.stats import InstanceStats


class SchedulerStateError(ValueError):
    """An event or stats dict that does not fit the view (unknown id, bad field, ...)."""


@dataclass(slots=True)
class RequestInfo:
    """One request as the router sees it. ``rank`` 0 and ``adapter`` None: the base model."""

    request_id: Hashable
    adapter: str | None
    rank: int
    prompt_tokens: int
    max_new_tokens: int
    generated: int = 0          # tokens counted through token() (plus the bulk steps, see module doc)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    _mark: int = 0              # instance decode-step counter when it started running

    def __post_init__(self) -> None:
        for name in ("rank", "prompt_tokens", "generated"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SchedulerStateError(f"request {self.request_id!r}: {name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SchedulerStateError(f"request {self.request_id!r}: max_new_tokens must be an integer >= 1, "
                                      f"got {self.max_new_tokens!r}")
        if self.adapter is None and self.rank != 0:
            raise SchedulerStateError(f"request {self.request_id!r}: rank {self.rank} without an adapter")


@dataclass
class ReconcileReport:
    """What ``apply_stats`` changed or found."""

    moved_to_running: list = field(default_factory=list)   # view had them queued, instance runs them
    adopted: list = field(default_factory=list)            # instance reports them, view did not know them
    missing: list = field(default_factory=list)            # view has them, instance does not report them
    dropped: list = field(default_factory=list)            # missing ones removed (drop_missing=True)
    count_mismatch: tuple[int, int] | None = None          # (view load, reported load) when counts differ


class InstanceState:
    """Router-side state of one instance."""

    def __init__(self, name: str, *, max_batch: int = 32, lora_mode: LoraMode | str = LoraMode.CPU_ASSIST,
                 kernel: DecodeKernel | str = DecodeKernel.MBGMV,
                 healthy: bool = True, resident: Iterable[tuple[str, int]] = (),
                 resident_capacity_ranks: int | None = None) -> None:
        self.name = name
        self.max_batch = _check_positive_int(max_batch, "max_batch")
        self.lora_mode = _check_choice(lora_mode, LoraMode, "lora_mode")
        self.kernel = _check_choice(kernel, DecodeKernel, "kernel")
        self.healthy = bool(healthy)
        if resident_capacity_ranks is not None:
            _check_positive_int(resident_capacity_ranks, "resident_capacity_ranks")
        self.resident_capacity_ranks = resident_capacity_ranks
        self.perf_model = None  # PerfModel of this instance's device kind; None: the cluster's
        self.running: dict[Hashable, RequestInfo] = {}
        self.queued: dict[Hashable, RequestInfo] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.steps = 0
        # Requests the view learned from stats, not from a dispatch: no stream will ever finish
        # them here, so they leave the view as soon as the instance stops reporting them.
        self.adopted: set = set()
        self._reset_aggregates()
        for adapter, rank in resident:
            self.mark_resident(adapter, rank)

    def _reset_aggregates(self) -> None:
        self.sum_ranks = 0                    # over running + queued
        self.max_rank = 0                     # over running + queued
        self.rank_counts: dict[int, int] = {}
        self.adapter_counts: dict[str, int] = {}
        self.queued_adapter_counts: dict[str, int] = {}
        self.queued_prompt_tokens = 0
        self.queued_rank_tokens = 0
        self._sum_max_new = 0
        self._sum_generated = 0
        self._sum_mark_running = 0

    # ------------------------------------------------------------------ read side
    @property
    def load(self) -> int:
        """Requests on the instance: running + queued."""
        return len(self.running) + len(self.queued)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_queued(self) -> int:
        return len(self.queued)

    @property
    def outstanding_tokens(self) -> int:
        """Output tokens still to generate by the requests on the instance (max_new - generated)."""
        bulk = len(self.running) * self.steps - self._sum_mark_running
        return self._sum_max_new - self._sum_generated - bulk

    def generated(self, request_id: Hashable) -> int:
        info = self.running.get(request_id)
        if info is not None:
            return info.generated + self.steps - info._mark
        return self._get(request_id).generated

    def is_resident(self, adapter: str | None) -> bool:
        """Whether a request for this adapter would start without a host -> device load."""
        return adapter is None or self.lora_mode.preloads or adapter in self.resident

    def has_request(self, request_id: Hashable) -> bool:
        return request_id in self.running or request_id in self.queued

    # ------------------------------------------------------------------ events
    def dispatched(self, req: RequestInfo, now: float | None = None) -> None:
        """The router sent ``req`` here: it is queued until its first token."""
        if self.has_request(req.request_id):
            raise SchedulerStateError(f"{self.name}: request {req.request_id!r} dispatched twice")
        req.dispatched_at = now if now is not None else req.dispatched_at
        self.queued[req.request_id] = req
        self._add_machine(req)
        self.queued_prompt_tokens += req.prompt_tokens
        self.queued_rank_tokens += req.rank * req.prompt_tokens
        if req.adapter is not None:
            self.queued_adapter_counts[req.adapter] = self.queued_adapter_counts.get(req.adapter, 0) + 1

    def first_token(self, request_id: Hashable, now: float | None = None) -> RequestInfo:
        """Prefill done: queued -> running; its adapter is now resident here."""
        req = self.queued.pop(request_id, None)
        if req is None:
            if request_id in self.running:
                raise SchedulerStateError(f"{self.name}: first token of {request_id!r} twice")
            raise SchedulerStateError(f"{self.name}: first token of unknown request {request_id!r}")
        self._leave_queue(req)
        req.first_token_at = now
        req.generated += 1
        self._sum_generated += 1
        req._mark = self.steps
        self._sum_mark_running += self.steps
        self.running[request_id] = req
        if req.adapter is not None:
            self.mark_resident(req.adapter, req.rank)
        return req

    def token(self, request_id: Hashable, n: int = 1) -> None:
        """``n`` more output tokens of a running request (live router path)."""
        req = self.running.get(request_id)
        if req is None:
            raise SchedulerStateError(f"{self.name}: token for request {request_id!r} that is not running")
        req.generated += n
        self._sum_generated += n

    def decode_step(self, n: int = 1) -> None:
        """Every running request produced ``n`` tokens (simulator path, O(1))."""
        self.steps += n

    def finished(self, request_id: Hashable) -> RequestInfo:
        """The request completed (or was aborted); remove it wherever it is."""
        self.adopted.discard(request_id)
        req = self.running.pop(request_id, None)
        if req is not None:
            done = req.generated + self.steps - req._mark
            self._sum_mark_running -= req._mark
            self._sum_generated -= req.generated
            req.generated = done
        else:
            req = self.queued.pop(request_id, None)
            if req is None:
                raise SchedulerStateError(f"{self.name}: finish of unknown request {request_id!r}")
            self._leave_queue(req)
            self._sum_generated -= req.generated
        self._remove_machine(req)
        return req

    failed = finished

    def remove_queued(self, request_id: Hashable) -> RequestInfo:
        """Take a queued (not yet prefilled) request off this instance, e.g. to migrate it."""
        if request_id not in self.queued:
            raise SchedulerStateError(f"{self.name}: request {request_id!r} is not queued here")
        return self.finished(request_id)

    def mark_resident(self, adapter: str, rank: int) -> None:
        """Adapter now on the device (most recently used); evicts LRU unused ones past capacity."""
        self.resident[adapter] = rank
        self.resident.move_to_end(adapter)
        cap = self.resident_capacity_ranks
        if cap is None:
            return
        total = sum(self.resident.values())
        for name in list(self.resident):
            if total <= cap:
                break
            if name != adapter and self.adapter_counts.get(name, 0) == 0:
                total -= self.resident.pop(name)

    # ------------------------------------------------------------------ reconciliation
    def apply_stats(self, stats: InstanceStats | Mapping[str, Any], drop_missing: bool = False) -> ReconcileReport:
        """Reconcile with the instance's stats: its typed record, or a dict in the layout of the
        module docstring (the record's `to_dict()`; the simulator passes partial dicts)."""
        if isinstance(stats, InstanceStats):
            stats = stats.to_dict()
        if not isinstance(stats, Mapping):
            raise SchedulerStateError(f"{self.name}: stats must be a dict, got {type(stats).__name__}")
        self._apply_settings(stats)
        report = ReconcileReport()
        if ("running" in stats) != ("queued" in stats):
            raise SchedulerStateError(f"{self.name}: stats must give both 'running' and 'queued' or neither")
        if "running" in stats:
            self._apply_requests(stats["running"], stats["queued"], drop_missing, report)
        elif "num_running" in stats or "num_queued" in stats:
            reported = int(stats.get("num_running", 0)) + int(stats.get("num_queued", 0))
            if reported != self.load:
                report.count_mismatch = (self.load, reported)
        if "resident_adapters" in stats:        # last: the instance's list is the truth
            self._apply_resident(stats["resident_adapters"])
        return report

    def _apply_settings(self, stats: Mapping[str, Any]) -> None:
        if "healthy" in stats:
            self.healthy = bool(stats["healthy"])
        if "lora_mode" in stats:
            self.lora_mode = _check_choice(stats["lora_mode"], LoraMode, "stats.lora_mode")
        if "kernel" in stats:
            self.kernel = _check_choice(stats["kernel"], DecodeKernel, "stats.kernel")
        if "max_batch" in stats:
            self.max_batch = _check_positive_int(stats["max_batch"], "stats.max_batch")

    def _apply_resident(self, entries: Any) -> None:
        if not isinstance(entries, list):
            raise SchedulerStateError(f"{self.name}: stats.resident_adapters must be a list")
        fresh: OrderedDict[str, int] = OrderedDict()
        for e in entries:
            if isinstance(e, str):
                fresh[e] = self.resident.get(e, 0)
            elif isinstance(e, Mapping) and isinstance(e.get("name"), str):
                fresh[e["name"]] = int(e.get("rank") or 0)
            else:
                raise SchedulerStateError(f"{self.name}: bad resident_adapters entry {e!r}")
        self.resident = fresh

    def _apply_requests(self, running: Any, queued: Any, drop_missing: bool, report: ReconcileReport) -> None:
        run = _parse_reqs(running, f"{self.name}: stats.running")
        que = _parse_reqs(queued, f"{self.name}: stats.queued")
        for rid, req in que.items():
            if not self.has_request(rid):
                self.dispatched(req)
                report.adopted.append(rid)
                self.adopted.add(rid)
        for rid, req in run.items():
            reported_generated = req.generated
            if not self.has_request(rid):
                self.dispatched(req)
                report.adopted.append(rid)
                self.adopted.add(rid)
            if rid in self.queued:
                self.first_token(rid)
                if rid not in report.adopted:
                    report.moved_to_running.append(rid)
            self._set_generated(rid, reported_generated)
        reported = set(run) | set(que)
        report.missing = [rid for rid in list(self.running) + list(self.queued) if rid not in reported]
        report.dropped = [rid for rid in report.missing if drop_missing or rid in self.adopted]
        for rid in report.dropped:
            self.finished(rid)

    def _set_generated(self, rid: Hashable, generated: int) -> None:
        req = self.running[rid]
        self._sum_generated += generated - req.generated
        self._sum_mark_running += self.steps - req._mark
        req.generated, req._mark = generated, self.steps

    # ------------------------------------------------------------------ aggregates
    def _add_machine(self, req: RequestInfo) -> None:
        r = req.rank
        self.sum_ranks += r
        self.rank_counts[r] = self.rank_counts.get(r, 0) + 1
        if r > self.max_rank:
            self.max_rank = r
        if req.adapter is not None:
            self.adapter_counts[req.adapter] = self.adapter_counts.get(req.adapter, 0) + 1
        self._sum_max_new += req.max_new_tokens
        self._sum_generated += req.generated

    def _remove_machine(self, req: RequestInfo) -> None:
        r = req.rank
        self.sum_ranks -= r
        left = self.rank_counts[r] - 1
        if left:
            self.rank_counts[r] = left
        else:
            del self.rank_counts[r]
            if r == self.max_rank:
                self.max_rank = max(self.rank_counts, default=0)
        if req.adapter is not None:
            left = self.adapter_counts[req.adapter] - 1
            if left:
                self.adapter_counts[req.adapter] = left
            else:
                del self.adapter_counts[req.adapter]
        self._sum_max_new -= req.max_new_tokens

    def _leave_queue(self, req: RequestInfo) -> None:
        self.queued_prompt_tokens -= req.prompt_tokens
        self.queued_rank_tokens -= req.rank * req.prompt_tokens
        if req.adapter is not None:
            left = self.queued_adapter_counts[req.adapter] - 1
            if left:
                self.queued_adapter_counts[req.adapter] = left
            else:
                del self.queued_adapter_counts[req.adapter]

    def _get(self, request_id: Hashable) -> RequestInfo:
        req = self.running.get(request_id) or self.queued.get(request_id)
        if req is None:
            raise SchedulerStateError(f"{self.name}: unknown request {request_id!r}")
        return req

    def snapshot(self) -> dict[str, Any]:
        """JSON-able summary (for a debug endpoint or logs)."""
        return {"name": self.name, "healthy": self.healthy, "lora_mode": self.lora_mode.value,
                "kernel": self.kernel.value, "max_batch": self.max_batch, "num_running": self.num_running,
                "num_queued": self.num_queued,
                "sum_ranks": self.sum_ranks, "max_rank": self.max_rank,
                "outstanding_tokens": self.outstanding_tokens, "resident_adapters": list(self.resident)}


class ClusterState:
    """All instances plus the request -> instance map. Indices are positions in ``instances``."""

    def __init__(self, instances: Sequence[InstanceState] = ()) -> None:
        self.instances: list[InstanceState] = list(instances)
        self._where: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self.instances)

    def add_instance(self, inst: InstanceState) -> int:
        """A new instance joins at the next index (indices are never reused)."""
        self.instances.append(inst)
        return len(self.instances) - 1

    def instance_of(self, request_id: Hashable) -> int | None:
        return self._where.get(request_id)

    def dispatch(self, index: int, req: RequestInfo, now: float | None = None) -> None:
        if req.request_id in self._where:
            raise SchedulerStateError(f"request {req.request_id!r} is already on instance {self._where[req.request_id]}")
        self.instances[index].dispatched(req, now)
        self._where[req.request_id] = index

    def first_token(self, request_id: Hashable, now: float | None = None) -> RequestInfo:
        return self.instances[self._index(request_id)].first_token(request_id, now)

    def token(self, request_id: Hashable, n: int = 1) -> None:
        self.instances[self._index(request_id)].token(request_id, n)

    def finish(self, request_id: Hashable) -> RequestInfo:
        index = self._index(request_id)
        del self._where[request_id]
        return self.instances[index].finished(request_id)

    fail = finish

    def move(self, request_id: Hashable, to_index: int) -> None:
        """Migrate a queued request (dLoRA rebalancing) to another instance."""
        index = self._index(request_id)
        req = self.instances[index].remove_queued(request_id)
        self.instances[to_index].dispatched(req)
        self._where[request_id] = to_index

    def apply_stats(self, index: int, stats: InstanceStats | Mapping[str, Any],
                    drop_missing: bool = False) -> ReconcileReport:
        if isinstance(stats, InstanceStats):
            stats = stats.to_dict()
        inst = self.instances[index]
        for rid in _reported_ids(stats):
            other = self._where.get(rid)
            if other is not None and other != index:
                self.instances[other].finished(rid)     # the instance that runs it is the truth
                del self._where[rid]
        report = inst.apply_stats(stats, drop_missing)
        for rid in report.adopted:
            self._where[rid] = index
        for rid in report.dropped:
            self._where.pop(rid, None)
        return report

    def _index(self, request_id: Hashable) -> int:
        try:
            return self._where[request_id]
        except KeyError:
            raise SchedulerStateError(f"unknown request {request_id!r}") from None


# ---------------------------------------------------------------------- helpers
def _check_positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SchedulerStateError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_choice(value: Any, enum_cls: type[Enum], name: str) -> Any:
    """`value` (a member or its user-facing string) as a member of `enum_cls`."""
    try:
        return enum_cls(value)
    except ValueError:
        raise SchedulerStateError(f"{name} must be one of {[m.value for m in enum_cls]}, got {value!r}") from None


def _reported_ids(stats: Mapping[str, Any]) -> list:
    ids = []
    for key in ("running", "queued"):
        entries = stats.get(key) or []
        if isinstance(entries, list):
            ids.extend(e.get("request_id") for e in entries if isinstance(e, Mapping))
    return ids


def _parse_reqs(entries: Any, where: str) -> dict[Hashable, RequestInfo]:
    if not isinstance(entries, list):
        raise SchedulerStateError(f"{where} must be a list of request objects")
    out: dict[Hashable, RequestInfo] = {}
    for e in entries:
        if not isinstance(e, Mapping) or "request_id" not in e:
            raise SchedulerStateError(f"{where}: each entry needs a request_id, got {e!r}")
        try:
            out[e["request_id"]] = RequestInfo(
                e["request_id"], e.get("adapter"), int(e.get("rank", 0) or 0),
                int(e.get("prompt_tokens", 0) or 0), int(e.get("max_new_tokens", 1) or 1),
                generated=int(e.get("generated", 0) or 0))
        except (TypeError, ValueError) as exc:
            raise SchedulerStateError(f"{where}: bad entry {e!r}: {exc}") from exc
    return out
