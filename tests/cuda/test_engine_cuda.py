"""The engine on CUDA against HF + PEFT: LightLLM 0.0.1's llama with its own Triton kernels
(rmsnorm, rotary, silu-and-mul, KV copies, prefill and decode attention) plus CaraServe's LoRA
kernels, the real CudaLink and the sidecar's CUDA path, in fp16, for a mixed batch (adapters
of different ranks, targets and scalings, and base-only rows), in all four LoRA modes.

The reference is HF transformers + PEFT in float32 on the CPU, teacher-forced on the engine's
own greedy tokens: logits must agree within the fp16 tolerance, and every token the engine
picked must be the reference's best up to that tolerance. A guard checks that each adapter
moves the reference logits by far more than the tolerance, so a dropped LoRA term fails.
"""
from __future__ import annotations

import functools

import pytest
import torch

from caraserve_router.assets.demo_adapters import make_random_adapter
from caraserve_router.contracts.configs import LoRAConfig, SidecarConfig
from lightllm_patches.offline import OfflineEngine
from tests.caraserve_router.lora.lora_harness import peft_logits
from tests.cuda.common import CUDA_TESTS, build_cuda_llama, cuda_device
from tests.testing import tolerance

pytestmark = CUDA_TESTS

DTYPE = torch.float16
STEPS = 4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27], [30, 31],
           [40, 41, 42, 43, 44], [50]]
STRENGTH = 0.5  # ||delta W|| = 0.5 ||W||: far above the fp16 tolerance in the logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, {name: adapter dir}): ranks 8 / 16 / 4 / 32, all modules, attention only,
    rank_pattern + alpha_pattern, rsLoRA on two modules."""
    root = tmp_path_factory.mktemp("engine-cuda")
    model_dir = build_cuda_llama(root)
    specs = {
        "all-r8": dict(rank=8),
        "attn-r16": dict(rank=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "pattern-r4": dict(rank=4, rank_pattern={"model.layers.0.self_attn.q_proj": 7, "down_proj": 3},
                           alpha_pattern={"up_proj": 5.0}),
        "rslora-r32": dict(rank=32, use_rslora=True, target_modules=["v_proj", "gate_proj"]),
    }
    dirs = {name: make_random_adapter(model_dir, root / name, seed=i, strength=STRENGTH, **kw)
            for i, (name, kw) in enumerate(specs.items())}
    return model_dir, dirs


NAMES = ["all-r8", None, "attn-r16", "pattern-r4", "rslora-r32", "all-r8"]


@functools.lru_cache(maxsize=None)
def _reference(model_dir, adapter_dir, prompt: tuple, tokens: tuple) -> list:
    return peft_logits(model_dir, adapter_dir, list(prompt), list(tokens))


def engine(model_dir, dirs, sidecar_workers=2, **lora_kw) -> OfflineEngine:
    lora_kw.setdefault("pool_mb", 16)
    lora_kw.setdefault("max_rank", 32)
    return OfflineEngine(model_dir, device=str(cuda_device()), dtype="float16", lora=LoRAConfig(**lora_kw),
                         sidecar=SidecarConfig(workers=sidecar_workers, deadline_ms=5000.0), adapters=dirs)


def check_against_peft(model_dir, dirs, names, outs) -> None:
    atol, rtol = tolerance(DTYPE)
    for i, (prompt, name) in enumerate(zip(PROMPTS, names)):
        logits = [outs[s][i].float().cpu() for s in range(STEPS + 1)]
        tokens = tuple(int(step.argmax()) for step in logits[:STEPS])
        ref = _reference(model_dir, dirs.get(name), tuple(prompt), tokens)
        for s in range(STEPS + 1):
            where = f"row {i} adapter {name} step {s}"
            torch.testing.assert_close(logits[s], ref[s], atol=atol, rtol=rtol, msg=lambda m: f"{where}\n{m}")
            chosen = int(logits[s].argmax())
            slack = 2 * (atol + rtol * float(ref[s].abs().max()))
            assert float(ref[s][chosen]) >= float(ref[s].max()) - slack, f"{where}: token {chosen} is not PEFT's best"


def test_adapters_move_the_logits_far_beyond_the_tolerance(tiny):
    model_dir, dirs = tiny
    atol, _ = tolerance(DTYPE)
    base = _reference(model_dir, None, tuple(PROMPTS[0]), ())
    for name, adapter_dir in dirs.items():
        adapted = _reference(model_dir, adapter_dir, tuple(PROMPTS[0]), ())
        assert float((adapted[0] - base[0]).abs().max()) > 10 * atol, name


@pytest.mark.parametrize("mode,kernel", [("cached", "mbgmv"), ("on-demand", "mbgmv"), ("pipeline", "mbgmv"),
                                         ("cpu-assist", "mbgmv"), ("cached", "bgmv"), ("pipeline", "bgmv")])
def test_mixed_batch_matches_peft(tiny, mode, kernel):
    model_dir, dirs = tiny
    eng = engine(model_dir, dirs, mode=mode, decode_kernel=kernel)
    try:
        assert eng.runtime.stats()["link"] == "cuda"
        outs = eng.run(PROMPTS, NAMES, STEPS)
        torch.cuda.synchronize()
        if mode != "cached":
            assert eng.runtime.counters["loads_cold"] == len(set(n for n in NAMES if n))
    finally:
        eng.close()
    check_against_peft(model_dir, dirs, NAMES, outs)


def test_cpu_assist_on_a_slow_link_takes_every_cold_layer_from_the_sidecar(tiny):
    """An emulated link too slow for any layer to land during the steps: every LoRA term of the
    cold adapters comes through the sidecar's CUDA path (device->host x, host->device delta)."""
    model_dir, dirs = tiny
    eng = engine(model_dir, dirs, mode="cpu-assist", link="emulated", link_bandwidth_mbps=0.001)
    try:
        outs = eng.run(PROMPTS, NAMES, STEPS)
        torch.cuda.synchronize()
        counters = eng.runtime.counters
        assert counters["sidecar_calls"] > 0 and counters["sidecar_fallbacks"] == 0
        assert counters["layer_wait_s"] == 0
    finally:
        eng.close()
    check_against_peft(model_dir, dirs, NAMES, outs)


def test_cpu_assist_split_on_the_cuda_link_equals_device_only(tiny):
    """Adapters resident through the real CudaLink, then layer 0 declared not resident: layer 0's
    terms come from the sidecar, the rest from the Triton kernels; the logits stay the same."""
    model_dir, dirs = tiny
    names = ["attn-r16", "pattern-r4", None]
    eng = engine(model_dir, dirs, mode="cpu-assist")
    try:
        device_only = eng.run(PROMPTS[:3], names, 2)
        for name in set(n for n in names if n):
            residency = eng.runtime.pool.get(name).residency
            residency.wait_all()
            residency.is_ready = lambda layer, ready=residency.is_ready: layer != 0 and ready(layer)
            residency.all_ready = lambda: False
        calls = eng.runtime.counters["sidecar_calls"]
        split = eng.run(PROMPTS[:3], names, 2)
        torch.cuda.synchronize()
        assert eng.runtime.counters["sidecar_calls"] > calls
        assert eng.runtime.counters["sidecar_fallbacks"] == 0
    finally:
        eng.close()
    atol, rtol = tolerance(DTYPE)
    for s in range(3):
        torch.testing.assert_close(split[s].float().cpu(), device_only[s].float().cpu(), atol=atol, rtol=rtol)
