"""Decode steps as CUDA graphs: one graph per batch-size bucket, with and without LoRA rows.

Upstream: LightLLM 0.0.1 has no graphs (`TpPartBaseModel.forward` launches ~15 kernels a layer
from Python every step); its later tree (`cuda_graph.py`) captures decode with the maximum
sequence length so grids and buffers are fixed. This runner does the same for
`CaraLlamaModel`, beside the eager `forward` (which it does not change):

- buckets: powers of two and a few between (`graph_buckets`), up to the running batch's limit;
  a step of n rows replays the smallest bucket >= n, rows n.. padded: a reserved request slot
  whose table row points at one reserved KV slot, sequence length 1, token 0, LoRA rank 0;
- static inputs (`StaticDecodeInputs`): token ids, request slots, sequence lengths, KV slot
  indices, the KV staging rows; attention's start offsets are fixed (row i at i * L, L the
  request table's width) and its grid covers L, so it reads each row's length on the device;
- LoRA: the graph's `GraphLora` reads static descriptors (caraserve_router/lora/graph_lora.py),
  two launches per layer group; graphs are keyed by the groups any row targets (a q,k,v-only
  batch does not launch the o / MLP kernels), the none and all-groups sets captured at start,
  others on first use;
- per step on the host: the KV slots (`mem_manager.alloc`), the copies into the static buffers
  (non-blocking), one replay. Eager instead for batches above the largest bucket, for prefill
  and mixed (chunked-prefill) steps, and while an adapter is loading (`LoraBatch.graphable`:
  the modes' per-layer waits and sidecar calls are host work between launches);
- the pool, KV cache and request table are read at their capture-time addresses: when one is
  reallocated (`mem_manager.resize_mem`), the graphs are dropped and captured again, or, if that
  fails, refused (graphs off, eager from then on), never replayed stale.

On the CPU (`graph_emulation`) the capture is a direct call of the same body over the same
static buffers, so the bucket padding and input copies are tested without a GPU.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from caraserve_router.lora.graph_lora import StaticLoraDescriptors
from caraserve_router.lora.shapes import GROUPS
from lightllm_patches.llama_ops import cpu_decode_plan

log = logging.getLogger("caraserve.graphs")


SMALL_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)


def graph_buckets(max_batch: int) -> list[int]:
    """SMALL_BUCKETS (powers of two and a few between, so padding stays under ~25% past 8
    rows), powers of two from 256, and max_batch itself, all <= max_batch."""
    sizes = set(b for b in SMALL_BUCKETS if b <= max_batch)
    b = 256
    while b < max_batch:
        sizes.add(b)
        b *= 2
    sizes.add(max_batch)
    return sorted(sizes)


@dataclass(frozen=True)
class GraphKey:
    bucket: int
    lora_groups: tuple  # () for a graph without LoRA rows


class StaticDecodeInputs:
    """A decode step's inputs at fixed addresses, sized for the largest bucket."""

    def __init__(self, model, max_rows: int, pad_req: int, pad_slot: int):
        device, self.max_rows = model.device, max_rows
        self.pad_req, self.pad_slot = pad_req, pad_slot
        self.width = model.req_manager.req_to_token_indexs.shape[1]  # L: the longest sequence
        self.input_ids = torch.zeros(max_rows, dtype=torch.int64, device=device)          # [B]
        self.b_req_idx = torch.full((max_rows,), pad_req, dtype=torch.int32, device=device)   # [B]
        self.b_seq_len = torch.ones(max_rows, dtype=torch.int32, device=device)           # [B]
        self.b_start_loc = torch.arange(max_rows, dtype=torch.int32, device=device) * self.width  # [B], fixed
        self.mem_index = torch.full((max_rows,), pad_slot, dtype=torch.int64, device=device)  # [B]
        heads = model.tp_k_head_num_ + model.tp_v_head_num_
        self.kv = torch.empty((max_rows, heads, model.head_dim_), dtype=model.data_type, device=device)  # [B, 2KVH, d]
        # host-built inputs: ids, request slots, lengths in one page-locked staging copy (a copy from
        # pageable memory would wait for the device's queue)
        self.host = torch.empty((3, max_rows), dtype=torch.int64, pin_memory=device.type == "cuda")  # [3, B]
        self.staged = torch.empty((3, max_rows), dtype=torch.int64, device=device)
        self._copied = None  # CUDA event of the last copy out of `host`

    def reset(self) -> None:
        """Every row the pad row: a capture's warm-up runs the body, and must write KV only to
        the pad slot (the last step's slots may belong to another request by now)."""
        self.input_ids.zero_()
        self.b_req_idx.fill_(self.pad_req)
        self.b_seq_len.fill_(1)
        self.mem_index.fill_(self.pad_slot)

    def load(self, kwargs: dict, mem_index: torch.Tensor, rows: int, bucket: int) -> None:
        """Rows 0..rows-1 from the step, rows..bucket-1 the pad row (non-blocking copies). Inputs
        built on the host (the backend's) go through the page-locked staging buffer in one copy."""
        sources = (kwargs["input_ids"], kwargs["b_req_idx"], kwargs["b_seq_len"])
        if sources[0].device.type == "cpu" and self.input_ids.device.type != "cpu":
            if self._copied is not None:
                self._copied.synchronize()  # the previous step's copy out of `host` is done
            for k, src in enumerate(sources):
                self.host[k, :rows].copy_(src)
            self.staged.copy_(self.host, non_blocking=True)  # whole (contiguous): a strided one is staged pageable
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.staged.device))
            sources = tuple(self.staged[k, :rows] for k in range(3))
        for dst, src in zip((self.input_ids, self.b_req_idx, self.b_seq_len, self.mem_index), sources + (mem_index,)):
            dst[:rows].copy_(src, non_blocking=True)
        if rows < bucket:  # a row that left keeps its old values until reset
            self.input_ids[rows:bucket].zero_()
            self.b_req_idx[rows:bucket].fill_(self.pad_req)
            self.b_seq_len[rows:bucket].fill_(1)
            self.mem_index[rows:bucket].fill_(self.pad_slot)


