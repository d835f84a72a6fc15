"""Mixed multi-LoRA batches through LightLLM's llama with the patches, against HF + PEFT.

Every mode and decode kernel must give PEFT's logits (fp32 tolerance) for every row of a batch
that mixes adapters of different ranks, target modules and scalings, and base-only rows.
"""
from __future__ import annotations

import pytest

from tests import fixtures
from tests.caraserve_router.lora.lora_harness import lora_engine, peft_logits
from tests.testing import assert_close, wait_until

STEPS = 4
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27], [30, 31], [40, 41, 42, 43], [50]]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny llama and adapters: ranks 2/4/8 on all modules, one attention-only, one with
    rank_pattern + alpha_pattern, one rsLoRA."""
    root = tmp_path_factory.mktemp("lora-engine")
    model_dir, dirs = fixtures.tiny_llama_with_adapters(root, ranks=(2, 4, 8))
    dirs.append(fixtures.make_tiny_adapter(model_dir, root / "attn-r6", rank=6, target_modules=["q_proj", "k_proj",
                                           "v_proj", "o_proj"], seed=11))
    dirs.append(fixtures.make_tiny_adapter(model_dir, root / "pattern-r4", rank=4, seed=12,
                                           rank_pattern={"model.layers.0.self_attn.q_proj": 7, "down_proj": 3},
                                           alpha_pattern={"up_proj": 5.0}))
    dirs.append(fixtures.make_tiny_adapter(model_dir, root / "rslora-r5", rank=5, seed=13, use_rslora=True,
                                           target_modules=["v_proj", "gate_proj"]))
    return model_dir, dirs


def check_against_peft(model_dir, dirs, names, outs):
    by_name = {d.name: d for d in dirs}
    for i, (prompt, name) in enumerate(zip(PROMPTS, names)):
        tokens = [int(outs[s][i].argmax()) for s in range(STEPS)]
        ref = peft_logits(model_dir, by_name.get(name), prompt, tokens)
        for s in range(STEPS + 1):
            assert_close(outs[s][i], ref[s], msg=f"row {i} adapter {name} step {s}")


@pytest.mark.parametrize("mode,kernel", [("cached", "mbgmv"), ("on-demand", "mbgmv"), ("pipeline", "mbgmv"),
                                         ("cpu-assist", "mbgmv"), ("cached", "bgmv"), ("pipeline", "bgmv"),
                                         ("cpu-assist", "bgmv")])
def test_mixed_batch_matches_peft(adapters, mode, kernel):
    model_dir, dirs = adapters
    names = [dirs[0].name, None, dirs[2].name, dirs[3].name, dirs[4].name, dirs[5].name]
    engine = lora_engine(model_dir, dirs, mode=mode, decode_kernel=kernel, pool_mb=16, max_rank=8)
    try:
        outs = engine.run(PROMPTS, names, STEPS)
    finally:
        engine.close()
    check_against_peft(model_dir, dirs, names, outs)


def test_same_adapter_in_several_rows(adapters):
    model_dir, dirs = adapters
    names = [dirs[1].name] * 4 + [None, dirs[1].name]
    engine = lora_engine(model_dir, dirs, mode="pipeline", pool_mb=16, max_rank=8)
    try:
        outs = engine.run(PROMPTS, names, STEPS)
    finally:
        engine.close()
    check_against_peft(model_dir, dirs, names, outs)


def test_eviction_and_reload_keep_outputs(adapters):
    """A pool that holds fewer adapters than the working set: every batch evicts and reloads,
    and the outputs equal those of a pool that holds them all."""
    model_dir, dirs = adapters
    rounds = [[dirs[0].name, dirs[2].name], [dirs[3].name, dirs[4].name], [dirs[5].name, dirs[1].name],
              [dirs[0].name, dirs[2].name]]
    results = {}
    for label, pool_mb in (("small", 0.125), ("large", 16)):
        engine = lora_engine(model_dir, dirs, mode="pipeline", pool_mb=pool_mb, max_rank=8)
        try:
            results[label] = [engine.run(PROMPTS[:2], names, 2) for names in rounds]
            if label == "small":
                assert engine.runtime.counters["loads_cold"] > len(dirs), "the small pool must evict and reload"
        finally:
            engine.close()
    for r, (small, large) in enumerate(zip(results["small"], results["large"])):
        for s in range(3):
            assert_close(small[s], large[s], atol=0, rtol=0, msg=f"round {r} step {s}")


def test_cpu_assist_slow_link_uses_the_sidecar(adapters):
    """With a link so slow that no layer lands during the steps, every LoRA term of the cold
    adapters comes from the CPU sidecar, and the result is still PEFT's."""
    model_dir, dirs = adapters
    names = [dirs[0].name, None, dirs[2].name, dirs[3].name, dirs[4].name, dirs[5].name]
    engine = lora_engine(model_dir, dirs, mode="cpu-assist", pool_mb=16, max_rank=8, link_bandwidth_mbps=0.001)
    try:
        outs = engine.run(PROMPTS, names, STEPS)
        counters = engine.runtime.counters
        assert counters["sidecar_calls"] > 0 and counters["sidecar_fallbacks"] == 0
        assert counters["layer_wait_s"] == 0
    finally:
        engine.close()
    check_against_peft(model_dir, dirs, names, outs)


