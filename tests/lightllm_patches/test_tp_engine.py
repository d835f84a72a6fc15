"""Tensor parallelism on the CPU (gloo, 2 ranks, the tiny GQA llama): LightLLM's own TP llama
with every adapter sharded (lora/tp_shard.py) gives TP=1's logits and PEFT's greedy tokens for
a mixed batch of adapters on all seven projections, in every LoRA mode; each rank holds only
its shard; a dead rank stops the engine instead of hanging its peers.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from caraserve_router.contracts.configs import LoRAConfig, SidecarConfig
from caraserve_router.lora.shapes import MODULE_SLOTS, ModelShapes
from caraserve_router.lora.tp_shard import ROW_PARALLEL
from lightllm_patches.offline import OfflineEngine
from lightllm_patches.tp_engine import TpOfflineEngine, TpRankError
from tests import fixtures
from tests.caraserve_router.lora.lora_harness import peft_logits
from tests.testing import assert_close

STEPS = 3
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23], [30, 31], [40, 41, 42]]
# cpu-assist: a link so slow that no layer lands during the run, so every LoRA term of the
# batch comes from each rank's sidecar
LINK_MBPS = {"cpu-assist": 0.001}


def lora_config(mode: str) -> LoRAConfig:
    return LoRAConfig(mode=mode, pool_mb=16, max_rank=8, link_bandwidth_mbps=LINK_MBPS.get(mode, 1e5))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Ranks 2 and 4 on all seven projections, an attention-only rank 6, one with rank_pattern."""
    root = tmp_path_factory.mktemp("tp-lora")
    model_dir, dirs = fixtures.tiny_llama_with_adapters(root, ranks=(2, 4))
    dirs.append(fixtures.make_tiny_adapter(model_dir, root / "attn-r6", rank=6, seed=11,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    dirs.append(fixtures.make_tiny_adapter(model_dir, root / "pattern-r4", rank=4, seed=12,
                                           rank_pattern={"model.layers.0.self_attn.q_proj": 7, "down_proj": 3}))
    names = [dirs[0].name, None, dirs[1].name, dirs[2].name, dirs[3].name]
    return model_dir, dirs, names


@pytest.fixture(scope="module")
def reference(adapters):
    """TP=1 logits per step and, per row, PEFT's logits along TP=1's greedy tokens (checked)."""
    model_dir, dirs, names = adapters
    engine = OfflineEngine(model_dir, lora=lora_config("cached"), sidecar=SidecarConfig(workers=1),
                           adapters={d.name: d for d in dirs})
    try:
        outs = engine.run(PROMPTS, names, STEPS)
    finally:
        engine.close()
    by_name = {d.name: d for d in dirs}
    tokens = []
    for i, (prompt, name) in enumerate(zip(PROMPTS, names)):
        row_tokens = [int(outs[s][i].argmax()) for s in range(STEPS)]
        ref = peft_logits(model_dir, by_name.get(name), prompt, row_tokens)
        for s in range(STEPS + 1):
            assert_close(outs[s][i], ref[s], msg=f"TP=1 vs PEFT: row {i} adapter {name} step {s}")
        if name is not None:  # the adapter moves the logits far beyond the tolerance: the check has teeth
            base = peft_logits(model_dir, None, prompt, row_tokens)
            assert min(float((ref[s] - base[s]).abs().max()) for s in range(STEPS + 1)) > 1e-2, name

        tokens.append(row_tokens + [int(ref[STEPS].argmax())])
    return outs, tokens


@pytest.fixture(scope="module")
def tp2(adapters):
    model_dir, dirs, _ = adapters
    engine = TpOfflineEngine(model_dir, tp=2, lora=lora_config("cached"), sidecar=SidecarConfig(workers=1),
                             adapters={d.name: d for d in dirs})
    yield engine
    engine.close()


@pytest.mark.parametrize("mode", ["cached", "on-demand", "pipeline", "cpu-assist"])
def test_tp2_gives_tp1_logits_and_peft_tokens(adapters, reference, tp2, mode):
    model_dir, dirs, names = adapters
    ref_logits, peft_tokens = reference
    tp2.reopen(lora=lora_config(mode))
    outs = tp2.run(PROMPTS, names, STEPS)
    for s in range(STEPS + 1):
        assert_close(outs[s], ref_logits[s], msg=f"{mode}: TP=2 vs TP=1 step {s}")
    for i, name in enumerate(names):
        assert [int(outs[s][i].argmax()) for s in range(STEPS + 1)] == peft_tokens[i], f"{mode}: row {i} {name}"
    counters = [stats["counters"] for stats in tp2.call("stats")]
    if mode == "cpu-assist":  # both ranks computed their shard's delta on their own sidecar
        assert all(c.get("sidecar_calls", 0) > 0 and c.get("sidecar_fallbacks", 0) == 0 for c in counters), counters
    else:
        assert all(c.get("sidecar_calls", 0) == 0 for c in counters), counters


def expected_rank_bytes(shapes: ModelShapes, tp: int, ranks: dict, itemsize: int = 4) -> int:
    """A rank's bytes of an adapter whose module m has rank ranks[m] on every layer (independent
    of the store's layout: the sharding rule applied to each module's two tensors)."""
    total = 0
    for module, r in ranks.items():
        in_f, out_f = shapes.module_shape(module)
        total += r * ((in_f // tp + out_f) if module in ROW_PARALLEL else (in_f + out_f // tp))
    return total * shapes.num_layers * itemsize


def test_each_rank_holds_only_its_shard(adapters, tp2):
    """Host segment and device pool bytes per rank: the sliced halves split in two, the other
    halves replicated; together the two ranks hold each sliced half exactly once."""
    model_dir, dirs, _ = adapters
    tp2.reopen(lora=lora_config("cached"))
    shapes = ModelShapes.from_model_dir(str(model_dir))
    for d, rank in ((dirs[0], 2), (dirs[1], 4), (dirs[2], 6)):
        modules = list(MODULE_SLOTS) if rank != 6 else ["q_proj", "k_proj", "v_proj", "o_proj"]
        ranks = {m: rank for m in modules}
        per_rank = tp2.call("shard_bytes", d.name)
        whole = expected_rank_bytes(shapes, 1, ranks)
        want = expected_rank_bytes(shapes, 2, ranks)
        assert per_rank == [(want, want), (want, want)], (d.name, per_rank, want)
        replicated = sum(r * (shapes.module_shape(m)[1] if m in ROW_PARALLEL else shapes.module_shape(m)[0])
                         for m, r in ranks.items()) * shapes.num_layers * 4
        assert 2 * (want - replicated) == whole - replicated  # the sliced halves: once over both ranks
        assert want < whole


def test_a_dead_rank_stops_the_engine(adapters, tp2):
    """SIGKILL one rank between steps: the next call fails at once with TpRankError (its peer
    would otherwise wait in gloo's all-reduce) and no rank process is left. (Last: it ends the
    module's engine.)"""
    _, dirs, _ = adapters
    tp2.reopen(lora=lora_config("cached"))
    pids = tp2.pids
    tp2.run(PROMPTS[:1], [dirs[0].name], 1)
    os.kill(pids[1], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(TpRankError, match="rank 1"):
        tp2.run(PROMPTS[:1], [dirs[0].name], 1)
    assert time.monotonic() - started < 30
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(TpRankError, match="stopped"):
        tp2.run(PROMPTS[:1], [dirs[0].name], 1)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(tp2.shm_prefix)], "a killed rank's shm is removed"
