"""The model worker: LightLLM's continuous-batching backend with CaraServe's model and LoRA.

| ours | upstream | why |
|---|---|---|
| `CaraBackend.init_model` | `ModeBackend.init_model` | builds the model family's class (`model_registry.model_class_for`) on the configured device (upstream: nccl + `torch.cuda.set_device`, a model-type if/elif over 20 models) and the instance's `LoraRuntime`; with tp > 1 it joins the ranks' group first (`tp_group.join_group`: NCCL on GPU k, gloo on the CPU). |
| `CaraBackend.add_batch` | `ModeBackend.add_batch` | takes the `AdapterRequest` and seed out of each request (LightLLM's `InferSamplingParams` rejects unknown keys) and attaches the adapter; upstream calls `torch.cuda.current_device()`. |
| `CaraBackend.forward` | `ContinuesBatchBackend.forward` | inputs on the device, the step's `LoraBatch`, the seedable sampler; a pure decode step replays a CUDA graph when it can (`cuda_graph.DecodeGraphRunner`, `--cuda-graphs`). With `--prefill-chunk-tokens` a decode step that has prompts still to prefill runs as a mixed step (`_forward_mixed`, chunked prefill; replaces `SplitFuseBackend.decode_batch`, which is CUDA-bound and gives every prefilling request a whole block per step). |
| `CaraBackend.filter_batch` / `remove_batch` | `ModeBackend.*` | release per-request state (generator, adapter reference) of finished requests. |
| `CaraModelRpcServer` / `CaraModelRpcClient` | `ModelRpcServer` / `ModelRpcClient` | select `CaraBackend`; give the router the worker's `LoraRuntime` (`client.lora`, an `AdapterManager`). |
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Optional

import numpy as np
import torch

from lightllm.server.io_struct import ReqRunStatus
from lightllm.server.router.model_infer.infer_batch import InferBatch, InferReq, requests_mapping
from lightllm.server.router.model_infer.mode_backend.continues_batch.impl import ContinuesBatchBackend
from lightllm.server.router.model_infer.model_rpc import ModelRpcClient, ModelRpcServer

from caraserve_router.contracts.configs import InstanceConfig
from lightllm_patches import chunked_prefill
from lightllm_patches.cuda_graph import decode_graphs_for
from lightllm_patches.device import resolve_device, resolve_dtype
from caraserve_router.lora.runtime import LoraRuntime
from lightllm_patches.model_registry import model_class_for
from lightllm_patches.sampling import make_generator, sample, split_extra
from lightllm_patches.tp_group import join_group


log = logging.getLogger("caraserve.backend")


def _device_tensor(values, dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def prepare_prefill_inputs(batch: InferBatch, device: torch.device):
    """Upstream `prepare_prefill_inputs` with tensors on `device` (and no prompt cache)."""
    reqs, input_ids, start_loc, seq_len, req_idx = [], [], [], [], []
    start = 0
    for request_id in batch.request_ids:
        req: InferReq = requests_mapping[request_id]
        assert req.req_status == ReqRunStatus.RUNNING
        reqs.append(req)
        new_ids = req.input_token_ids[req.cur_kv_len :]
        input_ids.append(np.asarray(new_ids, dtype=np.int64))
        start_loc.append(start)
        seq_len.append(len(req.input_token_ids))
        req_idx.append(req.req_idx)
        start += len(new_ids)
    kwargs = {
        "batch_size": len(reqs),
        "total_token_num": sum(seq_len),
        "max_len_in_batch": max(len(x) for x in input_ids),
        "input_ids": torch.from_numpy(np.concatenate(input_ids)).to(device),
        "b_req_idx": _device_tensor(req_idx, torch.int32, device),
        "b_start_loc": _device_tensor(start_loc, torch.int32, device),
        "b_seq_len": _device_tensor(seq_len, torch.int32, device),
        "b_ready_cache_len": _device_tensor([r.cur_kv_len for r in reqs], torch.int32, device),
        "is_prefill": True,
    }
    return kwargs, reqs


def prepare_decode_inputs(batch: InferBatch, device: torch.device):
    """Upstream `prepare_decode_inputs` with tensors on `device`."""
    reqs, input_ids, start_loc, seq_len, req_idx = [], [], [], [], []
    start = 0
    for request_id in batch.request_ids:
        req: InferReq = requests_mapping[request_id]
        assert req.req_status == ReqRunStatus.RUNNING
        assert req.cur_kv_len == len(req.input_token_ids) - 1
        reqs.append(req)
        input_ids.append(req.input_token_ids[-1])
        start_loc.append(start)
        seq_len.append(len(req.input_token_ids))
        req_idx.append(req.req_idx)
        start += seq_len[-1]
    kwargs = {
        "batch_size": len(reqs),
        "total_token_num": sum(seq_len),
        "max_len_in_batch": max(seq_len),
        "input_ids": _device_tensor(input_ids, torch.int64, device),
        "b_req_idx": _device_tensor(req_idx, torch.int32, device),
        "b_start_loc": _device_tensor(start_loc, torch.int32, device),
        "b_seq_len": _device_tensor(seq_len, torch.int32, device),
        "is_prefill": False,
    }
    return kwargs, reqs


def split_cpu_cores(config: InstanceConfig, device: torch.device) -> None:
    """When the CPU is the device *and* hosts the cpu-assist sidecar, give each its own cores
    (half each by default): spinning sidecar workers and torch's thread team on the same cores
    slow both down badly. Explicit settings are kept."""
    if device.type != "cpu" or not config.lora.mode.uses_sidecar:
        return
    cores = len(os.sched_getaffinity(0))
    if config.sidecar.workers == 0:
        config.sidecar.workers = max(1, cores // 2)
    if config.torch_threads == 0:
        config.torch_threads = max(1, cores - config.sidecar.workers)
    log.info("CPU device with cpu-assist: %d torch threads, %d sidecar workers", config.torch_threads,
             config.sidecar.workers)


class CaraBackend(ContinuesBatchBackend):
    def init_model(self, kvargs):
        config: InstanceConfig = kvargs["cara_config"]
        self.config = config
        # tp > 1: this is rank tp_rank of an instance's ranks (lightllm_patches/tp_ranks.py)
        self.tp_rank, self.world_size = kvargs.get("tp_rank", 0), kvargs.get("world_size", 1)
        self.is_multimodal = False
        # Upstream's SplitFuseBackend is never used: with `config.chunked_prefill` this backend
        # plans the mixed steps itself (forward), so its inherited splitfuse switch stays off.
        self.is_splitfuse_mode = False
        self.return_all_prompt_logprobs = False
        self.use_dynamic_prompt_cache = False
        self.radix_cache = None
        self.cache = {}
        self.logger = log
        self.eos_id = kvargs["eos_id"]
        self.device = resolve_device(config.device)
        if self.world_size > 1:
            self.device = join_group(self.device, self.tp_rank, self.world_size, kvargs["dist_port"])
        split_cpu_cores(config, self.device)
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        dtype = resolve_dtype(config.dtype, self.device)
        self.model = model_class_for(config.model_dir)({
            "tp_rank": self.tp_rank,
            "world_size": self.world_size,
            "weight_dir": config.model_dir,
            "max_total_token_num": config.max_total_token_num,
            "load_way": "HF",
            "mode": [],
            "max_req_num": config.running_max_req_size + 8,
            "max_seq_length": config.max_req_total_len + 8,
            "max_context": config.max_req_total_len,
            "data_type": {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype],
            "device": self.device,
            "shm_prefix": kvargs["shm_prefix"],
            "cpu_weight_layout": config.cpu_weight_layout,
        })
        self.generators: dict[int, torch.Generator] = {}
        self.lora = LoraRuntime(config, self.model)
        self.graphs = decode_graphs_for(config, self.model, self.lora)  # None: every step eager
        # Step timings for profiling (scripts/profile_instance.py reads them through /step_samples).
        self.step_samples = collections.deque(maxlen=8192)
        log.info("model ready on %s (%s), LoRA mode %s", self.device, dtype, config.lora.mode)

    def add_batch(self, batch_id, reqs):
        for r in reqs:
            extra = split_extra(r["sampling_param"])
            r_id = r["request_id"]
            if r_id in requests_mapping:
                continue  # a paused request coming back keeps its state
            self.lora.attach_request(r_id, extra["adapter"])
            if r["sampling_param"].get("top_k", -1) != 1:
                self.generators[r_id] = make_generator(extra["seed"], self.device)
        batch = InferBatch.init_batch(
            batch_id, reqs, self.model.data_type, self.device, self.model.req_manager,
            self.model.vocab_size, self.radix_cache,
        )
        self.cache[batch_id] = batch
        ans = {}
        for req_id in batch.request_ids:
            req: InferReq = requests_mapping[req_id]
            ans[req_id] = (req.req_status, req.cur_kv_len, req.get_output_len(), [], req.finish_status.value, None)
        return ans

    def forward(self, batch_id, is_prefill):
        if not is_prefill and self.config.chunked_prefill:
            reqs = [requests_mapping[r_id] for r_id in self.cache[batch_id].request_ids]
            plan = chunked_prefill.plan_step(reqs, self.config.prefill_chunk_tokens)
            if plan.has_prefill:
                return self._forward_mixed(batch_id, reqs, plan)
        batch: InferBatch = self.cache.pop(batch_id)
        graphs = self.graphs is not None and not is_prefill
        prepare = prepare_prefill_inputs if is_prefill else prepare_decode_inputs
        # a graph step copies its inputs from the host itself (one staging copy, no wait)
        kwargs, reqs = prepare(batch, torch.device("cpu") if graphs else self.device)
        start = time.perf_counter()
        lora_batch = self.lora.build_batch(reqs, kwargs)
        try:
            logits = self.graphs.run(kwargs, lora_batch) if graphs else None
            if logits is None:  # prefill, a batch above the largest bucket, an adapter loading
                if graphs:
                    kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                logits = self.model.forward(**kwargs, lora=lora_batch)
        finally:
            self.lora.after_forward(lora_batch)
        next_ids, next_probs = sample(logits, reqs, self.eos_id, self.generators)
        self._record_step("prefill" if is_prefill else "decode", reqs, kwargs, start)
        output = {}
        self._emit(reqs, next_ids, next_probs, output)
        self.cache[batch.batch_id] = batch
        return output

    def _emit(self, reqs, next_ids, next_probs, output: dict) -> None:
        """Append each request's sampled token and report its new state."""
        for req, token, prob in zip(reqs, next_ids, next_probs):
            req.cur_kv_len = len(req.input_token_ids)
            req.input_token_ids.append(token)
            req.out_token_id_count[token] += 1
            req.update_finish_status(self.eos_id)
            metadata = {"id": int(token), "logprob": float(np.log(max(prob, 1e-45)))}
            output[req.r_id] = (
                req.req_status, req.cur_kv_len, req.get_output_len(), [(int(token), metadata)],
                req.finish_status.value, None,
            )

    def _forward_mixed(self, batch_id, reqs, plan: "chunked_prefill.StepPlan"):
        """One chunked-prefill step: decode rows and at most `prefill_chunk_tokens` prompt
        tokens; only rows that reach the end of their tokens sample. Every request of the batch
        gets a status (the router recomputes the batch's KV need from them)."""
        batch: InferBatch = self.cache.pop(batch_id)
        rows = plan.rows
        kwargs = chunked_prefill.step_inputs(plan, self.device)
        start = time.perf_counter()
        lora_batch = self.lora.build_batch([r.req for r in rows], chunked_prefill.lora_view(plan))
        try:
            logits = self.model.forward_mixed(**kwargs, lora=lora_batch)  # [samples, vocab]
        finally:
            self.lora.after_forward(lora_batch)
        sampling = [r.req for r in rows if r.samples]
        next_ids, next_probs = sample(logits, sampling, self.eos_id, self.generators) if sampling else ([], [])
        # A step that is exactly an unchunked prefill keeps that name (the profiler fits those).
        whole = not plan.decode and all(r.start == 0 and r.samples for r in plan.chunks)
        self._record_step("prefill" if whole else "mixed", [r.req for r in rows], kwargs, start)
        output = {}
        for row in rows:
            if not row.samples:
                row.req.cur_kv_len = row.start + row.length  # the chunk's KV is cached; no token yet
        for req in plan.waiting + [r.req for r in rows if not r.samples]:
            output[req.r_id] = (req.req_status, req.cur_kv_len, req.get_output_len(), [], req.finish_status.value,
                                None)
        self._emit(sampling, next_ids, next_probs, output)
        self.cache[batch.batch_id] = batch
        return output

    def _record_step(self, kind: str, reqs, kwargs, start) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the instance's GPU, not whichever is current
        self.step_samples.append({
            "kind": kind,
            "batch": len(reqs),
            "tokens": int(kwargs["input_ids"].shape[0]),
            "ranks": [self.lora.request_rank(r.r_id) for r in reqs],
            "kernel": self.config.lora.decode_kernel,
            "ms": (time.perf_counter() - start) * 1000.0,
            "t": time.time(),
        })

    def samples(self, clear: bool = False) -> list:
        out = list(self.step_samples)
        if clear:
            self.step_samples.clear()
        return out

    def _release(self, request_ids) -> None:
        for r_id in request_ids:
            self.generators.pop(r_id, None)
            self.lora.detach_request(r_id)

    def filter_batch(self, batch_id, req_id_list, finished_req_id_list):
        super().filter_batch(batch_id, req_id_list, finished_req_id_list)
        self._release(finished_req_id_list)

    def remove_batch(self, batch_id):
        request_ids = list(self.cache[batch_id].request_ids)
        super().remove_batch(batch_id)
        self._release(request_ids)

    def purge(self, batch_id, request_ids) -> None:
        """Forget a batch whose step failed, whatever state it reached (router recovery)."""
        if batch_id in self.cache:
            self.remove_batch(batch_id)
            return
        for r_id in request_ids:  # add_batch failed part way: free what it had taken
            req = requests_mapping.pop(r_id, None)
            if req is None:
                continue
            tokens = self.model.req_manager.req_to_token_indexs[req.req_idx][: req.cur_kv_len]
            self.model.req_manager.free([req.req_idx], tokens)
        self._release(request_ids)

    def shutdown(self) -> None:
        self.lora.shutdown()


class CaraModelRpcServer(ModelRpcServer):
    """Overrides `ModelRpcServer.exposed_init_model` to always use `CaraBackend`."""

    def exposed_init_model(self, kvargs):
        self.world_size = 1
        self.backend = CaraBackend()
        self.backend.init_model(kvargs)


class CaraModelRpcClient(ModelRpcClient):
    """Upstream's client with `CaraModelRpcServer` in process (tp = 1), so the router reaches the
    worker's `LoraRuntime` (its `AdapterManager`) by typed calls instead of rpyc method names."""

    def __init__(self):
        super().__init__(CaraModelRpcServer(), world_size=1)

    @property
    def lora(self) -> LoraRuntime:
        return self.backend.lora

    @property
    def backend(self) -> Optional[CaraBackend]:
        return getattr(self.model, "backend", None)
