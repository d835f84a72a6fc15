"""Drive `CaraLlamaModel` (LightLLM's llama with the patches) directly, without servers.

The harness plays the part of LightLLM's backend for a fixed batch: it allocates request
slots, runs one prefill over all prompts, then decode steps that feed each row's greedy (or
given) token back, and returns the logits of every step.
"""
from __future__ import annotations

import uuid

import torch

import lightllm_patches  # noqa: F401
from lightllm_patches.model import CaraLlamaModel
from lightllm_patches.processes import remove_shm


class EngineHarness:
    def __init__(self, model_dir, device="cpu", max_total_tokens=4096, max_seq=512, max_req=32):
        self.shm_prefix = f"caraserve_test_{uuid.uuid4().hex[:8]}"
        self.model = CaraLlamaModel({
            "tp_rank": 0, "world_size": 1, "weight_dir": str(model_dir), "max_total_token_num": max_total_tokens,
            "load_way": "HF", "mode": [], "max_req_num": max_req, "max_seq_length": max_seq,
            "data_type": "float32", "device": torch.device(device), "shm_prefix": self.shm_prefix,
        })

    def close(self) -> None:
        self.model.mem_manager.shared_can_use_token_num.shm.close()
        remove_shm(self.shm_prefix)

    def run(self, prompts: list[list[int]], steps: int, lora_for_step=None) -> list[torch.Tensor]:
        """Logits [batch, vocab] of the prefill and of `steps` greedy decode steps.

        `lora_for_step(kwargs)` may return the step's LoraBatch.
        """
        m = self.model
        batch = len(prompts)
        req_idx = m.req_manager.alloc(batch).int()
        seq_len = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        start_loc = torch.cumsum(seq_len, 0, dtype=torch.int32) - seq_len
        kwargs = dict(batch_size=batch, total_token_num=int(seq_len.sum()), max_len_in_batch=int(seq_len.max()),
                      input_ids=torch.tensor(sum(prompts, [])), b_req_idx=req_idx, b_start_loc=start_loc,
                      b_seq_len=seq_len, b_ready_cache_len=torch.zeros_like(seq_len), is_prefill=True)
        out = [self._forward(kwargs, lora_for_step)]
        for _ in range(steps):
            token = out[-1].argmax(-1)
            seq_len = seq_len + 1
            start_loc = torch.cumsum(seq_len, 0, dtype=torch.int32) - seq_len
            kwargs = dict(batch_size=batch, total_token_num=int(seq_len.sum()), max_len_in_batch=int(seq_len.max()),
                          input_ids=token, b_req_idx=req_idx, b_start_loc=start_loc, b_seq_len=seq_len,
                          is_prefill=False)
            out.append(self._forward(kwargs, lora_for_step))
        self._free(req_idx, seq_len)
        return out

    def _forward(self, kwargs, lora_for_step):
        lora = lora_for_step(kwargs) if lora_for_step else None
        return self.model.forward(**kwargs, lora=lora).clone()

    def _free(self, req_idx, seq_len) -> None:
        m = self.model
        tokens = [m.req_manager.req_to_token_indexs[r, :n] for r, n in zip(req_idx.tolist(), seq_len.tolist())]
        m.req_manager.free(req_idx.tolist(), torch.cat(tokens))