def test_forced_split_equals_device_only(adapters):
    """Layers 0..k-1 from the sidecar and k.. from the device kernel give the device-only logits."""
    model_dir, dirs = adapters
    names = [dirs[2].name, dirs[4].name, None]
    engine = lora_engine(model_dir, dirs, mode="cpu-assist", pool_mb=16, max_rank=8)
    try:
        device_only = engine.run(PROMPTS[:3], names, 2)
        for name in set(n for n in names if n):
            residency = engine.runtime.pool.get(name).residency
            residency.wait_all()
            residency.ready_at[0] = float("inf")  # layer 0 not resident: the sidecar computes it
        calls = engine.runtime.counters["sidecar_calls"]
        split = engine.run(PROMPTS[:3], names, 2)
        assert engine.runtime.counters["sidecar_calls"] > calls
    finally:
        engine.close()
    for s in range(3):
        assert_close(split[s], device_only[s], msg=f"step {s}")


def test_killed_sidecar_worker_mid_prefill_still_gives_peft_output(adapters):
    """A sidecar worker SIGKILLed while cold layers are being CPU-assisted (at the prefill's
    third sidecar call): the engine falls back to waiting for the device copy, the worker is
    replaced, and the output is still PEFT's."""
    import os
    import signal
    import time

    model_dir, dirs = adapters
    names = [dirs[0].name, None, dirs[2].name, dirs[3].name, dirs[4].name, dirs[5].name]
    engine = lora_engine(model_dir, dirs, mode="cpu-assist", pool_mb=16, max_rank=8, link_bandwidth_mbps=0.2)
    sidecar = engine.runtime.sidecar
    victim = sidecar.worker_pids()[0]
    submit, calls = sidecar.submit, []

    def killing_submit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(victim, signal.SIGKILL)
            while not _gone(victim):
                time.sleep(0.001)
        return submit(*args, **kwargs)

    sidecar.submit = killing_submit
    try:
        outs = engine.run(PROMPTS, names, STEPS)
        assert engine.runtime.counters["sidecar_fallbacks"] >= 1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (victim in sidecar.worker_pids() or not sidecar.healthy()):
            time.sleep(0.05)
        assert victim not in sidecar.worker_pids() and sidecar.healthy(), "the killed worker must be replaced"
    finally:
        engine.close()
    check_against_peft(model_dir, dirs, names, outs)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it computes nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_prefetch_reads_in_the_background_then_copies(adapters, monkeypatch):
    """A request's arrival (prefetch) starts the adapter's host read on the reader thread and
    returns at once; the admission check says no until the read is done; the next step's
    poll starts the device copy, and the outputs equal a synchronous first use."""
    import threading

    from caraserve_router.lora import adapter_store

    model_dir, dirs = adapters
    name = dirs[2].name
    release, real_read = threading.Event(), adapter_store.read_into

    def held_read(*args):  # the file read, held until released (else a fast machine finishes it at once)
        assert release.wait(30)
        real_read(*args)

    monkeypatch.setattr(adapter_store, "read_into", held_read)
    engine = lora_engine(model_dir, dirs, mode="pipeline", pool_mb=16, max_rank=8)
    try:
        runtime = engine.runtime
        key = runtime.names.key(name)
        assert runtime.prefetch(name) is False and runtime.store.reading(key)  # read started, nothing placed
        assert key not in runtime.pool and not runtime.admit(name)
        runtime.poll_prefetches()
        assert key not in runtime.pool and key in runtime._prefetching  # still reading
        release.set()
        # poll_prefetches: what every step's build_batch does
        assert wait_until(lambda: runtime.poll_prefetches() or key in runtime.pool, 30)
        assert key in runtime.pool and runtime.store.get(key).mapped and not runtime._prefetching
        assert runtime.admit(name)
        background = engine.run(PROMPTS[:1], [name], 2)
    finally:
        engine.close()
    engine = lora_engine(model_dir, dirs, mode="pipeline", pool_mb=16, max_rank=8)
    try:
        direct = engine.run(PROMPTS[:1], [name], 2)
    finally:
        engine.close()
    for step, (a, b) in enumerate(zip(background, direct)):
        assert_close(a, b, atol=0, rtol=0, msg=f"step {step}")


