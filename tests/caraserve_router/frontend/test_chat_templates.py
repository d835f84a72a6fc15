"""The front end renders chats with each family's own template (`FrontEnd.chat_ids`), and a
template that refuses the messages (Mistral's, for a system turn) is the client's error."""
from __future__ import annotations

import types

import pytest
from transformers import AutoTokenizer

from caraserve_router.frontend.service import FrontEnd
from tests.fixtures.families import CHAT_TEMPLATES, FAMILY_KINDS

MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
# What each family's template must produce for MESSAGES (the hub templates' output).
EXPECTED = {
    "llama3": "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nAnd 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
             "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "<|im_start|>[INST] What is 2+2?[/INST] 4<|im_end|>[INST] And 3+3?[/INST]",
}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_chat_ids_use_the_family_template(tokenizer, kind):
    tokenizer.chat_template = CHAT_TEMPLATES[kind]
    front = types.SimpleNamespace(tokenizer=tokenizer)  # chat_ids needs only the tokenizer
    ids = FrontEnd.chat_ids(front, MESSAGES)
    assert ids == tokenizer.encode(EXPECTED[kind], add_special_tokens=False)


def test_a_refusing_template_is_a_value_error(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["mistral"]
    front = types.SimpleNamespace(tokenizer=tokenizer)
    with pytest.raises(ValueError, match="chat template refuses these messages: Only user and assistant"):
        FrontEnd.chat_ids(front, [{"role": "system", "content": "Be brief."}] + MESSAGES)
