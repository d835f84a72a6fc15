"""Llama 3.x-, Qwen2- and Mistral-shaped models on CUDA (fp16, LightLLM's Triton kernels)
against HF + PEFT in float32 on the CPU: the rotary tables the Triton rotary kernel reads
(llama3 scaling), the q/k/v biases and tied embeddings on the device, and a mixed batch of
adapters in a device-only mode and through the sidecar's CUDA path.

Shapes: tests/fixtures/families.py with head_dim 64 (LightLLM's attention kernels take 16..256).
"""
from __future__ import annotations

import pytest
import torch

from caraserve_router.assets.demo_adapters import make_random_adapter
from caraserve_router.contracts.configs import LoRAConfig, SidecarConfig
from lightllm_patches.offline import OfflineEngine
from lightllm_patches.rope import rotary_tables
from tests.caraserve_router.lora.lora_harness import peft_logits
from tests.cuda.common import CUDA_TESTS, cuda_device, tiny_tokenizer_dir
from tests.fixtures.families import FAMILY_KINDS, build_family_model
from tests.testing import tolerance

pytestmark = CUDA_TESTS

DTYPE = torch.float16
STEPS = 3
PROMPTS = [list(range(5, 45)), [11, 12, 13], [20, 21, 22, 23, 24, 25]]
NAMES = ["all-r8", None, "qkv-r4"]
CUDA_SHAPES = dict(hidden_size=256, intermediate_size=512, initializer_range=0.05)


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"family-cuda-{request.param}")
    model_dir = build_family_model(request.param, root / "model", tiny_tokenizer_dir(root / "tokenizer"),
                                   **CUDA_SHAPES)
    dirs = {"all-r8": make_random_adapter(model_dir, root / "all-r8", rank=8, seed=1, strength=0.5),
            "qkv-r4": make_random_adapter(model_dir, root / "qkv-r4", rank=4, seed=2, strength=0.5,
                                          target_modules=["q_proj", "k_proj", "v_proj"])}
    return request.param, model_dir, dirs


def engine(model_dir, dirs, **lora_kw) -> OfflineEngine:
    return OfflineEngine(model_dir, device=str(cuda_device()), dtype="float16", max_seq=256,
                         lora=LoRAConfig(pool_mb=16, max_rank=8, **lora_kw),
                         sidecar=SidecarConfig(workers=2, deadline_ms=5000.0), adapters=dirs)


@pytest.mark.parametrize("mode,kernel,link", [("cached", "mbgmv", "cuda"), ("pipeline", "bgmv", "cuda"),
                                              ("cpu-assist", "mbgmv", "emulated")])
def test_mixed_batch_matches_peft(family, mode, kernel, link):
    kind, model_dir, dirs = family
    kw = dict(link="emulated", link_bandwidth_mbps=0.001) if link == "emulated" else {}
    eng = engine(model_dir, dirs, mode=mode, decode_kernel=kernel, **kw)
    try:
        m = eng.model
        want_cos, want_sin = rotary_tables(m.config, m.head_dim_, 256, DTYPE, torch.device("cpu"))
        assert m._cos_cached.is_cuda and torch.equal(m._cos_cached.cpu(), want_cos)
        assert torch.equal(m._sin_cached.cpu(), want_sin)
        if kind == "qwen2":
            assert m.trans_layers_weight[0].kv_bias_.is_cuda
            assert m.pre_post_weight.lm_head_weight_.data_ptr() == m.pre_post_weight.wte_weight_.data_ptr()
        outs = eng.run(PROMPTS, NAMES, STEPS)
        torch.cuda.synchronize()
        if link == "emulated":
            assert eng.runtime.counters.get("sidecar_calls", 0) > 0
    finally:
        eng.close()
    atol, rtol = tolerance(DTYPE)
    for i, (prompt, name) in enumerate(zip(PROMPTS, NAMES)):
        logits = [outs[s][i].float().cpu() for s in range(STEPS + 1)]
        tokens = [int(x.argmax()) for x in logits[:STEPS]]
        ref = peft_logits(model_dir, dirs.get(name), prompt, tokens)
        for s in range(STEPS + 1):
            where = f"{kind} {mode} row {i} ({name}) step {s}"
            torch.testing.assert_close(logits[s], ref[s], atol=atol, rtol=rtol, msg=lambda m: f"{where}\n{m}")
