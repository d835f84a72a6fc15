"""The CUDA-graph decode path on the CPU (lightllm_patches/cuda_graph.py), capture replaced by a
direct call of the same body over the same static buffers.

Padded buckets must give the dynamic (eager) path's tokens and logits in every LoRA mode and
both decode kernels, while rows join and leave the running batch and adapters are loaded,
evicted and reloaded between steps; and HF + PEFT's logits (an independent reference) for a
mixed batch. The graphs must follow a reallocated KV cache or LoRA pool (captured again, never
replayed against the old addresses).
"""
from __future__ import annotations

import pytest
import torch

from lightllm_patches.cuda_graph import DecodeGraphRunner, graph_buckets
from lightllm_patches.offline_backend import BackendDriver, Job
from tests import fixtures
from tests.caraserve_router.lora.lora_harness import lora_engine, peft_logits
from tests.testing import assert_close


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    model_dir, dirs = fixtures.tiny_llama_with_adapters(root, ranks=(2, 4, 8))
    dirs.append(fixtures.make_tiny_adapter(model_dir, root / "qkv-r6", rank=6, seed=21,
                                           target_modules=["q_proj", "k_proj", "v_proj"]))
    return model_dir, dirs


def jobs(names):
    """Rows join at steps 0, 1, 2, 4, 5, 8 and leave after 3..9 tokens; at most two adapters run
    at once, and the first comes back at step 8 after the others went through the pool (a small
    pool evicts and reloads it)."""
    a, b, c, d = names
    spec = [([5, 6, 7, 8], a, 3, 0), ([9, 10], None, 9, 0), ([11, 12, 13], b, 3, 1), ([26, 27], None, 4, 2),
            ([14, 15, 16, 17, 18], c, 3, 4), ([19, 20], d, 3, 5), ([24, 25], a, 3, 8)]
    return [Job(prompt=p, adapter=n, max_new_tokens=t, arrive=s) for p, n, t, s in spec]


def drive(model_dir, dirs, graphs: bool, chunk: int = 0, **lora_kw):
    driver = BackendDriver(model_dir, chunk_tokens=chunk, adapters={d.name: d for d in dirs}, graphs=graphs,
                           max_batch=6, **lora_kw)
    try:
        tokens, logits = driver.run(jobs([dirs[0].name, dirs[2].name, dirs[3].name, dirs[1].name]))
        runner = driver.backend.graphs
        counters = dict(runner.counters, step_kinds=list(driver.steps)) if runner is not None else None
        return tokens, logits, counters, dict(driver.backend.lora.counters)
    finally:
        driver.close()


SMALL_POOL_MB = 0.09  # 94 KB: any two of the four adapters (16, 64, 15, 32 KB), not all four
CASES = [("cached", "mbgmv", 16), ("on-demand", "mbgmv", SMALL_POOL_MB), ("pipeline", "mbgmv", SMALL_POOL_MB),
         ("cpu-assist", "mbgmv", SMALL_POOL_MB), ("cached", "bgmv", 16), ("pipeline", "bgmv", SMALL_POOL_MB)]


@pytest.mark.parametrize("mode,kernel,pool_mb", CASES)
def test_padded_graph_buckets_give_the_dynamic_paths_tokens(tiny, mode, kernel, pool_mb):
    model_dir, dirs = tiny
    kw = dict(mode=mode, decode_kernel=kernel, pool_mb=pool_mb, max_rank=8)
    eager_tokens, eager_logits, _, eager_lora = drive(model_dir, dirs, graphs=False, **kw)
    tokens, logits, graphs, lora = drive(model_dir, dirs, graphs=True, **kw)
    assert tokens == eager_tokens
    for i, (rows, ref_rows) in enumerate(zip(logits, eager_logits)):
        for s, (row, ref) in enumerate(zip(rows, ref_rows)):
            assert_close(row, ref, msg=f"{mode} {kernel}: request {i} token {s}")
    assert graphs["replays"] >= 5 and graphs["padded_rows"] > 0, graphs  # 3 rows -> bucket 4: padded
    assert lora.get("loads_cold", 0) == eager_lora.get("loads_cold", 0)
    if pool_mb < 1:  # 4 adapters through a pool that holds fewer: evicted and reloaded between steps
        assert lora["loads_cold"] > 4, lora


