"""Llama 3.x, Qwen2 and Mistral on the patched llama path, against HF transformers.

Tiny random models of each family, written as their hub config.json looks (see
tests/fixtures/families.py): prefill and decode logits against transformers on the same
directory, and what each family brings (llama3 RoPE, q/k/v biases, tied embeddings and a
151,936-token vocabulary, sliding windows) checked where it lives.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from caraserve_router.contracts.model_families import UnsupportedModelError
from lightllm_patches.model_registry import model_class_for
from lightllm_patches.offline import OfflineEngine
from lightllm_patches.qwen2 import CaraQwen2Model
from lightllm_patches.rope import inverse_frequencies
from tests.fixtures.families import FAMILY_KINDS, build_family_model
from tests.testing import assert_close

PROMPTS = [list(range(300, 340)), [4000, 17, 5], [7, 77, 777, 7777, 1234, 4321, 99, 512]]
STEPS = 3
MAX_SEQ = 256


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("families")
    return {kind: build_family_model(kind, root / kind, default_model_dir) for kind in FAMILY_KINDS}


def hf_greedy(model_dir, prompts, steps):
    """Per prompt: the last position's logits after the prompt and after each greedy token."""
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids, rows = list(prompt), []
            for _ in range(steps + 1):
                rows.append(hf(torch.tensor([ids])).logits[0, -1])
                ids.append(int(rows[-1].argmax()))
            out.append(rows)
    return hf, out


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_prefill_and_decode_match_hf(family_dirs, kind):
    hf, ref = hf_greedy(family_dirs[kind], PROMPTS, STEPS)
    if kind == "llama3":  # the reference really applies Llama 3.1's scaling
        assert hf.config.rope_parameters["rope_type"] == "llama3"
    engine = OfflineEngine(family_dirs[kind], max_seq=MAX_SEQ)
    try:
        ours = engine.run(PROMPTS, steps=STEPS)
        model = engine.model
        # rotary tables sized to what the instance admits, not to 131,072 positions
        assert model._cos_cached.shape == (MAX_SEQ, model.head_dim_ // 2)
    finally:
        engine.close()
    for step in range(STEPS + 1):
        for i in range(len(PROMPTS)):
            assert_close(ours[step][i], ref[i][step], atol=1e-4, rtol=0, msg=f"{kind} step {step} prompt {i}")


def test_llama3_frequencies_match_transformers():
    """Llama-3.1-8B's real rope block (head_dim 128, original context 8192): our inverse
    frequencies are transformers' to the bit, and differ from the unscaled ones."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    raw = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0, "rope_scaling": scaling,
           "max_position_embeddings": 131072}
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**raw), "cpu")
    ours = inverse_frequencies(raw, 128)
    assert attention_factor == 1.0
    assert torch.equal(ours, theirs)
    plain = inverse_frequencies({"rope_theta": 500000.0}, 128)
    assert torch.equal(ours[:20], plain[:20]) and not torch.allclose(ours[-20:], plain[-20:])


def test_llama3_scaling_is_read_from_rope_parameters_too():
    """transformers 5 saves the scaling under rope_parameters (rope_scaling absent): same tables."""
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}  # Llama 3.2's
    hub = inverse_frequencies({"rope_theta": 500000.0, "rope_scaling": scaling}, 64)
    saved = inverse_frequencies({"rope_theta": 500000.0, "rope_scaling": None,
                                 "rope_parameters": dict(scaling, rope_theta=500000.0)}, 64)
    assert torch.equal(hub, saved)
    assert not torch.equal(hub, inverse_frequencies({"rope_theta": 500000.0}, 64))


def test_qwen2_biases_tied_embeddings_and_vocabulary(family_dirs):
    d = family_dirs["qwen2"]
    assert model_class_for(str(d)) is CaraQwen2Model
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # save_pretrained left it out (tied)
    engine = OfflineEngine(d, max_seq=MAX_SEQ)
    try:
        m = engine.model
        # one device copy for the tied embedding and lm_head
        assert m.pre_post_weight.lm_head_weight_.data_ptr() == m.pre_post_weight.wte_weight_.data_ptr()
        assert m.pre_post_weight.wte_weight_.shape[0] == 151936
        for w in m.trans_layers_weight:
            assert w.q_bias_.abs().sum() > 0 and w.kv_bias_.abs().sum() > 0
        logits = engine.run([[151000 % 49152, 3]], steps=0)[0]
        assert logits.shape == (1, 151936)
    finally:
        engine.close()


def _copy_with(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_sliding_window_is_served_only_when_it_never_slides(family_dirs, tmp_path):
    """Mistral v0.1's window: refused, naming it, when requests may outgrow it; served as full
    attention (identical to HF's windowed attention) when no request can."""
    d = _copy_with(family_dirs["mistral"], tmp_path / "windowed", sliding_window=128)
    with pytest.raises(UnsupportedModelError, match="sliding_window is 128 tokens"):
        OfflineEngine(d, max_seq=MAX_SEQ)
    engine = OfflineEngine(d, max_seq=128)
    try:
        ours = engine.run(PROMPTS[:1], steps=1)
    finally:
        engine.close()
    _, ref = hf_greedy(d, PROMPTS[:1], 1)
    for step in range(2):
        assert_close(ours[step][0], ref[0][step], atol=1e-4, rtol=0, msg=f"step {step}")


def test_unsupported_models_are_refused_by_name(family_dirs, tmp_path):
    moe = _copy_with(family_dirs["mistral"], tmp_path / "moe", model_type="mixtral", num_local_experts=8)
    with pytest.raises(UnsupportedModelError, match="'mixtral' is a mixture-of-experts"):
        model_class_for(str(moe))
    yarn = _copy_with(family_dirs["llama3"], tmp_path / "yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="'yarn' is not supported"):
        OfflineEngine(yarn, max_seq=MAX_SEQ)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_validator_accepts_the_hub_shaped_directories(family_dirs, kind):
    """What the server checks at start (`--model-dir`) accepts each family as the hub ships it."""
    from caraserve_router.assets.model_dir import validate_model_dir

    info = validate_model_dir(family_dirs[kind], max_context=4096)
    assert info.model_type == {"llama3": "llama"}.get(kind, kind)
    assert info.tokenizer_size == 49152 and info.chat_template
    assert info.vocab_size == {"llama3": 128256, "qwen2": 151936, "mistral": 49152}[kind]
    assert any("tied" in n for n in info.notes) == (kind == "qwen2")
