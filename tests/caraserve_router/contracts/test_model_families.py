"""The model-family registry's refusals, on config dicts (pure Python, no model)."""
from __future__ import annotations

import pytest

from caraserve_router.contracts.model_families import (FAMILIES, ModelFamily, UnsupportedModelError,
                                                       config_problems, family_of)
from tests.fixtures.families import FAMILY_KINDS, hub_config


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_the_hub_configs_have_no_problem(kind):
    cfg = hub_config(kind)
    assert config_problems(cfg, max_context=3072) == []
    assert family_of(cfg) is FAMILIES[cfg["model_type"]]


def test_qwen2_window_slides_only_when_enabled_and_reached():
    cfg = hub_config("qwen2", sliding_window=1024)  # use_sliding_window false: no window
    assert FAMILIES["qwen2"].sliding_window(cfg) is None
    cfg.update(use_sliding_window=True, max_window_layers=2)  # = num_hidden_layers: no layer slides
    assert FAMILIES["qwen2"].sliding_window(cfg) is None and config_problems(cfg, 3072) == []
    cfg["max_window_layers"] = 1  # layer 1 slides
    assert FAMILIES["qwen2"].sliding_window(cfg) == 1024
    (problem,) = config_problems(cfg, 3072)
    assert "sliding_window is 1024 tokens, shorter than the context served (3072 tokens)" in problem
    assert "--max-req-total-len 1024" in problem
    assert config_problems(cfg, 1024) == []  # never slides within the context


def test_mistral_v01_window_against_the_context():
    cfg = hub_config("mistral", sliding_window=4096)
    assert config_problems(cfg, max_context=3072) == []  # the default --max-req-total-len
    assert "sliding_window is 4096" in config_problems(cfg, max_context=8192)[0]
    assert "sliding_window is 4096" in config_problems(cfg)[0]  # default: max_position_embeddings 32768


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma2"), "model_type is 'gemma2'"),
    (dict(model_type="qwen2_moe"), "'qwen2_moe' is a mixture-of-experts"),
    (dict(num_experts=60), "num_experts: a mixture-of-experts"),
    (dict(attention_bias=True), "attention_bias is true"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
     "needs positive high_freq_factor, original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192}), "must exceed low_freq_factor"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 4.0}), "'longrope' is not supported"),
])
def test_llama_refusals_name_the_problem(change, message):
    problems = config_problems(hub_config("llama3", **change), max_context=3072)
    assert len(problems) == 1 and message in problems[0], problems


def test_unknown_type_raises_from_family_of():
    with pytest.raises(UnsupportedModelError, match="CaraServe serves 'llama', 'qwen2', 'mistral'"):
        family_of({"model_type": "phi3"})
    assert {s.family for s in FAMILIES.values()} == set(ModelFamily)
