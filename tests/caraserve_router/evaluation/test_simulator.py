"""Simulator timelines on tiny clusters, every expected time computed by hand below.

Perf model (ms): prefill(T) = 10 + 0.1 T;  decode (bgmv) = 5 + 1 * batch + 0.01 * batch * max_rank;
load(r) = 0.5 r;  cpu-assist overhead 0.1 x a step that runs while a load is going on. So:
    prefill 100 tokens = 20;  prefill 50 = 15;  prefill 200 (two prompts of 100) = 30
    decode [8] = 6.08;  [64] = 6.64;  [0] = 6;  [8, 64] or [0, 64] = 8.28;  load(64) = 32;  load(8) = 4
"""
from __future__ import annotations

import pytest

from caraserve_router.scheduling.perf_model import PerfModel
from caraserve_router.scheduling.policies import Move, Policy, PolicyConfig
from caraserve_router.evaluation.simulator import SimConfig, Simulation, SimulatorError, simulate, summarize_records
from caraserve_router.evaluation.workload import Request, WorkloadConfig, generate

PM = PerfModel.from_coefficients(prefill=(10, 0.1), bgmv=(5, 1, 0.01), mbgmv=(5, 1, 0.01),
                                 load_fixed_ms=0, load_ms_per_rank=0.5, cpu_assist_overhead=0.1)


def rq(i, t, prompt=100, out=2, rank=8, adapter=None):
    name = None if rank == 0 else (adapter or f"a{rank}")
    return Request(i, t, 0, name, rank, prompt, out)


def run(reqs, policy="first-fit", **cfg):
    base = dict(num_instances=1, max_batch=32, max_wait_steps=2, lora_mode="cached", kernel="bgmv", progress_s=0)
    base.update(cfg)
    sim = Simulation(reqs, PM, policy, SimConfig(**base), PolicyConfig(max_batch=base["max_batch"]))
    metrics = sim.run()
    # the router's view holds exactly the unfinished requests at the end
    assert sum(view.load for view in sim.view.instances) == metrics["unfinished"]
    times = {r.req.index: (r.first_t * 1000, r.finish_t * 1000, r.inst) for r in sim.records
             if r.finish_t is not None}
    return times, metrics, sim


def ms(*vals):
    return pytest.approx(vals, abs=1e-6)


def test_single_request():
    # prefill 0 -> 20; three decode steps of 6.08 -> 38.24
    times, m, _ = run([rq(0, 0.0, out=4)])
    assert times[0][:2] == ms(20.0, 38.24)
    assert m["ttft_ms_mean"] == pytest.approx(20.0)
    assert m["tpot_ms_mean"] == pytest.approx(6.08)
    assert m["e2e_ms_mean"] == pytest.approx(38.24)


def test_new_request_waits_max_wait_steps_then_prefill_stalls_decoding():
    # A: prefill 0->20; decode ->26.08 (B arrives at 25, queued); decode ->32.16 (wait=2)
    # try prefill at 32.16: B (50 tokens, rank 64) 15 ms -> 47.16 = B's first token
    # decode [8, 64] 8.28 -> 55.44: B done (2 tokens); A has 4 tokens
    # A alone: decode 6.08 -> 61.52 (wait 2), retry finds nothing, decode -> 67.60: A's 6th token
    times, m, _ = run([rq(0, 0.0, out=6), rq(1, 0.025, prompt=50, out=2, rank=64)])
    assert times[0][:2] == ms(20.0, 67.60)
    assert times[1][:2] == ms(47.16, 55.44)
    # TTFT: A 20, B 22.16; TPOT: A (67.60-20)/5 = 9.52, B 8.28
    assert m["ttft_ms_mean"] == pytest.approx((20 + 22.16) / 2)
    assert m["tpot_ms_mean"] == pytest.approx((9.52 + 8.28) / 2)


def test_router_queue_when_every_instance_is_full():
    # max_batch 1, two instances, first-fit: A -> 0, B -> 1, C waits at the router.
    # inst0: A prefill 0->20, decode ->26.08 (A done), C dispatched at 26.08: prefill ->46.08, decode ->52.16
    # inst1: B prefill 1->21, decode ->27.08
    times, m, sim = run([rq(0, 0.0), rq(1, 0.001), rq(2, 0.002)], num_instances=2, max_batch=1)
    assert times[0] == ms(20.0, 26.08, 0)
    assert times[1] == ms(21.0, 27.08, 1)
    assert times[2] == ms(46.08, 52.16, 0)
    assert m["max_router_queue"] == 1


