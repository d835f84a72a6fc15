"""Policies on hand-built cluster states; every expected decision is worked out by hand below.

Perf model used throughout (ms):
    prefill(T, r)  = 10 + 0.1 T                (marginal, when a prefill is pending: 0.1 T)
    bgmv  decode   = 10 + 1 * batch + 0.05 * batch * max_rank
    mbgmv decode   = 10 + 1 * batch + 0.01 * sum_ranks
    load(r)        = 0.5 r                     cpu-assist overhead 0.1 x prefill
"""
from __future__ import annotations

from collections import Counter

import pytest

from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.policies import (POLICIES, Move, PolicyConfig, PolicyError, RankAwarePolicy, make_policy,
                                       token_load)
from caraserve_router.scheduling.scheduler_state import InstanceState, RequestInfo

PM = PerfModel.from_coefficients(prefill=(10, 0.1), bgmv=(10, 1, 0.05), mbgmv=(10, 1, 0.01),
                                 load_fixed_ms=0, load_ms_per_rank=0.5, cpu_assist_overhead=0.1)
_ids = iter(range(10**9))


def request(rank=8, prompt=100, max_new=10, adapter=None):
    return RequestInfo(f"r{next(_ids)}", adapter or f"lora-r{rank}", rank, prompt, max_new)


def instance(running=(), queued=(), kernel="bgmv", max_batch=4, lora_mode="cached", healthy=True, name="i"):
    """running / queued: ranks (or RequestInfo) of the requests on it."""
    inst = InstanceState(name, max_batch=max_batch, kernel=kernel, lora_mode=lora_mode, healthy=healthy)
    for r in running:
        q = r if isinstance(r, RequestInfo) else request(r)
        inst.dispatched(q)
        inst.first_token(q.request_id)
    for r in queued:
        inst.dispatched(r if isinstance(r, RequestInfo) else request(r))
    return inst


def cfg(**kw):
    base = dict(slo_tpot_ms=40.0, mean_output_len=10.0, max_batch=4)
    base.update(kw)
    return PolicyConfig(**base)


# ---------------------------------------------------------------------- rank-aware
def test_rank_aware_groups_ranks():
    # inst0 runs [8, 8], inst1 runs [64, 64]; prefill of a 100-token prompt = 20 ms -> 2 ms/token amortised.
    cluster = [instance([8, 8]), instance([64, 64])]
    pol = make_policy("rank-aware", cfg())
    # rank-8 request: inst0 12.8 -> 14.2 (+1.4), cost 3.4, score 6.8;
    #                 inst1 18.4 -> 22.6 (+4.2), cost 6.2, score 12.4  -> inst0
    e = pol.estimates(request(8), cluster, PM)
    assert [x.d_decode_ms for x in e] == pytest.approx([1.4, 4.2])
    assert [x.score for x in e] == pytest.approx([6.8, 12.4])
    assert pol.choose(request(8), cluster, PM) == 0
    # rank-64 request: inst0 12.8 -> 10+3+0.05*3*64 = 22.6 (+9.8), cost 11.8, score 23.6;
    #                  inst1 18.4 -> 22.6 (+4.2), cost 6.2, score 12.4 -> inst1
    assert pol.choose(request(64), cluster, PM) == 1
    # most-idle sees equal loads and takes the lower index for both
    assert make_policy("most-idle", cfg()).choose(request(64), cluster, PM) == 0


def test_slo_penalty_makes_cheaper_instance_infinite():
    # inst0 runs [64]: 14.2 -> 18.4 (+4.2), cost 6.2, tpot 20.4, score 6.2 (load 1)
    # inst1 runs [8,8,8]: 14.2 -> 15.6 (+1.4), cost 3.4, tpot 17.6, score 10.2 (load 3)
    cluster = [instance([64]), instance([8, 8, 8])]
    req = request(8)
    assert make_policy("rank-aware", cfg(slo_tpot_ms=40)).choose(req, cluster, PM) == 0
    pol = make_policy("rank-aware", cfg(slo_tpot_ms=19))          # 20.4 > 19: inst0 infinite
    e = pol.estimates(req, cluster, PM)
    assert e[0].cost == float("inf") and e[0].tpot_pred_ms == pytest.approx(20.4)
    assert e[1].cost == pytest.approx(3.4)
    assert pol.choose(req, cluster, PM) == 1


