"""Scheduler state: events move requests, aggregates stay exact, stats reconcile the view."""
from __future__ import annotations

import random

import pytest

from caraserve_router.scheduling.scheduler_state import ClusterState, InstanceState, RequestInfo, SchedulerStateError


def req(rid, rank=8, prompt=100, max_new=10, adapter=None):
    return RequestInfo(rid, adapter or (f"a{rank}" if rank else None), rank, prompt, max_new)


def brute(inst: InstanceState):
    """Aggregates recomputed from scratch, to compare with the incremental ones."""
    reqs = list(inst.running.values()) + list(inst.queued.values())
    ranks = [r.rank for r in reqs]
    return {"load": len(reqs), "sum": sum(ranks), "max": max(ranks, default=0),
            "qtok": sum(r.prompt_tokens for r in inst.queued.values()),
            "qrt": sum(r.rank * r.prompt_tokens for r in inst.queued.values()),
            "out": sum(r.max_new_tokens - inst.generated(r.request_id) for r in reqs)}


def test_lifecycle_and_aggregates():
    inst = InstanceState("i0", max_batch=4, kernel="bgmv")
    inst.dispatched(req("a", 8, 100, 5), now=1.0)
    inst.dispatched(req("b", 64, 50, 3))
    assert (inst.load, inst.num_queued, inst.num_running) == (2, 2, 0)
    assert (inst.sum_ranks, inst.max_rank) == (72, 64)
    assert inst.queued_prompt_tokens == 150 and inst.queued_rank_tokens == 8 * 100 + 64 * 50
    assert inst.outstanding_tokens == 8
    assert not inst.is_resident("a64")
    inst.first_token("b", now=2.0)
    assert inst.is_resident("a64") and inst.running["b"].first_token_at == 2.0
    assert inst.queued_prompt_tokens == 100 and inst.generated("b") == 1
    assert inst.outstanding_tokens == 7                # 5 (a) + 2 (b)
    inst.decode_step()                                 # bulk: b produced one more
    assert inst.generated("b") == 2 and inst.outstanding_tokens == 6
    done = inst.finished("b")
    assert done.generated == 2
    assert (inst.sum_ranks, inst.max_rank, inst.load) == (8, 8, 1)   # max falls back to 8
    assert inst.outstanding_tokens == 5
    inst.failed("a")
    assert inst.load == 0 and inst.max_rank == 0 and inst.outstanding_tokens == 0


def test_token_path_counts_per_request():
    inst = InstanceState("i0")
    inst.dispatched(req("a", 16, 10, 4))
    inst.first_token("a")
    inst.token("a")
    inst.token("a", 2)
    assert inst.generated("a") == 4 and inst.outstanding_tokens == 0
    with pytest.raises(SchedulerStateError, match="not running"):
        inst.token("zzz")


def test_random_event_sequences_keep_aggregates_exact():
    rng = random.Random(7)
    inst = InstanceState("i0", max_batch=64)
    live, ids = [], iter(range(10_000))
    for _ in range(3000):
        op = rng.random()
        if op < 0.4 or not live:
            rid = next(ids)
            inst.dispatched(req(rid, rng.choice([0, 8, 16, 32, 64]), rng.randint(1, 300), rng.randint(2, 50)))
            live.append(rid)
        elif op < 0.6:
            q = [r for r in live if r in inst.queued]
            if q:
                inst.first_token(rng.choice(q))
        elif op < 0.8:
            inst.decode_step()
            for rid in list(inst.running):             # finish those that reached max_new
                if inst.generated(rid) >= inst.running[rid].max_new_tokens:
                    inst.finished(rid)
                    live.remove(rid)
        else:
            rid = rng.choice(live)
            inst.finished(rid)
            live.remove(rid)
        b = brute(inst)
        assert (inst.load, inst.sum_ranks, inst.max_rank) == (b["load"], b["sum"], b["max"])
        assert (inst.queued_prompt_tokens, inst.queued_rank_tokens) == (b["qtok"], b["qrt"])
        assert inst.outstanding_tokens == b["out"]


def test_errors_are_clear():
    inst = InstanceState("i0")
    inst.dispatched(req("a"))
    with pytest.raises(SchedulerStateError, match="dispatched twice"):
        inst.dispatched(req("a"))
    with pytest.raises(SchedulerStateError, match="unknown request 'x'"):
        inst.first_token("x")
    with pytest.raises(SchedulerStateError, match="unknown request 'x'"):
        inst.finished("x")
    with pytest.raises(SchedulerStateError, match="lora_mode must be one of"):
        InstanceState("i1", lora_mode="lazy")
    with pytest.raises(SchedulerStateError, match="kernel must be one of"):
        InstanceState("i1", kernel="sgmv")
    with pytest.raises(SchedulerStateError, match="max_new_tokens must be an integer >= 1"):
        RequestInfo("r", "a", 8, 10, 0)
    with pytest.raises(SchedulerStateError, match="rank 8 without an adapter"):
        RequestInfo("r", None, 8, 10, 1)


def test_residency_lru_with_capacity_keeps_adapters_in_use():
    inst = InstanceState("i0", resident_capacity_ranks=64)
    inst.mark_resident("x", 32)
    inst.mark_resident("y", 16)
    inst.dispatched(req("r1", 32, adapter="x"))         # x in use: cannot be evicted
    inst.mark_resident("z", 32)                         # 80 > 64: evict LRU unused -> y (x is in use)
    assert list(inst.resident) == ["x", "z"]
    inst.finished("r1")
    inst.mark_resident("w", 16)                         # 80 > 64: x is LRU and unused now
    assert list(inst.resident) == ["z", "w"]