def test_prefetched_bad_file_refuses_the_adapter_not_the_step(adapters, tmp_path):
    """A prefetched adapter whose file holds NaN: the step's poll drops the adapter (its
    requests then fail as unknown) instead of raising out of the step."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model_dir, dirs = adapters
    bad = tmp_path / "bad-nan"
    shutil.copytree(dirs[0], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key0 = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key0] = torch.full_like(tensors[key0], float("nan"))
    save_file(tensors, bad / "adapter_model.safetensors")
    engine = lora_engine(model_dir, [dirs[0], bad], mode="pipeline", pool_mb=16, max_rank=8)
    try:
        runtime = engine.runtime
        key = runtime.names.key("bad-nan")
        runtime.prefetch("bad-nan")
        assert wait_until(lambda: runtime.poll_prefetches() or not runtime.is_known("bad-nan"), 30)  # never raises
        assert not runtime.is_known("bad-nan") and key not in runtime.store and key not in runtime.pool
        assert engine.run(PROMPTS[:1], [dirs[0].name], 1)  # the others still serve
    finally:
        engine.close()


def test_auto_chooses_per_load_and_gives_peft_output(adapters):
    """`auto` on a link too slow for any layer to land: every cold load goes to the sidecar
    (counted with its reason), never waited for (the test would hang), and the output is PEFT's.
    (Which mode wins in which regime is tested on synthetic costs in test_auto_choice.py.)"""
    model_dir, dirs = adapters
    names = [dirs[0].name, None, dirs[2].name]
    engine = lora_engine(model_dir, dirs, mode="auto", pool_mb=16, max_rank=8, link_bandwidth_mbps=0.001)
    try:
        outs = engine.run(PROMPTS[:3], names, STEPS)
        auto = engine.runtime.stats()["auto"]
        assert {c["mode"] for c in auto["choices"]} == {"cpu-assist"}
        assert sum(c["loads"] for c in auto["choices"]) == 2
        assert engine.runtime.counters["sidecar_calls"] > 0 and engine.runtime.counters["layer_wait_s"] == 0
    finally:
        engine.close()
    check_against_peft(model_dir, dirs, names[:3], outs)