def test_all_infinite_falls_back_to_least_loaded():
    cluster = [instance([8, 8, 8]), instance([64])]            # tpot 17.6 and 20.4, both > 15
    pol = make_policy("rank-aware", cfg(slo_tpot_ms=15))
    assert all(e.cost == float("inf") for e in pol.estimates(request(8), cluster, PM))
    assert pol.choose(request(8), cluster, PM) == 1                 # least loaded (1 < 3)
    # equal loads, both infinite: the lower predicted tpot wins.
    # inst0 [64]: tpot 20.4; inst1 [32]: after = 10 + 2 + 0.05*2*32 = 15.2, tpot 17.2 > 15
    cluster = [instance([64]), instance([32])]
    assert pol.choose(request(8), cluster, PM) == 1


def test_ties_score_then_cost_then_index():
    # two idle instances: score 0 for both, same cost -> lower index
    pol = make_policy("rank-aware", cfg())
    assert pol.choose(request(64), [instance(), instance()], PM) == 0
    # idle bgmv vs idle mbgmv: score 0 both; rank-64 cost: bgmv 2 + 14.2, mbgmv 2 + 11.64 -> inst1
    cluster = [instance(kernel="bgmv"), instance(kernel="mbgmv")]
    e = pol.estimates(request(64), cluster, PM)
    assert [x.score for x in e] == [0.0, 0.0]
    assert [x.cost for x in e] == pytest.approx([16.2, 13.64])
    assert pol.choose(request(64), cluster, PM) == 1


def test_pending_prefill_costs_only_the_marginal_prompt():
    # inst0 runs [8] and has one queued [8]: the new prompt adds 0.1*100 = 10 ms (not 20) -> 1 ms/token
    inst = instance([8], queued=[8])
    e = make_policy("rank-aware", cfg()).estimate(0, inst, request(8), PM)
    assert e.d_prefill_ms == pytest.approx(10.0)
    # decode: [8,8] 12.8 -> [8,8,8] 14.2 : +1.4 ; cost 2.4 ; score 4.8
    assert e.cost == pytest.approx(2.4) and e.score == pytest.approx(4.8)


def test_full_and_unhealthy_instances_are_skipped():
    full = instance([8, 8, 8, 8])
    sick = instance(healthy=False)
    for name in POLICIES:
        pol = make_policy(name, cfg())
        assert pol.choose(request(8), [full, sick], PM) is None, name
        assert pol.choose(request(8), [full, sick, instance([64])], PM) == 2, name
    # max_queue lets an instance hold requests beyond its batch
    assert make_policy("first-fit", cfg(max_queue=1)).choose(request(8), [full], PM) == 0


def test_first_fit_prefers_batch_room_over_queue_room():
    full, busy = instance([8, 8, 8, 8]), instance([8, 8])
    # with queues allowed, the full instance 0 still has queue room, but instance 1 has batch room
    assert make_policy("first-fit", cfg(max_queue=8)).choose(request(8), [full, busy], PM) == 1
    assert make_policy("first-fit", cfg(max_queue=8)).choose(request(8), [full, instance([8] * 4)], PM) == 0


