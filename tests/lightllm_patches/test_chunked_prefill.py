"""Chunked prefill on the real model worker: mixed steps (decode rows of running requests and
prompt chunks of new ones, with different adapters and ranks) give the tokens of unchunked
serving and the logits of HF + PEFT, in every LoRA mode, with sampling and stop sequences.
"""
from __future__ import annotations

import types

import pytest

from lightllm_patches.chunked_prefill import plan_step
from tests import fixtures
from tests.caraserve_router.lora.lora_harness import peft_logits
from lightllm_patches.offline_backend import BackendDriver, Job
from tests.testing import assert_close

CHUNK = 5
SAMPLED = {"top_k": 50, "top_p": 0.9, "temperature": 1.3, "seed": 7}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    model_dir, dirs = fixtures.tiny_llama_with_adapters(root, ranks=(2, 4, 8))
    dirs.append(fixtures.make_tiny_adapter(model_dir, root / "attn-r6", rank=6, seed=11,
                                           target_modules=["q_proj", "k_proj", "v_proj"]))
    return model_dir, {d.name: d for d in dirs}


def schedule(names: list) -> list:
    """Requests that arrive while others decode; prompts of 1-3 chunks and more."""
    return [
        Job(list(range(5, 17)), names[0], 5, arrive=0),  # 12 tokens: 3 chunks
        Job([40, 41, 42], None, 6, arrive=0, sampling=SAMPLED),
        Job(list(range(100, 123)), names[1], 4, arrive=2),  # joins a decoding batch
        Job([7, 8, 9, 10, 11, 12], names[2], 5, arrive=3, sampling=dict(SAMPLED, seed=9)),
        Job(list(range(200, 211)), names[3], 3, arrive=3),  # waits behind the previous chunk
        Job([300, 301], names[0], 4, arrive=6),
    ]


_PEFT: dict = {}


def peft_reference(model_dir, adapter_dir, prompt, tokens):
    """PEFT's teacher-forced logits, computed once per (adapter, prompt, tokens) for the module."""
    key = (str(adapter_dir), tuple(prompt), tuple(tokens))
    if key not in _PEFT:
        _PEFT[key] = peft_logits(model_dir, adapter_dir, prompt, tokens)
    return _PEFT[key]


def run(model_dir, adapters, jobs, chunk, mode="cached", **kw):
    driver = BackendDriver(model_dir, chunk, adapters, mode=mode, **kw)
    try:
        tokens, logits = driver.run(jobs)
        samples = list(driver.backend.step_samples)
        counters = dict(driver.backend.lora.counters)
    finally:
        driver.close()
    return types.SimpleNamespace(tokens=tokens, logits=logits, steps=driver.steps, samples=samples,
                                 counters=counters)


@pytest.mark.parametrize("mode,kw", [
    ("cached", {}),
    ("on-demand", {}),
    ("pipeline", {"decode_kernel": "bgmv"}),
    ("cpu-assist", {"link_bandwidth_mbps": 0.001}),  # nothing lands: every cold row takes the sidecar path
])
def test_mixed_steps_match_unchunked_and_peft(adapters, mode, kw):
    model_dir, dirs = adapters
    jobs = schedule(list(dirs))
    plain = run(model_dir, dirs, jobs, 0, mode, **kw)
    chunked = run(model_dir, dirs, jobs, CHUNK, mode, **kw)
    assert "prefill" in plain.steps and "mixed" not in plain.steps
    mixed = [s for s in chunked.samples if s["kind"] == "mixed"]
    assert mixed and any(s["tokens"] > s["batch"] for s in mixed), "chunks must share steps with decode rows"
    # no step carries more than one chunk of prompt tokens beside its decode rows
    assert all(s["tokens"] <= CHUNK + s["batch"] for s in chunked.samples)
    if mode == "cpu-assist":
        assert chunked.counters.get("sidecar_calls", 0) > 0 and chunked.counters.get("sidecar_fallbacks", 0) == 0
    assert chunked.tokens == plain.tokens
    for i, job in enumerate(jobs):
        assert len(chunked.tokens[i]) == job.max_new_tokens
        ref = peft_reference(model_dir, dirs.get(job.adapter), job.prompt, chunked.tokens[i][:-1])
        for s, (ours, theirs, want) in enumerate(zip(chunked.logits[i], plain.logits[i], ref)):
            assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"job {i} step {s}: chunked vs unchunked")
            assert_close(ours, want, msg=f"job {i} step {s}: chunked vs PEFT")


def test_chunk_size_does_not_change_tokens(adapters):
    """One-token chunks, a chunk that splits every prompt unevenly, and a chunk larger than
    any prompt all give the same tokens."""
    model_dir, dirs = adapters
    jobs = schedule(list(dirs))
    results = [run(model_dir, dirs, jobs, chunk).tokens for chunk in (1, 7, 64)]
    assert results[0] == results[1] == results[2]


def test_stop_sequence_ends_a_chunked_request(adapters):
    model_dir, dirs = adapters
    names = list(dirs)
    probe = run(model_dir, dirs, [Job(list(range(5, 17)), names[1], 6)], CHUNK).tokens[0]
    stop = probe[2:4]
    jobs = [Job(list(range(5, 17)), names[1], 6, stop=[stop]), Job(list(range(60, 75)), None, 6, arrive=1)]
    plain = run(model_dir, dirs, jobs, 0).tokens
    chunked = run(model_dir, dirs, jobs, CHUNK).tokens
    assert chunked == plain
    first = next(i for i in range(len(probe) - 1) if probe[i : i + 2] == stop)
    assert chunked[0] == probe[: first + 2], "generation stops right after the stop sequence"


def _req(r_id, tokens, kv):
    return types.SimpleNamespace(r_id=r_id, input_token_ids=list(range(tokens)), cur_kv_len=kv)


def test_plan_step_budget_is_first_come_first_served():
    reqs = [_req(1, 10, 9), _req(2, 30, 0), _req(3, 12, 4), _req(4, 20, 0), _req(5, 5, 4)]
    plan = plan_step(reqs, 24)
    assert [(r.req.r_id, r.start, r.length, r.samples) for r in plan.decode] == [(1, 9, 1, True), (5, 4, 1, True)]
    assert [(r.req.r_id, r.start, r.length, r.samples) for r in plan.chunks] == [(2, 0, 24, False)]
    assert [r.r_id for r in plan.waiting] == [3, 4]
    plan = plan_step(reqs[2:4], 24)
    assert [(r.req.r_id, r.start, r.length, r.samples) for r in plan.chunks] == [(3, 4, 8, True), (4, 0, 16, False)]
    with pytest.raises(ValueError):
        plan_step(reqs, 0)
