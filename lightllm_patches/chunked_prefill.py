"""Chunked prefill (SARATHI): one forward step runs the running batch's decode tokens *and* at
most `prefill_chunk_tokens` prompt tokens of requests still being prefilled.

A prompt is cut into chunks; a chunk after the first attends to the keys/values of the earlier
chunks, which are already in LightLLM's KV cache (the request's `req_to_token_indexs` row), so
no decode step ever waits for more than one chunk, however long the prompts that arrive.

Every row of a mixed step is a *segment* of one request: positions
`[cur_kv_len, cur_kv_len + length)` of its token list. A decode row is the 1-token segment at
the end of a request whose KV holds everything but its last token. A row samples a token only
when its segment reaches the end of the request's tokens (a prompt's last chunk, or a decode
row); other chunk rows only fill the KV cache.

Order of rows in the step: decode rows first (LightLLM's decode attention kernel takes them as
one contiguous block), then the chunks, in the batch's (admission) order.

This replaces upstream's splitfuse pre-processing
(`mode_backend.splitfuse.pre_process.splitfuse_prepare_decode_inputs`), which builds its
tensors on "cuda" and gives *every* prefilling request a full block per step; here the chunk
budget is per step (first come, first served), so one step's work is bounded by one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Row:
    """One request's segment in a mixed step."""

    req: object  # lightllm InferReq
    start: int  # first position of the segment (the request's cur_kv_len)
    length: int  # tokens of the segment (1 for a decode row)
    samples: bool  # the segment ends the request's token list: the step samples its next token


@dataclass(frozen=True)
class StepPlan:
    decode: list  # Row, one token each
    chunks: list  # Row, prefill chunks
    waiting: list  # InferReq still prefilling that got no tokens this step (chunk budget spent)

    @property
    def rows(self) -> list:
        return self.decode + self.chunks

    @property
    def has_prefill(self) -> bool:
        return bool(self.chunks)


def plan_step(reqs: list, chunk_tokens: int) -> StepPlan:
    """Split the batch's requests into decode rows and prefill chunks of at most
    `chunk_tokens` prompt tokens in all (first come, first served)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    decode, chunks, waiting = [], [], []
    budget = chunk_tokens
    for req in reqs:
        total = len(req.input_token_ids)
        done = req.cur_kv_len
        if done == total - 1:
            decode.append(Row(req, done, 1, True))
        elif done < total - 1:
            length = min(total - done, budget)
            if length == 0:
                waiting.append(req)
                continue
            budget -= length
            chunks.append(Row(req, done, length, done + length == total))
        else:
            raise AssertionError(f"request {req.r_id}: KV length {done} >= token count {total}")
    return StepPlan(decode, chunks, waiting)


def step_inputs(plan: StepPlan, device: torch.device) -> dict:
    """The keyword arguments of `CaraLlamaModel.forward_mixed` for `plan`."""
    rows = plan.rows
    ids = [np.asarray(r.req.input_token_ids[r.start : r.start + r.length], dtype=np.int64) for r in rows]
    ends = np.cumsum([r.length for r in rows]) - 1  # last token of each segment
    positions = np.concatenate([np.arange(r.start, r.start + r.length) for r in rows])
    sample_index = [int(e) for e, r in zip(ends, rows) if r.samples]

    def tensor(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=device)

    return {
        "input_ids": torch.from_numpy(np.concatenate(ids)).to(device),  # [tokens]
        "decode_req_idx": tensor([r.req.req_idx for r in plan.decode]),  # [D]
        "decode_seq_len": tensor([r.start + 1 for r in plan.decode]),  # [D], incl. this token
        "chunk_req_idx": tensor([r.req.req_idx for r in plan.chunks]),  # [P]
        "chunk_ready_len": tensor([r.start for r in plan.chunks]),  # [P], KV already cached
        "chunk_seq_len": tensor([r.start + r.length for r in plan.chunks]),  # [P], after the chunk
        "position_ids": torch.from_numpy(positions).to(device),  # [tokens]
        "sample_index": tensor(sample_index, torch.long),  # [samples], rows of the step's tokens
    }


def lora_view(plan: StepPlan) -> dict:
    """What `LoraRuntime.build_batch` reads of a step: every row is a segment of tokens that
    share an adapter (a decode row is a 1-token segment), so the step runs the sgmv kernels."""
    return {
        "is_prefill": True,
        "b_seq_len": torch.tensor([r.start + r.length for r in plan.rows]),
        "b_ready_cache_len": torch.tensor([r.start for r in plan.rows]),
    }