def test_cached_mode_everything_resident():
    inst = InstanceState("i0", lora_mode="cached")
    assert inst.is_resident("never-seen") and inst.is_resident(None)


def test_apply_stats_reconciles():
    inst = InstanceState("i0")
    inst.dispatched(req("a", 8, 10, 20))
    inst.dispatched(req("b", 16, 10, 20))
    inst.dispatched(req("c", 32, 10, 20))
    stats = {
        "healthy": False, "lora_mode": "pipeline", "kernel": "bgmv", "max_batch": 8,
        "resident_adapters": [{"name": "a8", "rank": 8}, "a16"],
        "running": [{"request_id": "a", "adapter": "a8", "rank": 8, "prompt_tokens": 10, "max_new_tokens": 20,
                     "generated": 5},
                    {"request_id": "z", "adapter": "a64", "rank": 64, "prompt_tokens": 7, "max_new_tokens": 9,
                     "generated": 2}],
        "queued": [{"request_id": "b", "adapter": "a16", "rank": 16, "prompt_tokens": 10, "max_new_tokens": 20}],
    }
    report = inst.apply_stats(stats)
    assert (inst.healthy, inst.lora_mode, inst.kernel, inst.max_batch) == (False, "pipeline", "bgmv", 8)
    assert report.moved_to_running == ["a"]
    assert report.adopted == ["z"]
    assert report.missing == ["c"] and report.dropped == []
    assert inst.generated("a") == 5 and inst.generated("z") == 2
    assert list(inst.resident) == ["a8", "a16"]
    assert inst.outstanding_tokens == 15 + 7 + 20 + 20     # a, z, b, c
    report = inst.apply_stats({"running": stats["running"], "queued": stats["queued"]}, drop_missing=True)
    assert report.dropped == ["c"] and not inst.has_request("c")
    assert inst.apply_stats({"num_running": 1, "num_queued": 0}).count_mismatch == (3, 1)
    with pytest.raises(SchedulerStateError, match="both 'running' and 'queued'"):
        inst.apply_stats({"running": []})
    with pytest.raises(SchedulerStateError, match="lora_mode must be one of"):
        inst.apply_stats({"lora_mode": "fast"})


def test_cluster_state_routes_events_and_moves():
    cluster = ClusterState([InstanceState("i0"), InstanceState("i1")])
    cluster.dispatch(0, req("a", 8))
    cluster.dispatch(0, req("b", 16))
    assert cluster.instance_of("a") == 0
    with pytest.raises(SchedulerStateError, match="already on instance 0"):
        cluster.dispatch(1, req("a", 8))
    cluster.move("b", 1)
    assert cluster.instance_of("b") == 1 and cluster.instances[1].queued["b"].rank == 16
    assert cluster.instances[0].load == 1
    cluster.first_token("a")
    cluster.token("a")
    with pytest.raises(SchedulerStateError, match="not queued"):
        cluster.move("a", 1)
    assert cluster.finish("a").generated == 2
    assert cluster.instance_of("a") is None
    # an instance reports a request the view has elsewhere: the instance that runs it wins
    cluster.apply_stats(0, {"running": [{"request_id": "b", "adapter": "a16", "rank": 16, "prompt_tokens": 100,
                                         "max_new_tokens": 10, "generated": 3}], "queued": []})
    assert cluster.instance_of("b") == 0 and cluster.instances[1].load == 0
    cluster.fail("b")
    assert all(i.load == 0 for i in cluster.instances)


def test_apply_stats_takes_the_typed_record():
    from caraserve_router.contracts.stats import InstanceStats

    raw = {"name": "i0", "healthy": True, "lora_mode": "pipeline", "kernel": "bgmv", "device": "cpu", "max_batch": 8,
           "resident_adapters": [{"name": "a", "rank": 8}],
           "running": [{"request_id": "r1", "adapter": "a", "rank": 8, "prompt_tokens": 5, "max_new_tokens": 9,
                        "generated": 3}], "queued": []}
    cluster = ClusterState([InstanceState("i0")])
    report = cluster.apply_stats(0, InstanceStats.from_dict(raw))
    inst = cluster.instances[0]
    assert report.adopted == ["r1"] and inst.num_running == 1 and inst.max_batch == 8
    assert inst.kernel == "bgmv" and inst.lora_mode == "pipeline" and inst.is_resident("a")
    assert cluster.instance_of("r1") == 0


def test_adopted_requests_leave_when_the_instance_stops_reporting_them():
    """A request the view only knows from stats (e.g. one the instance still aborts under its
    own id) has no stream to finish it: it must not hold a slot forever."""
    cluster = ClusterState([InstanceState("i0", max_batch=4)])
    cluster.dispatch(0, RequestInfo("mine", None, 0, 5, 10))
    row = {"adapter": None, "rank": 0, "prompt_tokens": 5, "max_new_tokens": 10, "generated": 1}
    cluster.apply_stats(0, {"running": [{**row, "request_id": "mine"}, {**row, "request_id": 8}], "queued": []})
    assert cluster.instances[0].load == 2
    report = cluster.apply_stats(0, {"running": [], "queued": []})
    assert report.dropped == [8] and report.missing == ["mine", 8]
    assert cluster.instances[0].load == 1 and cluster.instance_of(8) is None  # ours stays until its stream ends