class _Captured:
    """A CUDA graph of one bucket's body; `replay()` then read `logits`."""

    def __init__(self, body: Callable[[], torch.Tensor], device: torch.device, pool):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up off the capture (Triton compiles here, allocator settles)
            for _ in range(2):
                body()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = body()  # [bucket, vocab], static

    def replay(self) -> None:
        self.graph.replay()


class _DirectCall:
    """The CPU's stand-in for a capture: `replay()` runs the body over the same static buffers."""

    def __init__(self, body: Callable[[], torch.Tensor]):
        self.body = body
        self.logits = None

    def replay(self) -> None:
        self.logits = self.body()


class DecodeGraphRunner:
    """Replays a decode step as a graph when it can (`run` returns None when it cannot)."""

    def __init__(self, model, lora_ctx=None, *, max_batch: int, lora_backend: Optional[str] = None):
        self.model = model
        self.capture = model.device.type == "cuda"
        self.buckets = graph_buckets(max_batch)
        self.max_bucket = self.buckets[-1]
        self.lora_ctx, self.lora_backend = lora_ctx, lora_backend
        self.graphs: dict[GraphKey, object] = {}
        self.enabled = True
        self.counters = {"replays": 0, "eager": 0, "captures": 0, "recaptures": 0, "padded_rows": 0}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._reserve()

    # ---- set-up ----------------------------------------------------------------------------

    def _reserve(self) -> None:
        """The pad row's request slot and KV slot, held for the runner's life (the KV slot again
        after the KV cache was reallocated: a resize forgets every allocation); static buffers."""
        m = self.model
        if getattr(self, "pad_req", None) is None:
            self.pad_req = int(m.req_manager.alloc(1)[0])
        kv_key = (m.mem_manager.generation, m.mem_manager.size)
        if getattr(self, "_kv_key", None) != kv_key:
            slot = m.mem_manager.alloc(1)
            if slot is None:
                raise RuntimeError("no KV slot left for the CUDA-graph pad row")
            self.pad_slot, self._kv_key = int(slot[0]), kv_key
        m.req_manager.req_to_token_indexs[self.pad_req, 0] = self.pad_slot
        self.inputs = StaticDecodeInputs(m, self.max_bucket, self.pad_req, self.pad_slot)
        self.lora = (StaticLoraDescriptors(self.lora_ctx, self.max_bucket, self.lora_backend)
                     if self.lora_ctx is not None else None)
        self.layout = self._layout()

    def _layout(self) -> tuple:
        """Addresses the graphs read: a reallocation of any of them invalidates every graph."""
        m = self.model
        pool = self.lora_ctx.pool.W.data_ptr() if self.lora_ctx is not None else 0
        # generation: a resized KV cache may even reuse the old addresses, but forgot the pad slot
        return (m.mem_manager.generation, m.mem_manager.kv_buffer[0].data_ptr(), m.mem_manager.size,
                m.req_manager.req_to_token_indexs.data_ptr(), pool)

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the pool's blocks are reused by the smaller),
        without LoRA and, with a LoRA runtime, with every group; logs time and memory."""
        start = time.perf_counter()
        before = torch.cuda.memory_allocated(self.model.device) if self.capture else 0
        keys = [GraphKey(b, ()) for b in reversed(self.buckets)]
        if self.lora is not None:
            keys += [GraphKey(b, tuple(GROUPS)) for b in reversed(self.buckets)]
        for i, key in enumerate(keys):
            self._graph(key)
            if i % 8 == 7 or i == len(keys) - 1:
                log.info("CUDA graphs: captured %d/%d (bucket %d%s)", i + 1, len(keys), key.bucket,
                         ", LoRA" if key.lora_groups else "")
        used = (torch.cuda.memory_allocated(self.model.device) - before) / 2**20 if self.capture else 0.0
        log.info("CUDA graphs: %d captured for buckets %s in %.1f s, %.0f MiB", len(keys), self.buckets,
                 time.perf_counter() - start, used)

    def _graph(self, key: GraphKey):
        graph = self.graphs.get(key)
        if graph is None:
            lora = self.lora.graph_lora(key.bucket, key.lora_groups) if key.lora_groups else None
            body = self._body(key.bucket, lora)
            if self.capture:
                self.inputs.reset()
            graph = self.graphs[key] = _Captured(body, self.model.device, self._pool) if self.capture \
                else _DirectCall(body)
            self.counters["captures"] += 1
        return graph

    def _body(self, bucket: int, lora) -> Callable[[], torch.Tensor]:
        """The decode forward of `bucket` rows over the static inputs: `TpPartBaseModel.forward`
        + `_token_forward` for a decode step, without their host work (KV allocation, the
        `.item()` of `other_kv_index`, dynamic lengths) and with a graph-safe embedding."""
        m, s = self.model, self.inputs
        table = m.req_manager.req_to_token_indexs

        @torch.no_grad()
        def body() -> torch.Tensor:
            state = m.infer_state_class()
            state.is_prefill = False
            state.is_token_healing = state.return_all_prompt_logics = state.use_dynamic_prompt_cache = False
            state.batch_size = bucket
            state.total_token_num = bucket * s.width  # attention's scratch: row i at i * L
            state.max_len_in_batch = s.width          # the grid covers every length; rows stop at theirs
            state.b_req_idx, state.b_seq_len = s.b_req_idx[:bucket], s.b_seq_len[:bucket]
            state.b_start_loc = s.b_start_loc[:bucket]
            state.mem_manager, state.req_manager = m.mem_manager, m.req_manager
            state.mem_is_contiguous = False
            state.mem_index, state.kv_buffer = s.mem_index[:bucket], s.kv[:bucket]
            state.other_kv_index = s.pad_slot
            state.multimodal_params = None
            state.lora = lora
            m.ops.copy_kv_index_to_req(table, state.b_req_idx, state.b_seq_len, state.mem_index)
            positions = (state.b_seq_len - 1).long()  # [B]
            state.position_cos = torch.index_select(m._cos_cached, 0, positions).view(bucket, -1)
            state.position_sin = torch.index_select(m._sin_cached, 0, positions).view(bucket, -1)
            if m.device.type == "cpu":
                state.cpu_decode_index, state.cpu_decode_mask = cpu_decode_plan(
                    table, state.b_req_idx, state.b_seq_len, s.width)
            # upstream LlamaPreLayerInfer.token_forward masks ids outside this shard's vocabulary
            # by boolean indexing (a host sync, not capturable); with one shard none are outside
            embs = torch.embedding(m.pre_post_weight.wte_weight_, s.input_ids[:bucket])  # [B, hidden]
            for i in range(m.layers_num):
                embs = m.layers_infer[i].token_forward(embs, state, m.trans_layers_weight[i])
            return m.post_infer.token_forward(embs, state, m.pre_post_weight, return_logics=True)  # [B, vocab]

        return body

    # ---- per step --------------------------------------------------------------------------

    def bucket_for(self, rows: int) -> Optional[int]:
        i = bisect.bisect_left(self.buckets, rows)
        return self.buckets[i] if i < len(self.buckets) else None

    def run(self, kwargs: dict, lora_batch=None) -> Optional[torch.Tensor]:
        """Logits [rows, vocab] of a pure decode step from a graph, or None (run it eagerly;
        nothing was allocated or written)."""
        rows = kwargs["batch_size"]
        bucket = self.bucket_for(rows)
        if (not self.enabled or kwargs["is_prefill"] or bucket is None
                or (lora_batch is not None and not lora_batch.graphable)):
            self.counters["eager"] += 1
            return None
        if self._layout() != self.layout and not self._recapture():
            self.counters["eager"] += 1
            return None
        groups = tuple(g for g in GROUPS if lora_batch.any_rank[g]) if lora_batch is not None else ()
        graph = self._graph(GraphKey(bucket, groups))
        mem_index = self.model.mem_manager.alloc(rows)
        if mem_index is None:
            raise RuntimeError(f"KV cache exhausted: {rows} slots needed")
        self.inputs.load(kwargs, mem_index, rows, bucket)
        if groups:
            self.lora.load(lora_batch, rows)
        graph.replay()
        self.counters["replays"] += 1
        self.counters["padded_rows"] += bucket - rows
        return graph.logits[:rows]

    def _recapture(self) -> bool:
        """The KV cache, request table or pool moved: drop every graph and set up again (the
        pad slots too: a resized KV cache forgets its allocations); on failure, graphs off."""
        log.warning("CUDA graphs: the KV cache, request table or LoRA pool was reallocated; capturing again")
        self.graphs.clear()
        self.counters["recaptures"] += 1
        try:
            self._reserve()
            if self.capture:
                self.capture_all()
            return True
        except Exception as e:  # a capture that cannot be made must not leave stale graphs
            log.error("CUDA graphs: capture failed (%s); decode runs eagerly from now on", e)
            self.graphs.clear()
            self.enabled = False
            return False


def decode_graphs_for(config, model, lora_runtime) -> Optional[DecodeGraphRunner]:
    """The instance's runner (InstanceConfig.cuda_graphs on CUDA: captured now; graph_emulation
    on the CPU: direct calls), or None (every step eager)."""
    device = model.device
    if not ((device.type == "cuda" and config.cuda_graphs) or (device.type == "cpu" and config.graph_emulation)):
        return None
    if getattr(model, "world_size_", 1) > 1:
        # Ranks 1.. step through upstream's eager loop: a graph padded to its bucket would all-reduce
        # tensors of another size than theirs. Graphs under TP need every rank to replay: owed.
        log.warning("CUDA graphs: off with tp = %d (every rank steps eagerly; graphs under TP are not built yet)",
                    model.world_size_)
        return None
    ctx = lora_runtime.step_context if lora_runtime is not None else None
    runner = DecodeGraphRunner(model, ctx, max_batch=config.running_max_req_size)
    if runner.capture:
        runner.capture_all()
    return runner
