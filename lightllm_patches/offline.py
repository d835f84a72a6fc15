"""Offline engine API: LightLLM's llama with the patches and a LoraRuntime, without servers.

For tests (per-step logits against HF + PEFT) and benchmarks (engine throughput). It plays the
backend's part for one fixed batch: allocate request slots, one prefill over all prompts, then
greedy decode steps, returning the logits of every step.

    engine = OfflineEngine(model_dir, lora=LoRAConfig(mode="cached"), adapters={"a": "/path/a"})
    logits = engine.run([[1, 2, 3], [4, 5]], ["a", None], steps=8)   # list of [batch, vocab]
    engine.close()
"""
from __future__ import annotations

import os
import types
import uuid
from typing import Optional

import torch

from caraserve_router.contracts.adapters import AdapterRequest
from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig
from caraserve_router.lora.runtime import LoraRuntime
from lightllm_patches.cuda_graph import decode_graphs_for
from lightllm_patches.model_registry import model_class_for
from caraserve_router.contracts.processes import remove_shm


class OfflineEngine:
    def __init__(self, model_dir, *, device: str = "cpu", lora: Optional[LoRAConfig] = None,
                 sidecar: Optional[SidecarConfig] = None, adapters: Optional[dict] = None,
                 max_total_tokens: int = 8192, max_seq: int = 1024, max_req: int = 64,
                 cpu_weight_layout: str = "lightllm", shm_prefix: str = "caraserve_offline",
                 dtype: str = "float32", model_class: Optional[type] = None, cuda_graphs: bool = False,
                 tp_rank: int = 0, world_size: int = 1):
        # model_class: None for the model family's class (model_registry), or a subclass of it
        # (scripts/bench/gpu.py builds random weights on the device instead of reading safetensors).
        # tp_rank / world_size: one rank of a tensor-parallel engine (lightllm_patches.tp_engine
        # starts the ranks and the process group).
        model_class = model_class or model_class_for(str(model_dir))
        self.shm_prefix = f"{shm_prefix}_{uuid.uuid4().hex[:8]}"  # unique per engine (and rank)
        self.model = model_class({
            "tp_rank": tp_rank, "world_size": world_size, "weight_dir": str(model_dir),
            "max_total_token_num": max_total_tokens,

            "load_way": "HF", "mode": [], "max_req_num": max_req, "max_seq_length": max_seq,
            "data_type": dtype, "device": torch.device(device), "shm_prefix": self.shm_prefix,
            "cpu_weight_layout": cpu_weight_layout,
        })
        # cuda_graphs: decode steps through DecodeGraphRunner (captured on CUDA, direct calls on
        # the CPU) for batches of up to max_req - 8 rows (8 request slots stay spare, as the backend's)
        config = InstanceConfig(model_dir=str(model_dir), shm_prefix=self.shm_prefix, max_req_total_len=max_seq,
                                running_max_req_size=max(1, max_req - 8), cuda_graphs=cuda_graphs,
                                graph_emulation=cuda_graphs,
                                lora=lora or LoRAConfig(mode="cached"), sidecar=sidecar or SidecarConfig(workers=1))
        self.runtime = LoraRuntime(config, self.model)
        for name, path in (adapters or {}).items():
            self.runtime.add(name, os.path.abspath(str(path)))
        self.graphs = decode_graphs_for(config, self.model, self.runtime)
        self._next_id = 0

    def close(self) -> None:
        self.runtime.shutdown()
        self.model.mem_manager.shared_can_use_token_num.shm.close()
        remove_shm(self.shm_prefix)

    def run(self, prompts: list[list[int]], adapters: Optional[list] = None, steps: int = 0,
            on_step=None) -> list[torch.Tensor]:
        """Logits [batch, vocab] of the prefill and of `steps` greedy decode steps.

        `adapters[i]` names row i's adapter (None: base model). `on_step(kind, seconds)` is
        called after every step (for timing).
        """
        adapters = adapters or [None] * len(prompts)
        self.runtime.begin_admission()
        reqs = [self._attach(name) for name in adapters]
        m = self.model
        batch = len(prompts)
        req_idx = m.req_manager.alloc(batch).int()
        # every step input on the model's device (LightLLM's Triton kernels read them there)
        seq_len = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=m.device)
        kwargs = dict(batch_size=batch, total_token_num=int(seq_len.sum()), max_len_in_batch=int(seq_len.max()),
                      input_ids=torch.tensor(sum(prompts, []), device=m.device), b_req_idx=req_idx,
                      b_start_loc=self._starts(seq_len),
                      b_seq_len=seq_len, b_ready_cache_len=torch.zeros_like(seq_len), is_prefill=True)
        try:
            out = [self._step(kwargs, reqs, on_step)]
            for _ in range(steps):
                seq_len = seq_len + 1
                kwargs = dict(batch_size=batch, total_token_num=int(seq_len.sum()),
                              max_len_in_batch=int(seq_len.max()), input_ids=out[-1].argmax(-1), b_req_idx=req_idx,
                              b_start_loc=self._starts(seq_len), b_seq_len=seq_len, is_prefill=False)
                out.append(self._step(kwargs, reqs, on_step))
        finally:
            tokens = [m.req_manager.req_to_token_indexs[r, :n] for r, n in zip(req_idx.tolist(), seq_len.tolist())]
            m.req_manager.free(req_idx.tolist(), torch.cat(tokens))
            for r in reqs:
                self.runtime.detach_request(r.r_id)
        return out

    @staticmethod
    def _starts(seq_len: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(seq_len, 0, dtype=torch.int32) - seq_len

    def _attach(self, name):
        self._next_id += 1
        # attach_request reads the file and places the adapter itself (there is no serving loop
        # here to wait in); an adapter that does not fit is an AdapterError (503)
        self.runtime.attach_request(self._next_id, AdapterRequest(name) if name is not None else None)
        return types.SimpleNamespace(r_id=self._next_id)

    def _step(self, kwargs, reqs, on_step):
        import time

        start = time.perf_counter()
        lora = self.runtime.build_batch(reqs, kwargs)
        try:
            logits = self.graphs.run(kwargs, lora) if self.graphs is not None else None
            logits = (logits if logits is not None else self.model.forward(**kwargs, lora=lora)).clone()
        finally:
            self.runtime.after_forward(lora)
        if on_step is not None:
            on_step("prefill" if kwargs["is_prefill"] else "decode", time.perf_counter() - start)
        return logits