@pytest.mark.parametrize("mode, cold_ms", [
    ("cached", 0.0),            # never cold
    ("on-demand", 32.0),        # load(64) = 32 ms before the prefill
    ("pipeline", 12.0),         # max(0, 32 - 20)
    ("cpu-assist", 2.0),        # 0.1 x prefill 20
])
def test_residency_aware_cold_start_by_mode(mode, cold_ms):
    req = request(64, adapter="hot")
    cold, warm = instance(lora_mode=mode), instance(lora_mode=mode)
    warm.mark_resident("hot", 64)
    pol = make_policy("rank-residency-aware", cfg(slo_tpot_ms=100))
    e_cold, e_warm = pol.estimates(req, [cold, warm], PM)
    assert e_warm.d_prefill_ms == pytest.approx(20.0)
    assert e_cold.d_prefill_ms == pytest.approx(20.0 + cold_ms)
    # both idle (score 0): the tie goes to the smaller cost -> the warm one unless the mode has no cold cost
    assert pol.choose(req, [cold, warm], PM) == (0 if cold_ms == 0 else 1)
    # plain rank-aware ignores residency: index order
    assert make_policy("rank-aware", cfg(slo_tpot_ms=100)).choose(req, [cold, warm], PM) == 0


def test_residency_cold_start_can_break_the_slo():
    # on-demand, rank 64, 100 tokens: cold d_prefill 52 -> 5.2/token; idle decode 14.2 -> tpot 19.4 > 18
    req = request(64, adapter="x")
    cold, warm = instance(lora_mode="on-demand"), instance([64, 64], lora_mode="on-demand")
    warm.mark_resident("x", 64)
    pol = make_policy("rank-residency-aware", cfg(slo_tpot_ms=25))
    e = pol.estimates(req, [cold, warm], PM)
    assert e[0].tpot_pred_ms == pytest.approx(19.4)
    # warm: [64,64] 18.4 -> 10+3+9.6 = 22.6, tpot 24.6 <= 25, cost 2 + 4.2 = 6.2, score 12.4; cold: score 0
    assert pol.choose(req, [cold, warm], PM) == 0
    pol = make_policy("rank-residency-aware", cfg(slo_tpot_ms=19))     # cold 19.4 > 19, warm 24.6 > 19
    assert pol.choose(req, [cold, warm], PM) == 0                       # all infinite: least loaded


# ---------------------------------------------------------------------- baselines
def test_random_is_seeded_and_uniform_over_candidates():
    cluster = [instance(), instance([8] * 4), instance(), instance(healthy=False), instance()]
    a = make_policy("random", cfg(seed=3))
    b = make_policy("random", cfg(seed=3))
    seq_a = [a.choose(request(), cluster, PM) for _ in range(300)]
    seq_b = [b.choose(request(), cluster, PM) for _ in range(300)]
    assert seq_a == seq_b
    counts = Counter(seq_a)
    assert set(counts) == {0, 2, 4}
    assert all(70 <= c <= 130 for c in counts.values())             # 100 expected each
    c = make_policy("random", cfg(seed=4))
    assert [c.choose(request(), cluster, PM) for _ in range(300)] != seq_a


def test_round_robin_skips_unavailable():
    cluster = [instance(), instance(healthy=False), instance(), instance([8] * 4)]
    pol = make_policy("round-robin", cfg())
    assert [pol.choose(request(), cluster, PM) for _ in range(5)] == [0, 2, 0, 2, 0]


def test_first_fit_packs_first_with_room():
    cluster = [instance([8] * 4), instance(healthy=False), instance([8, 8, 8]), instance()]
    assert make_policy("first-fit", cfg()).choose(request(), cluster, PM) == 2


def test_most_idle_least_running_plus_queued():
    cluster = [instance([8, 8], queued=[8]), instance([8]), instance(healthy=False), instance(queued=[8, 8])]
    assert make_policy("most-idle", cfg()).choose(request(), cluster, PM) == 1


