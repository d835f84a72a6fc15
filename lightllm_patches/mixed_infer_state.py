"""The infer state of a mixed step (chunked prefill): decode rows and prefill chunks together.

`CaraMixedInferState` stands in for upstream's `LlamaSplitFuseInferStateInfo` (whose base
class creates CUDA streams and events in `__init__`, and whose `init_some_extra_state` builds
position ids on "cuda"). LightLLM's layer template runs it through `splitfuse_forward`
(`_splitfuse_attention`, `_splitfuse_ffn`), so the projections, LoRA deltas and KV writes are
the same code as every other step; only attention differs:

- the first `decode_num` token rows are decode rows: `decode_state` (a plain decode
  `CaraInferState`) drives the device's decode attention for them;
- the rest are chunks: chunk i's queries are positions `[chunk_ready_len[i], chunk_seq_len[i])`
  of request `chunk_req_idx[i]` and attend causally to *all* its cached positions before them
  (earlier chunks included), through the device's `chunk_attention` op.
"""
from __future__ import annotations

import torch

from lightllm_patches.llama_ops import cpu_decode_plan


class CaraMixedInferState:
    is_splitfuse = True  # upstream's post layer and layer template key on it
    is_prefill = False
    is_token_healing = False
    return_all_prompt_logics = False
    use_dynamic_prompt_cache = False
    multimodal_params = None

    def __init__(self):
        self.lora = None
        self.batch_size = 0  # rows (requests) in the step
        self.mem_manager = None
        self.req_manager = None
        self.mem_is_contiguous = None
        self.mem_index = None
        self.mem_start = None
        self.mem_end = None
        self.kv_buffer = None
        self.position_cos = None  # [tokens, head_dim / 2]
        self.position_sin = None
        self.sample_index = None  # [samples] long: the token rows whose logits the step returns
        self.decode_num = 0
        self.decode_state = None  # CaraInferState of the decode rows (None without any)
        self.chunk_num = 0
        self.chunk_req_idx = None  # [P] int32
        self.chunk_ready_len = None  # [P] int32: KV positions cached before this chunk
        self.chunk_seq_len = None  # [P] int32: KV positions after this chunk
        self.chunk_start_loc = None  # [P] int32: first query row of chunk i, counted from the first chunk row
        self.chunk_max_len = 0  # longest chunk, in tokens
        self.cpu_chunk_plan = None  # CPU: per chunk (row start, length, kv index [L] long, mask [n, L] bool)

    def init_chunks(self, device: torch.device) -> None:
        """Chunk descriptors; called after the step's KV slots are in the request table."""
        ready = self.chunk_ready_len.tolist()
        seq = self.chunk_seq_len.tolist()
        lengths = [s - r for s, r in zip(seq, ready)]
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        self.chunk_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
        self.chunk_max_len = max(lengths)
        if device.type != "cpu":
            return
        table = self.req_manager.req_to_token_indexs
        plan = []
        for i, req_idx in enumerate(self.chunk_req_idx.tolist()):
            index = table[req_idx, : seq[i]].long()  # [L]: the request's KV slots, this chunk's included
            query_pos = torch.arange(ready[i], seq[i]).unsqueeze(1)  # [n, 1]
            mask = torch.arange(seq[i]).unsqueeze(0) <= query_pos  # [n, L]: causal, prefix fully visible
            plan.append((starts[i], lengths[i], index, mask))
        self.cpu_chunk_plan = plan

    def init_decode(self, decode_state_class, device: torch.device, decode_req_idx, decode_seq_len) -> None:
        """The decode rows' own infer state, as LightLLM's decode kernels expect it."""
        st = decode_state_class()
        st.is_prefill = False
        st.batch_size = self.decode_num
        st.b_req_idx = decode_req_idx
        st.b_seq_len = decode_seq_len
        seq = decode_seq_len.tolist()
        st.total_token_num = sum(seq)
        st.max_len_in_batch = max(seq)
        starts = [0]
        for n in seq[:-1]:
            starts.append(starts[-1] + n)
        st.b_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
        st.mem_manager = self.mem_manager
        st.req_manager = self.req_manager
        st.other_kv_index = self.req_manager.req_to_token_indexs[decode_req_idx[0], 0].item()
        if device.type == "cpu":
            st.cpu_decode_index, st.cpu_decode_mask = cpu_decode_plan(
                self.req_manager.req_to_token_indexs, decode_req_idx, decode_seq_len, st.max_len_in_batch
            )
        self.decode_state = st
