"""Drive the real model worker (`CaraBackend`) in process, the way LightLLM's router does
(tests of chunked prefill, scripts/bench/chunked_prefill.py).

`BackendDriver.run` plays the router's part for a schedule of requests that arrive at given
steps: without chunked prefill it prefills each arriving group and merges it into the running
batch (upstream `_step`); with it, it registers the group and merges it at once, and every step
is one `decode_batch` call (the mixed step). It returns, per request, the generated tokens and
the logits each token was sampled from (recorded by wrapping the backend's sampler).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Optional


from lightllm.server.io_struct import FinishStatus, ReqRunStatus
from lightllm.server.multimodal_params import MultimodalParams
from lightllm.server.router.model_infer.infer_batch import requests_mapping

import lightllm_patches.backend as backend_module
from caraserve_router.contracts.adapters import AdapterRequest
from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig
from caraserve_router.contracts.processes import remove_shm
from lightllm_patches.backend import CaraBackend
from lightllm_patches.sampling import CaraSamplingParams


@dataclass
class Job:
    prompt: list
    adapter: Optional[str] = None
    max_new_tokens: int = 6
    arrive: int = 0  # step at which the request reaches the worker
    sampling: dict = field(default_factory=dict)  # CaraSamplingParams keywords (default greedy)
    stop: list = field(default_factory=list)  # stop sequences, as token id lists


class BackendDriver:
    _ids = 1000  # request ids are global in LightLLM's worker (requests_mapping): unique per driver

    def __init__(self, model_dir, chunk_tokens: int, adapters: Optional[dict] = None, mode: str = "cached",
                 eos_id: int = 0, torch_threads: int = 1, max_batch: int = 16, max_total_tokens: int = 4096,
                 max_input: int = 400, max_total_len: int = 512, graphs: bool = False, device: str = "cpu",
                 dtype: str = "auto", sidecar_workers: int = 1, **lora_kw):
        # graphs: pure decode steps through the CUDA-graph runner (captured on CUDA; on the CPU a
        # direct call, InstanceConfig.graph_emulation); device "cuda" runs it on the GPU
        lora_kw.setdefault("link_bandwidth_mbps", 1e5)
        lora_kw.setdefault("pool_mb", 16)
        lora_kw.setdefault("max_rank", 8)
        # Not "caraserve...": RunningServer (evaluation/server_process.py) unlinks every new
        # /dev/shm entry with that prefix when it stops, whoever made it (tests run in parallel).
        self.prefix = f"csoffline_{uuid.uuid4().hex[:8]}"
        self.config = InstanceConfig(model_dir=str(model_dir), shm_prefix=self.prefix, max_total_token_num=max_total_tokens,
                                     max_req_input_len=max_input, max_req_total_len=max_total_len,
                                     running_max_req_size=max_batch, prefill_chunk_tokens=chunk_tokens, device=device,
                                     dtype=dtype, cuda_graphs=graphs, graph_emulation=graphs,
                                     torch_threads=torch_threads,
                                     lora=LoRAConfig(mode=mode, **lora_kw), sidecar=SidecarConfig(workers=sidecar_workers))
        self.backend = CaraBackend()
        self.backend.init_model({"cara_config": self.config, "eos_id": [eos_id], "shm_prefix": self.prefix})
        for name, path in (adapters or {}).items():
            self.backend.lora.add(name, os.path.abspath(str(path)))
        self.steps: list = []  # per step: "prefill" | "decode" | "mixed"
        self.on_step = None  # optional callback(kind) after every forward step

    def close(self) -> None:
        self.backend.shutdown()
        self.backend.model.mem_manager.shared_can_use_token_num.shm.close()
        remove_shm(self.prefix)

    def run(self, jobs: list, max_steps: int = 500) -> tuple[list, list]:
        """(tokens per job, logits [vocab] per generated token per job)."""
        logits: dict[int, list] = {}
        real_sample = backend_module.sample

        def recording_sample(step_logits, reqs, eos_id, generators):
            for row, req in zip(step_logits, reqs):
                logits.setdefault(req.r_id, []).append(row.detach().clone())
            return real_sample(step_logits, reqs, eos_id, generators)

        backend_module.sample = recording_sample
        try:
            stepper = self.stepper(jobs, max_steps)
            for _ in stepper:
                pass
            tokens = self.tokens
        finally:
            backend_module.sample = real_sample
        return tokens, [logits.get(i, []) for i in self.ids]

    def _rpc_req(self, r_id: int, job: Job) -> dict:
        adapter = AdapterRequest(job.adapter) if job.adapter is not None else None
        params = CaraSamplingParams(adapter=adapter, max_new_tokens=job.max_new_tokens, ignore_eos=True,
                                    **(job.sampling or {"top_k": 1}))
        params.stop_sequences = [list(s) for s in job.stop]  # what the HTTP server's tokenisation makes
        return {"request_id": r_id, "group_req_id": r_id, "input_id": list(job.prompt),
                "sampling_param": params.to_dict(), "multimodal_params": MultimodalParams().to_dict(),
                "req_status": ReqRunStatus.WAIT_IN_QUEUE}

    def stepper(self, jobs: list, max_steps: int = 10_000):
        """Run `jobs`, yielding after every step (so callers can interleave two drivers step by
        step); afterwards `self.tokens` holds the generated tokens per job."""
        be = self.backend
        chunked = self.config.chunked_prefill
        self.ids = list(range(BackendDriver._ids, BackendDriver._ids + len(jobs)))
        BackendDriver._ids += len(jobs)
        tokens = {r: [] for r in self.ids}
        left = {r: j.max_new_tokens for r, j in zip(self.ids, jobs)}
        running: Optional[str] = None
        for step in range(max_steps):
            arriving = [(r, j) for r, j in zip(self.ids, jobs) if j.arrive == step]
            if arriving:
                batch_id = uuid.uuid4().hex
                be.add_batch(batch_id, [self._rpc_req(r, j) for r, j in arriving])
                if not chunked:
                    self._collect(be.prefill_batch(batch_id), tokens, left, batch_id)
                    self.steps.append("prefill")
                    if self.on_step:
                        self.on_step("prefill")
                if running is None:
                    running = batch_id
                elif batch_id in be.cache:
                    be.merge_batch(running, batch_id)
            if running is not None and len(be.cache[running].request_ids) > 0:
                out = be.decode_batch(running)
                self.steps.append(be.step_samples[-1]["kind"])
                if self.on_step:
                    self.on_step(self.steps[-1])
                self._collect(out, tokens, left, running)
            yield step
            if all(v == 0 for v in left.values()) and all(j.arrive <= step for j in jobs):
                break
        else:
            raise AssertionError(f"not finished after {max_steps} steps: {left}")
        if running is not None:
            assert not be.cache.pop(running).request_ids  # every request finished and was filtered out
        assert not any(r in requests_mapping for r in tokens), "finished requests must be released"
        self.tokens = [tokens[r] for r in self.ids]

    def _collect(self, out: dict, tokens: dict, left: dict, batch_id: str) -> None:
        finished = []
        for r_id, (_, _, _, new, finish, _) in out.items():
            tokens[r_id].extend(t for t, _ in new)
            left[r_id] -= len(new)
            assert left[r_id] >= 0
            if FinishStatus(finish).is_finished():
                left[r_id] = 0  # a stop sequence ends it early
                finished.append(r_id)
        if finished:
            keep = [r for r in self.backend.cache[batch_id].request_ids if r not in finished]
            self.backend.filter_batch(batch_id, keep, finished)