@pytest.mark.parametrize("mode, first, finish", [
    ("cached", 20.0, 26.64),        # prefill 20, decode [64] 6.64
    ("on-demand", 52.0, 58.64),     # load 32 then prefill 20
    ("pipeline", 32.0, 38.64),      # max(prefill 20, load 32)
    ("cpu-assist", 22.0, 29.304),   # prefill 20 * 1.1; decode 6.64 * 1.1 (starts at 22, load ends at 32)
])
def test_cold_start_by_lora_mode(mode, first, finish):
    # a later request of the same adapter is warm in every mode: prefill 100->120, decode ->126.64
    times, m, _ = run([rq(0, 0.0, rank=64), rq(1, 0.1, rank=64)], lora_mode=mode)
    assert times[0][:2] == ms(first, finish)
    assert times[1][:2] == ms(120.0, 126.64)
    assert m["cold_loads"] == (0 if mode == "cached" else 1)


def test_on_demand_load_stalls_the_running_batch():
    # A: base model (rank 0), prefill 0->20, decode [0] 6 -> 26 (max_wait 1)
    # B (rank 64, cold) prefilled at 26: load 32 + prefill 20 -> 78; decode [0,64] 8.28 -> 86.28 (B done)
    # A: decode [0] 6 -> 92.28, its 4th token. A's TPOT (92.28 - 20) / 3 = 24.093 instead of 6.
    times, m, _ = run([rq(0, 0.0, out=4, rank=0), rq(1, 0.001, rank=64)], lora_mode="on-demand", max_wait_steps=1)
    assert times[0][:2] == ms(20.0, 92.28)
    assert times[1][:2] == ms(78.0, 86.28)


def test_lru_capacity_evicts_and_reloads():
    # on-demand, X (64), Y (64), X again, 0.1 s apart. Capacity 64: X is evicted by Y -> three cold starts
    reqs = [rq(0, 0.0, rank=64, adapter="X"), rq(1, 0.1, rank=64, adapter="Y"), rq(2, 0.2, rank=64, adapter="X")]
    times, m, _ = run(reqs, lora_mode="on-demand", adapter_capacity_ranks=64)
    assert [times[i][0] for i in range(3)] == ms(52.0, 152.0, 252.0)
    assert m["cold_loads"] == 3
    times, m, _ = run(reqs, lora_mode="on-demand", adapter_capacity_ranks=128)
    assert [times[i][0] for i in range(3)] == ms(52.0, 152.0, 220.0)      # X still resident: 200 + 20
    assert m["cold_loads"] == 2


def test_max_prefill_tokens_splits_batches():
    # C (10 tokens out) prefills 0->20, decodes ->26.08 ->32.16; A and B (100 tokens, 3 out) arrive at 1 ms.
    reqs = [rq(0, 0.0, out=10), rq(1, 0.001, out=3), rq(2, 0.001, out=3)]
    # no limit: one prefill of A + B (200 tokens, 30 ms) at 32.16 -> both first tokens at 62.16
    times, _, _ = run(reqs)
    assert times[1][0] == pytest.approx(62.16) and times[2][0] == pytest.approx(62.16)
    # limit 150: A alone 32.16->52.16; decode [8,8] 7.16 ->59.32 ->66.48 (A done); B 66.48->86.48
    times, _, _ = run(reqs, max_prefill_tokens=150)
    assert times[1][:2] == ms(52.16, 66.48)
    assert times[2][0] == pytest.approx(86.48)


class AllToZeroMovesNewest(Policy):
    """Test policy: everything to instance 0; rebalance moves its newest queued request to 1."""

    name = "test-all-to-zero"

    def choose(self, request, instances, perf_model):
        return 0

    def rebalance(self, instances, perf_model):
        queued = list(instances[0].queued)
        return [Move(queued[-1], 0, 1)] if len(queued) > 0 else []


def test_rebalance_moves_only_queued_requests():
    # A (0) and B (1 ms) both to inst0; A prefills 0->20, B queued. First sync at 5 ms: the view
    # shows A and B queued on inst0 (A's first token is not out yet); the move of B applies, the
    # next sync's move of A (prefilling) does not. inst1: B prefill 5->25, decode ->31.08.
    sim = Simulation([rq(0, 0.0), rq(1, 0.001)], PM, AllToZeroMovesNewest(),
                     SimConfig(num_instances=2, max_wait_steps=2, sync_interval_s=0.005, progress_s=0))
    m = sim.run()
    times = {r.req.index: (r.first_t * 1000, r.finish_t * 1000, r.inst) for r in sim.records}
    assert times[0] == ms(20.0, 26.08, 0)
    assert times[1] == ms(25.0, 31.08, 1)
    assert m["queued_moves"] == 1


def test_unfinished_requests_count_as_misses():
    # drain limit 10 ms after the last arrival: A (prefill ends at 20 ms) cannot finish
    times, m, _ = run([rq(0, 0.0, out=4)], drain_limit_s=0.010)
    assert m["completed"] == 0 and m["unfinished"] == 1 and m["slo_attainment"] == 0.0


