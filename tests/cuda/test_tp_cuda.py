"""Tensor parallelism on two GPUs (NCCL): LightLLM's TP llama with sharded adapters gives PEFT's
logits (fp16 tolerance) and greedy tokens for a mixed batch, in every LoRA mode, and TP=1's
logits on one GPU. Skips unless two CUDA devices are present. NOT RUN YET (no 2-GPU host so far).
"""
from __future__ import annotations

import pytest
import torch

from caraserve_router.contracts.configs import LoRAConfig, SidecarConfig
from lightllm_patches.tp_engine import TpOfflineEngine
from tests.cuda.common import CUDA_TESTS
from tests.cuda.test_engine_cuda import DTYPE, NAMES, PROMPTS, STEPS, check_against_peft, engine, tiny  # noqa: F401
from tests.testing import tolerance

pytestmark = CUDA_TESTS + [pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


@pytest.mark.parametrize("mode", ["cached", "on-demand", "pipeline", "cpu-assist"])
def test_tp2_matches_peft_and_tp1(tiny, mode):  # noqa: F811
    model_dir, dirs = tiny
    lora = LoRAConfig(mode=mode, pool_mb=16, max_rank=32)
    tp2 = TpOfflineEngine(model_dir, tp=2, device="cuda", dtype="float16", lora=lora,
                          sidecar=SidecarConfig(workers=2, deadline_ms=5000.0), adapters=dirs)
    try:
        outs = tp2.run(PROMPTS, NAMES, STEPS)
        per_rank = [s["link"] for s in tp2.call("stats")]
        assert per_rank == ["cuda", "cuda"]
    finally:
        tp2.close()
    check_against_peft(model_dir, dirs, NAMES, outs)
    one = engine(model_dir, dirs, mode=mode)
    try:
        ref = one.run(PROMPTS, NAMES, STEPS)
    finally:
        one.close()
    atol, rtol = tolerance(DTYPE)
    for s in range(STEPS + 1):
        torch.testing.assert_close(outs[s].float().cpu(), ref[s].float().cpu(), atol=2 * atol, rtol=2 * rtol)
