"""CUDA-graph decode (lightllm_patches/cuda_graph.py) on the GPU: captured graphs against eager.

The model worker (`CaraBackend`, driven in process) in fp16 with LightLLM's Triton kernels and
CaraServe's LoRA kernels, graphs captured at start for every bucket: a replayed step must give
the eager step's logits (fp16 tolerance) and the same greedy tokens, in every LoRA mode and
both decode kernels, while rows join and leave, a cold adapter arrives mid-run (its loading
steps run eagerly, the steps after replay), and, with chunked prefill, mixed steps run between
replayed ones. The graphs must be captured again after the KV cache or the LoRA pool is
reallocated, and refused cleanly (eager from then on) when a capture fails.
"""
from __future__ import annotations

import pytest
import torch

from caraserve_router.assets.demo_adapters import make_random_adapter
from lightllm_patches import cuda_graph
from lightllm_patches.offline_backend import BackendDriver, Job
from tests.cuda.common import CUDA_TESTS, build_cuda_llama, compiled_triton
from tests.testing import tolerance

pytestmark = CUDA_TESTS

STRENGTH = 0.5  # the adapters move the logits far beyond the fp16 tolerance


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs-cuda")
    model_dir = build_cuda_llama(root)
    specs = {"all-r8": dict(rank=8), "qkv-r16": dict(rank=16, target_modules=["q_proj", "k_proj", "v_proj"]),
             "all-r4": dict(rank=4), "mlp-r32": dict(rank=32, target_modules=["gate_proj", "up_proj", "down_proj"])}
    dirs = {name: make_random_adapter(model_dir, root / name, seed=i, strength=STRENGTH, **kw)
            for i, (name, kw) in enumerate(specs.items())}
    return model_dir, dirs


def jobs():
    """Rows join at steps 0, 1, 3, 5 and leave after 4..9 tokens; "mlp-r32" first arrives at step
    5, cold in every mode but cached. Prompts above the chunk size give mixed steps when chunked."""
    spec = [(list(range(5, 25)), "all-r8", 9, 0), ([30, 31, 32], None, 6, 0), (list(range(40, 51)), "qkv-r16", 5, 1),
            ([60, 61], "all-r4", 4, 3), (list(range(70, 79)), "mlp-r32", 6, 5), ([90, 91, 92], "all-r8", 4, 5)]
    return [Job(prompt=p, adapter=n, max_new_tokens=t, arrive=s) for p, n, t, s in spec]


def drive(model_dir, dirs, graphs: bool, chunk: int = 0, **lora_kw):
    lora_kw.setdefault("pool_mb", 16)
    lora_kw.setdefault("max_rank", 32)
    driver = BackendDriver(model_dir, chunk_tokens=chunk, adapters=dirs, graphs=graphs, device="cuda",
                           dtype="float16", max_batch=8, sidecar_workers=2, link_bandwidth_mbps=2000.0, **lora_kw)
    try:
        if graphs:
            assert driver.backend.graphs is not None and driver.backend.graphs.capture
        tokens, logits = driver.run(jobs())
        counters = dict(driver.backend.graphs.counters) if graphs else None
        return tokens, logits, counters, list(driver.steps)
    finally:
        driver.close()


def assert_same(tokens, logits, ref_tokens, ref_logits, where):
    atol, rtol = tolerance(torch.float16)
    assert tokens == ref_tokens, f"{where}: greedy tokens differ"
    for i, (rows, ref_rows) in enumerate(zip(logits, ref_logits)):
        for s, (row, ref) in enumerate(zip(rows, ref_rows)):
            torch.testing.assert_close(row.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol,
                                       msg=lambda m: f"{where}: request {i} token {s}\n{m}")


@pytest.mark.parametrize("mode,kernel,chunk", [("cached", "mbgmv", 0), ("on-demand", "mbgmv", 0),
                                               ("pipeline", "mbgmv", 0), ("cpu-assist", "mbgmv", 0),
                                               ("cached", "bgmv", 0), ("pipeline", "bgmv", 0),
                                               ("cpu-assist", "mbgmv", 8)])
def test_graph_replay_equals_eager(tiny, mode, kernel, chunk):
    assert compiled_triton(), "unset TRITON_INTERPRET"
    model_dir, dirs = tiny
    ref_tokens, ref_logits, _, _ = drive(model_dir, dirs, False, chunk, mode=mode, decode_kernel=kernel)
    tokens, logits, counters, kinds = drive(model_dir, dirs, True, chunk, mode=mode, decode_kernel=kernel)
    assert_same(tokens, logits, ref_tokens, ref_logits, f"{mode} {kernel} chunk {chunk}")
    assert counters["replays"] > 0 and counters["padded_rows"] > 0, counters
    if chunk:
        assert "mixed" in kinds, kinds  # mixed steps (eager) between replayed decode steps


def test_reallocated_kv_cache_or_pool_is_captured_again(tiny):
    model_dir, dirs = tiny
    ref_tokens, ref_logits, _, _ = drive(model_dir, dirs, False)
    driver = BackendDriver(model_dir, chunk_tokens=0, adapters=dirs, graphs=True, device="cuda", dtype="float16",
                           max_batch=8, pool_mb=16, max_rank=32, mode="cached")
    try:
        runner = driver.backend.graphs
        stepper = driver.stepper(jobs())
        for step in stepper:
            if step == 2:
                pool = driver.backend.lora.pool
                pool.W = pool.W.clone()  # the pool moves (same bytes): the graphs must not read the old one
            if step == 4:
                break
        assert runner.counters["recaptures"] == 1 and runner.enabled
    finally:
        driver.close()
    # (a fresh driver for the token check: the stepper above was left part way)
    driver = BackendDriver(model_dir, chunk_tokens=0, adapters=dirs, graphs=True, device="cuda", dtype="float16",
                           max_batch=8, pool_mb=16, max_rank=32, mode="cached")
    try:
        mm = driver.backend.model.mem_manager
        mm.resize_mem(mm.size)  # nothing allocated yet but the pad slot, which the resize forgets
        tokens, logits = driver.run(jobs())
        assert driver.backend.graphs.counters["recaptures"] == 1
        assert int(mm.mem_state[driver.backend.graphs.pad_slot]) > 0
    finally:
        driver.close()
    assert_same(tokens, logits, ref_tokens, ref_logits, "after a KV resize")


def test_a_failed_capture_is_refused_cleanly(tiny, monkeypatch):
    model_dir, dirs = tiny
    ref_tokens, ref_logits, _, _ = drive(model_dir, dirs, False, mode="cached")
    driver = BackendDriver(model_dir, chunk_tokens=0, adapters=dirs, graphs=True, device="cuda", dtype="float16",
                           max_batch=8, pool_mb=16, max_rank=32, mode="cached")
    try:
        def fail(*args, **kwargs):
            raise RuntimeError("capture refused (test)")

        monkeypatch.setattr(cuda_graph._Captured, "__init__", fail)
        mm = driver.backend.model.mem_manager
        mm.resize_mem(mm.size)
        tokens, logits = driver.run(jobs())
        runner = driver.backend.graphs
        assert not runner.enabled and not runner.graphs and runner.counters["replays"] == 0
    finally:
        driver.close()
    assert_same(tokens, logits, ref_tokens, ref_logits, "graphs refused: eager")