def test_slo_attainment_counts():
    # A: TPOT 6.08, B: TTFT 22.16... use the two-request timeline: TPOT A 9.52, B 8.28
    reqs = [rq(0, 0.0, out=6), rq(1, 0.025, prompt=50, out=2, rank=64)]
    _, m, _ = run(reqs, slo_tpot_ms=9.0)
    assert m["slo_attainment"] == 0.5                                  # B only
    _, m, _ = run(reqs, slo_tpot_ms=10.0, slo_ttft_ms=21.0)
    assert m["slo_attainment"] == 0.5                                  # A only (B's TTFT 22.16)
    # the artifact's metric, E2E / output tokens: A 67.60/6 = 11.27, B 30.44/2 = 15.22
    _, m, _ = run(reqs, slo_tpot_ms=12.0)
    assert m["slo_attainment_per_token_e2e"] == 0.5


def test_instances_share_their_hosts_cores():
    # two instances, one core between them, one request each at t = 0 (round-robin): instance 0
    # starts its prefill alone (20 ms); instance 1 starts while 0 is mid-step: 2 x 20 = 40 ms
    times, m, _ = run([rq(0, 0.0, out=1), rq(1, 0.0, out=1)], policy="round-robin", num_instances=2,
                      instances_per_host=2, host_cores=1)
    assert (times[0][0], times[1][0]) == (pytest.approx(20.0), pytest.approx(40.0))
    # each its own core: both 20
    times, _, _ = run([rq(0, 0.0, out=1), rq(1, 0.0, out=1)], policy="round-robin", num_instances=2,
                      instances_per_host=2, host_cores=2)
    assert (times[0][0], times[1][0]) == (pytest.approx(20.0), pytest.approx(20.0))
    # saturated: 4 instances on 2 cores finish the same work in ~2x the time of 4 cores (work is
    # conserved; the share is taken at each step's start, so not exactly 2)
    reqs = [rq(i, 0.0, out=20) for i in range(40)]
    alone, _, _ = run(reqs, policy="round-robin", num_instances=4)
    shared, m, _ = run(reqs, policy="round-robin", num_instances=4, instances_per_host=4, host_cores=2)
    makespan = [max(finish for _, finish, _ in t.values()) for t in (alone, shared)]
    assert 1.8 < makespan[1] / makespan[0] < 2.05
    assert m["host_cores"] == 2 and m["instances_per_host"] == 4


def test_config_validation():
    with pytest.raises(SimulatorError, match="lora_mode must be one of"):
        SimConfig(lora_mode="eager")
    with pytest.raises(SimulatorError, match="num_instances must be an integer >= 1"):
        SimConfig(num_instances=0)
    with pytest.raises(SimulatorError, match="kernel must be one of"):
        SimConfig(kernel="sgmv")


def test_policies_run_unchanged_and_rank_aware_beats_random_on_bgmv():
    """A small loaded cluster: every registered policy runs; rank-aware has lower TPOT than random."""
    pm = PerfModel.load(__import__("pathlib").Path(__file__).resolve().parents[3]
                        / "data" / "perf_models" / "paper_a100_llama2_7b.json")
    w = generate(WorkloadConfig(arrival="poisson", rate=40.0, duration_s=20.0, lengths="fixed",
                                prompt_len=64, output_len=120, seed=3))
    results = {}
    for name in ("rank-aware", "rank-residency-aware", "random", "round-robin", "first-fit", "most-idle", "dlora"):
        m, _ = simulate(w, pm, name, SimConfig(num_instances=8, kernel="bgmv", progress_s=0),
                        PolicyConfig(slo_tpot_ms=40.0, mean_output_len=120.0))
        assert m["completed"] == len(w), name
        results[name] = m
    assert results["rank-aware"]["tpot_ms_mean"] < 0.95 * results["random"]["tpot_ms_mean"]


def test_summarize_records_empty():
    assert summarize_records([], 40.0, None)["slo_attainment"] is None


def test_simulate_script_writes_json_and_plots(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "scripts" / "simulate.py"
    spec = importlib.util.spec_from_file_location("simulate_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "sim.json"
    rc = mod.main(["--instances", "2,3", "--rates", "4,8", "--duration", "5", "--arrival", "poisson",
                   "--length-source", "fixed", "--prompt-len", "32", "--output-len", "16",
                   "--policies", "rank-aware,random", "--progress-s", "0", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["label"] == "simulated" and res["meta"]["perf_model_metadata"]["source"]
    assert len(res["runs"]) == 2 * 2 * 2
    for policy in ("rank-aware", "random"):
        for n in (2, 3):
            for rate in ("4", "8"):
                m = res["results"][policy][f"instances={n}"][f"rate={rate}"]
                assert m["num_instances"] == n and m["policy"] == policy
                assert 0 <= m["slo_attainment"] <= 1 and m["tpot_ms_mean"] > 0 and m["completed"] > 0
    for n in (2, 3):
        assert (tmp_path / f"sim_n{n}_vs_rate.png").stat().st_size > 0
        assert (tmp_path / f"sim_n{n}_tpot_cdf.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "SIMULATED" in printed and "rank-aware" in printed
    assert mod.main(["--policies", "nope", "--duration", "1"]) == 2