# ---------------------------------------------------------------------- dlora
def test_dlora_prefers_merge_and_queued_prefill_among_near_least_loaded():
    r0 = request(8, prompt=5, max_new=100)
    i0 = instance([r0])                                     # outstanding 100 - 1 = 99
    i1 = instance(queued=[request(16, prompt=20, max_new=50, adapter="x")])   # 50 + 20 = 70
    i2 = instance()                                         # 0
    cluster = [i0, i1, i2]
    assert [token_load(i) for i in cluster] == [99, 70, 0]
    req = request(16, adapter="x")
    # mean_output_len 60: bound = 0 * 1.1 + 60 -> only i2 is near the least -> i2
    assert make_policy("dlora", cfg(mean_output_len=60)).choose(req, cluster, PM) == 2
    # mean_output_len 100: bound 100 -> all near; i1 has queued requests of adapter x -> i1
    assert make_policy("dlora", cfg(mean_output_len=100)).choose(req, cluster, PM) == 1
    # another adapter: i1 still has a queued prefill pending -> i1
    assert make_policy("dlora", cfg(mean_output_len=100)).choose(request(8, adapter="y"), cluster, PM) == 1


def test_dlora_rebalance_moves_newest_queued_off_the_most_loaded():
    q = [request(8, prompt=10, max_new=100) for _ in range(3)]     # 110 tokens of load each
    cluster = [instance(queued=q), instance(), instance(healthy=False)]
    pol = make_policy("dlora", cfg(mean_output_len=60, dlora_imbalance=0.5))
    # 330 > 1.5*0 + 60 -> move q[2]: 220 vs 110; 220 > 1.5*110 + 60 = 225? no -> stop
    assert pol.rebalance(cluster, PM) == [Move(q[2].request_id, 0, 1)]
    assert make_policy("dlora", cfg(mean_output_len=60, dlora_max_moves=1, dlora_imbalance=0.0)).rebalance(
        cluster, PM) == [Move(q[2].request_id, 0, 1)]
    # nothing queued on the most loaded instance: no move (running requests are never migrated)
    busy = instance([request(8, max_new=500)])
    assert pol.rebalance([busy, instance()], PM) == []
    for name in POLICIES:
        if name != "dlora":
            assert make_policy(name, cfg()).rebalance(cluster, PM) == []


# ---------------------------------------------------------------------- config and registry
def test_registry_and_config_validation():
    assert set(POLICIES) == {"rank-aware", "rank-residency-aware", "random", "round-robin", "first-fit",
                             "most-idle", "dlora"}
    assert isinstance(make_policy("rank-aware"), RankAwarePolicy)
    with pytest.raises(PolicyError, match="unknown policy 'best'"):
        make_policy("best")
    with pytest.raises(PolicyError, match="slo_tpot_ms must be a finite number > 0"):
        PolicyConfig(slo_tpot_ms=0)
    with pytest.raises(PolicyError, match="max_batch must be an integer >= 1"):
        PolicyConfig(max_batch=0)
    with pytest.raises(PolicyError, match="max_queue must be an integer >= 0"):
        PolicyConfig(max_queue=-1)


def test_choose_does_not_mutate_instances():
    cluster = [instance([8], queued=[16]), instance([64])]
    before = [(i.load, i.sum_ranks, i.max_rank) for i in cluster]
    for name in POLICIES:
        make_policy(name, cfg()).choose(request(32), cluster, PM)
    assert [(i.load, i.sum_ranks, i.max_rank) for i in cluster] == before


def test_registry_capabilities_match_behaviour():
    """A policy's capability attributes say what it does: one that does not need a perf model
    chooses with none, one that does not rebalance never moves, dlora does move."""
    from caraserve_router.scheduling.policies import policy_class

    busy = instance([8] * 4, queued=[request(8, max_new=500) for _ in range(4)], max_batch=32)
    idle = instance([], max_batch=32)
    for name, cls in POLICIES.items():
        assert policy_class(name) is cls and cls.name == name
        pol = make_policy(name, cfg())
        if not cls.needs_perf_model:
            assert pol.choose(request(8), [busy, idle], None) in (0, 1)
        moves = pol.rebalance([busy, idle], PM)
        assert (len(moves) > 0) == cls.rebalances, (name, moves)
    assert [n for n, c in POLICIES.items() if c.needs_perf_model] == ["rank-aware", "rank-residency-aware"]
    with pytest.raises(PolicyError):
        policy_class("no-such-policy")
