"""LightLLM's llama on the CPU, with the patches, against HF transformers on the same weights."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightllm_patches.layer_infer import LINEAR_SUFFIX
from lightllm_patches.offline import OfflineEngine
from tests.testing import assert_close

PROMPTS = [[101, 2045, 318, 257, 1332, 9], [4000, 17, 5], [7, 77, 777, 7777, 1234, 4321, 99, 512, 3]]
STEPS = 8


def hf_greedy_logits(model_dir, prompts, steps):
    """Per prompt: logits of the last position after the prompt and after each greedy token."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            rows = []
            for _ in range(steps + 1):
                logits = hf(torch.tensor([ids])).logits[0, -1]
                rows.append(logits)
                ids.append(int(logits.argmax()))
            out.append(rows)
    return out


@pytest.fixture(scope="module", params=["lightllm", "both"])
def engine(tiny_llama_dir, request):
    """Every test runs with LightLLM's weight layout and with nn.Linear copies for 2+ rows."""
    h = OfflineEngine(tiny_llama_dir, cpu_weight_layout=request.param)
    copies = [hasattr(w, "q_weight_" + LINEAR_SUFFIX) for w in h.model.trans_layers_weight]
    assert all(copies) if request.param == "both" else not any(copies)
    yield h
    h.close()


def test_prefill_and_decode_match_hf(engine, tiny_llama_dir):
    ours = engine.run(PROMPTS, steps=STEPS)
    ref = hf_greedy_logits(tiny_llama_dir, PROMPTS, STEPS)
    worst = 0.0
    for step in range(STEPS + 1):
        for i in range(len(PROMPTS)):
            worst = max(worst, (ours[step][i] - ref[i][step]).abs().max().item())
            assert_close(ours[step][i], ref[i][step], atol=1e-4, rtol=0, msg=f"step {step} prompt {i}")
    assert worst <= 1e-4


def test_gqa_config_is_exercised(tiny_llama_dir, engine):
    cfg = engine.model.config
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"], "the tiny model must use GQA"


def test_batches_are_independent(engine):
    """A prompt's logits do not depend on what else is in the batch."""
    alone = engine.run([PROMPTS[1]], steps=3)
    together = engine.run(PROMPTS, steps=3)
    for step in range(4):
        assert_close(together[step][1], alone[step][0], atol=1e-5, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("scaling", [{"type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}])
def test_model_preparation_and_the_instance_refuse_the_same_rope_scaling(tiny_llama_dir, tmp_path, scaling):
    """One validator: what model preparation accepts, the instance serves (dynamic NTK used to
    pass preparation and then fail at instance start)."""
    import json
    import shutil

    from caraserve_router.assets.model_prep import ModelDirError, validate_model_dir
    from caraserve_router.contracts.model_config import rope_scaling_problem

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["rope_scaling"] = scaling
    (model / "config.json").write_text(json.dumps(config))
    problem = rope_scaling_problem(config)
    assert problem and "rope_scaling" in problem
    with pytest.raises(ModelDirError) as prep:
        validate_model_dir(model, check_tokenizer=False)
    assert problem in str(prep.value)
    with pytest.raises(ValueError, match="rope_scaling"):
        OfflineEngine(model)
    assert rope_scaling_problem({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}) is None