def test_mixed_chunked_steps_run_eagerly_and_decode_steps_replay(tiny):
    model_dir, dirs = tiny
    kw = dict(mode="pipeline", decode_kernel="mbgmv", pool_mb=SMALL_POOL_MB, max_rank=8)
    eager_tokens, eager_logits, _, _ = drive(model_dir, dirs, graphs=False, chunk=3, **kw)
    tokens, logits, graphs, _ = drive(model_dir, dirs, graphs=True, chunk=3, **kw)
    assert tokens == eager_tokens
    for rows, ref_rows in zip(logits, eager_logits):
        for row, ref in zip(rows, ref_rows):
            assert_close(row, ref, msg="chunked prefill with graphs")
    kinds = graphs["step_kinds"]
    assert "mixed" in kinds and graphs["replays"] == kinds.count("decode") > 0, graphs


def test_graph_steps_match_peft(tiny):
    """Independent reference: HF transformers + PEFT, rows of four adapters and a base row, in a
    padded bucket (5 rows -> 6)."""
    model_dir, dirs = tiny
    prompts = [[5, 6, 7, 8], [11, 12, 13], [20, 21], [30, 31, 32, 33, 34], [40]]
    names = [dirs[0].name, None, dirs[2].name, dirs[3].name, dirs[1].name]
    engine = lora_engine(model_dir, dirs, mode="cached", pool_mb=16, max_rank=8)
    try:
        engine.graphs = DecodeGraphRunner(engine.model, engine.runtime.step_context, max_batch=6)
        assert engine.graphs.buckets == [1, 2, 4, 6]
        outs = engine.run(prompts, names, 3)
        assert engine.graphs.counters["replays"] == 3 and engine.graphs.counters["padded_rows"] == 3
    finally:
        engine.close()
    by_name = {d.name: d for d in dirs}
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        tokens = [int(outs[s][i].argmax()) for s in range(3)]
        ref = peft_logits(model_dir, by_name.get(name), prompt, tokens)
        for s in range(4):
            assert_close(outs[s][i], ref[s], msg=f"row {i} adapter {name} step {s}")


def test_a_reallocated_kv_cache_is_captured_again(tiny):
    model_dir, dirs = tiny
    prompts, names = [[5, 6, 7], [8, 9]], [dirs[0].name, None]
    engine = lora_engine(model_dir, dirs, mode="cached", pool_mb=16, max_rank=8)
    try:
        eager = engine.run(prompts, names, 2)
        engine.graphs = runner = DecodeGraphRunner(engine.model, engine.runtime.step_context, max_batch=4)
        first = engine.run(prompts, names, 2)
        engine.model.mem_manager.resize_mem(engine.model.mem_manager.size)  # new KV buffers, allocations forgotten
        second = engine.run(prompts, names, 2)
        assert runner.counters["recaptures"] == 1 and runner.enabled
        assert engine.model.mem_manager.mem_state[runner.pad_slot] > 0  # the pad row's KV slot is held again
        held = int((engine.model.mem_manager.mem_state > 0).sum())
        engine.runtime.pool.W = engine.runtime.pool.W.clone()  # the LoRA pool moves (same bytes)
        third = engine.run(prompts, names, 2)
        assert runner.counters["recaptures"] == 2
        assert int((engine.model.mem_manager.mem_state > 0).sum()) == held  # no second pad slot taken
    finally:
        engine.close()
    for s in range(3):
        assert_close(first[s], eager[s], msg=f"step {s}")
        assert_close(second[s], eager[s], msg=f"after the resize, step {s}")
        assert_close(third[s], eager[s], msg=f"after the pool moved, step {s}")


def test_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(64) == [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64]
    assert graph_buckets(200)[-3:] == [112, 128, 200]
    for top in (3, 7, 33, 300):
        b = graph_buckets(top)
        assert b[0] == 1 and b[-1] == top and b == sorted(set(b))


def test_rows_above_the_largest_bucket_and_prefill_run_eagerly(tiny):
    model_dir, dirs = tiny
    engine = lora_engine(model_dir, dirs, mode="cached", pool_mb=16, max_rank=8)
    try:
        engine.graphs = runner = DecodeGraphRunner(engine.model, engine.runtime.step_context, max_batch=2)
        free = engine.model.mem_manager.can_use_mem_size
        assert runner.run({"batch_size": 3, "is_prefill": False}) is None
        assert runner.run({"batch_size": 1, "is_prefill": True}) is None
        assert engine.model.mem_manager.can_use_mem_size == free  # refused steps allocate nothing
        assert runner.counters["eager"] == 2 and runner.counters["replays"] == 0
        assert torch.equal(runner.inputs.b_seq_len, torch.ones_like(runner.inputs.b_seq_len))
    finally:
        engine.close()
