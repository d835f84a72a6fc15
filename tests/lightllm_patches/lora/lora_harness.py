"""An engine with a LoraRuntime, driven without servers, and its PEFT reference."""
from __future__ import annotations

import types

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lightllm_patches.configs import InstanceConfig, LoRAConfig, SidecarConfig
from lightllm_patches.lora.runtime import LoraRuntime
from tests.lightllm_patches.engine_harness import EngineHarness


class LoraEngine:
    """EngineHarness + LoraRuntime; `run(prompts, adapters, steps)` -> logits per step."""

    def __init__(self, model_dir, adapter_dirs, **lora_kw):
        self.harness = EngineHarness(model_dir)
        lora_kw.setdefault("link_bandwidth_mbps", 1e5)
        config = InstanceConfig(model_dir=str(model_dir), shm_prefix=self.harness.shm_prefix,
                                lora=LoRAConfig(**lora_kw), sidecar=SidecarConfig(workers=1))
        self.runtime = LoraRuntime(config, self.harness.model)
        for path in adapter_dirs:
            self.runtime.register(path.name, str(path))
        self._next_id = 0

    def run(self, prompts, adapter_names, steps):
        reqs = []
        for name in adapter_names:
            self._next_id += 1
            if name is not None:
                assert self.runtime.admit(name)
            self.runtime.attach_request(self._next_id, name)
            reqs.append(types.SimpleNamespace(r_id=self._next_id))
        try:
            return self.harness.run(prompts, steps, lora_for_step=lambda kw: self.runtime.build_batch(reqs, kw))
        finally:
            for r in reqs:
                self.runtime.detach_request(r.r_id)

    def close(self):
        self.runtime.shutdown()
        self.harness.close()


def peft_logits(model_dir, adapter_dir, prompt, tokens):
    """Logits of the last position after `prompt` and after each of `tokens` (teacher-forced)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for step in range(len(tokens) + 1):
            out.append(model(torch.tensor([ids])).logits[0, -1])
            if step < len(tokens):
                ids.append(tokens[step])
    return out
