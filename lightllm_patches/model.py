"""The llama model of one instance, on CUDA or on the CPU, with a LoRA hook per projection.

Overrides (one level of subclassing each):

| ours | upstream | why |
|---|---|---|
| `CaraMemoryManager` | `lightllm.common.mem_manager.MemoryManager` (through `kv_slots.HostMirroredSlots`: slots found on the host, no device wait) | allocates the KV cache and its state on the configured device (upstream: `device="cuda"`), takes its shared-memory name explicitly (upstream: an environment variable); counts reallocations (`generation`: CUDA graphs are captured again after one). |
| `CaraReqManager` | `lightllm.common.req_manager.ReqManager` | request -> token table on the configured device. |
| `CaraTransformerLayerWeight`, `CaraPreAndPostLayerWeight` | `LlamaTransformerLayerWeight`, `LlamaPreAndPostLayerWeight` | `_cuda` moves weights to the configured device instead of `.cuda()`; tied embeddings: the lm_head is the embedding's device copy (`load_hf_weights`). |
| `CaraInferState` | `LlamaInferStateInfo` | rotary tables gathered on the device; per-step (not per-layer) CPU attention plans; carries the step's LoRA batch. |
| `CaraPostLayerInfer` | `LlamaPostLayerInfer` | final rmsnorm through the device's op set; a mixed step (chunked prefill) takes only its sampling rows to the lm_head (`_slice_get_last_input`; upstream's splitfuse branch builds indices on "cuda" and keeps every row). |
| `CaraLlamaModel` | `LlamaTpPartModel` | weights loaded from safetensors without the CUDA-bound loader, managers and rotary tables on the device (`rope.py`: plain, linear and llama3 RoPE; the model families' config checks of `contracts.model_families`), `_prefill`/`_decode` without `device="cuda"` and with the LoRA batch attached; `forward_mixed` replaces `TpPartBaseModel.splitfuse_forward` (chunked prefill, on any device). |
"""
from __future__ import annotations

import glob
import os
import types

import numpy as np
import torch
from safetensors import safe_open

from lightllm.common.req_manager import ReqManager
from lightllm.models.llama.infer_struct import LlamaInferStateInfo
from lightllm.models.llama.layer_infer.post_layer_infer import LlamaPostLayerInfer
from lightllm.models.llama.layer_weights.pre_and_post_layer_weight import LlamaPreAndPostLayerWeight
from lightllm.models.llama.layer_weights.transformer_layer_weight import LlamaTransformerLayerWeight
from lightllm.models.llama.model import LlamaTpPartModel
from lightllm.server.router.dynamic_prompt.shared_arr import SharedInt

from caraserve_router.contracts.configs import WEIGHT_LAYOUTS
from caraserve_router.contracts.model_families import UnsupportedModelError, config_problems, family_of
from lightllm_patches import rope
from lightllm_patches.kv_slots import HostMirroredSlots
from lightllm_patches.layer_infer import LINEAR_NAMES, CaraTransformerLayerInfer
from lightllm_patches.llama_ops import cpu_decode_plan, ops_for
from lightllm_patches.mixed_infer_state import CaraMixedInferState
from lightllm_patches.weight_files import map_safetensors



def can_use_token_shm_name(shm_prefix: str) -> str:
    """Shared-memory name of the KV-token counter the router reads (one per instance)."""
    return f"{shm_prefix}_mem_manger_can_use_token_num"


class CaraMemoryManager(HostMirroredSlots):
    """KV cache on `device`; overrides `MemoryManager.__init__`/`_init_buffers`/`resize_mem`
    (slot allocation without device waits: kv_slots.py)."""

    def __init__(self, size, dtype, head_num, head_dim, layer_num, device: torch.device, shm_prefix: str):
        self.size = size
        self.dtype = dtype
        self.head_num = head_num
        self.head_dim = head_dim
        self.layer_num = layer_num
        self.always_copy = False
        self.device = device
        self.mem_state = torch.zeros((size,), dtype=torch.int32, device=device)
        self.indexes = torch.arange(0, size, dtype=torch.long, device=device)
        self.can_use_mem_size = size
        self.shared_can_use_token_num = SharedInt(can_use_token_shm_name(shm_prefix))
        self.shared_can_use_token_num.set_value(self.can_use_mem_size)
        self.generation = 0  # bumped by resize_mem: the CUDA graphs' pad slot and addresses are void then
        self._init_host_state()
        self._init_buffers(size, dtype, head_num, head_dim, layer_num)

    def _init_buffers(self, size, dtype, head_num, head_dim, layer_num):
        # kv_buffer[layer]: [tokens, 2 * kv_heads, head_dim] -- K heads first, then V heads.
        self.kv_buffer = [
            torch.empty((size, 2 * head_num, head_dim), dtype=dtype, device=self.device) for _ in range(layer_num)
        ]

    def resize_mem(self, new_size):
        self.mem_state = torch.zeros((new_size,), dtype=torch.int32, device=self.device)
        self.indexes = torch.arange(0, new_size, dtype=torch.long, device=self.device)
        self.size = new_size
        self._init_host_state()
        self.can_use_mem_size = new_size
        self.shared_can_use_token_num.set_value(self.can_use_mem_size)
        self._free_buffers()
        self._init_buffers(new_size, self.dtype, self.head_num, self.head_dim, self.layer_num)
        self.generation += 1


class CaraReqManager(ReqManager):
    """Overrides `ReqManager.__init__`: request table on `device`."""

    def __init__(self, max_request_num, max_sequence_length, mem_manager, device: torch.device):
        self.req_state = torch.zeros((max_request_num,), dtype=torch.bool, device=device)
        self.req_to_token_indexs = torch.zeros(
            (max_request_num, max_sequence_length), dtype=torch.int32, device=device
        )
        self.can_use_req_size = max_request_num
        self.mem_manager = mem_manager


def _to_device(layer_weight, cpu_tensor: torch.Tensor) -> torch.Tensor:
    return cpu_tensor.contiguous().to(dtype=layer_weight.data_type_, device=layer_weight.device)


class CaraTransformerLayerWeight(LlamaTransformerLayerWeight):
    """Overrides `BaseLayerWeight._cuda` for the llama layer weights: move to the model's device."""

    device = torch.device("cpu")  # set per model class instance before loading (see CaraLlamaModel)

    def _cuda(self, cpu_tensor):
        return _to_device(self, cpu_tensor)


class CaraPreAndPostLayerWeight(LlamaPreAndPostLayerWeight):
    """Overrides `BaseLayerWeight._cuda` for embeddings, final norm and lm_head, and
    `LlamaPreAndPostLayerWeight.load_hf_weights` for tied embeddings (upstream loads
    `lm_head.weight` only): with `tied`, the lm_head is the embedding's one device copy
    (151,936 x hidden: a second copy costs 1 GB for a 7B Qwen)."""

    device = torch.device("cpu")
    tied = False  # set per model before loading (see CaraLlamaModel._init_weights)

    def _cuda(self, cpu_tensor):
        return _to_device(self, cpu_tensor)

    def load_hf_weights(self, weights):
        if not self.tied:
            return super().load_hf_weights(weights)
        super().load_hf_weights({k: v for k, v in weights.items() if k != "lm_head.weight"})
        if self.wte_weight_ is not None:
            self.lm_head_weight_ = self.wte_weight_


class CaraInferState(LlamaInferStateInfo):
    """Overrides `LlamaInferStateInfo.init_some_extra_state`: device-aware, plus CaraServe state.

    Extra fields: `lora` (the step's `LoraBatch` or None), and for the CPU attention ops
    `cpu_segments` (prefill) or `cpu_decode_index` / `cpu_decode_mask` (decode), computed once
    per step instead of once per layer.
    """

    def __init__(self):
        super().__init__()
        self.lora = None
        self.cpu_segments = None
        self.cpu_decode_index = None
        self.cpu_decode_mask = None
        self.cpu_decode_buffer = None

    def init_some_extra_state(self, model, input_ids: torch.Tensor):
        device = model.device
        if self.is_prefill:
            seq_len = self.b_seq_len.cpu().numpy()
            ready = self.b_ready_cache_len.cpu().numpy()
            position_ids = torch.from_numpy(
                np.concatenate([np.arange(ready[i], seq_len[i]) for i in range(len(seq_len))], axis=0)
            ).to(device)
            if device.type == "cpu":
                starts = self.b_start_loc.tolist()
                self.cpu_segments = [(s, int(n - r)) for s, n, r in zip(starts, seq_len, ready)]
        else:
            position_ids = (self.b_seq_len - 1).long()
            self.other_kv_index = self.req_manager.req_to_token_indexs[self.b_req_idx[0], 0].item()
            if device.type == "cpu":
                self.cpu_decode_index, self.cpu_decode_mask = cpu_decode_plan(
                    self.req_manager.req_to_token_indexs, self.b_req_idx, self.b_seq_len, self.max_len_in_batch
                )
        self.position_cos = torch.index_select(model._cos_cached, 0, position_ids).view(position_ids.shape[0], -1)
        self.position_sin = torch.index_select(model._sin_cached, 0, position_ids).view(position_ids.shape[0], -1)


class CaraPostLayerInfer(LlamaPostLayerInfer):
    """Overrides `LlamaPostLayerInfer._norm`: the device's rmsnorm instead of Triton's."""

    ops = None  # set by CaraLlamaModel

    def _norm(self, input, infer_state, layer_weight):
        return self.ops.rmsnorm(input, layer_weight.final_norm_weight_, self.eps_)

    def _slice_get_last_input(self, input_embdings, infer_state):
        if isinstance(infer_state, CaraMixedInferState):
            index = infer_state.sample_index  # [samples]
            return input_embdings.index_select(0, index), int(index.shape[0])
        return super()._slice_get_last_input(input_embdings, infer_state)


class CaraLlamaModel(LlamaTpPartModel):
    """LightLLM's llama on `kvargs["device"]` with a LoRA hook (see `CaraTransformerLayerInfer`).

    Extra kvargs: `device` (torch.device), `shm_prefix` (unique per instance, names the
    shared-memory counters), `max_position` (rotary table length), `cpu_weight_layout`
    (`configs.WEIGHT_LAYOUTS`; default "lightllm"), `max_context` (longest prompt + output
    admitted; default max_seq_length).
    """

    pre_and_post_weight_class = CaraPreAndPostLayerWeight
    transformer_weight_class = CaraTransformerLayerWeight
    transformer_layer_infer_class = CaraTransformerLayerInfer
    post_layer_infer_class = CaraPostLayerInfer
    infer_state_class = CaraInferState

    def __init__(self, kvargs):
        self.device = kvargs["device"]
        self.shm_prefix = kvargs["shm_prefix"]
        # longest prompt + output admitted (the sliding-window check); max_seq_length may add slack
        self.max_context = int(kvargs.get("max_context", kvargs["max_seq_length"]))
        self.linear_copies = self.device.type == "cpu" and WEIGHT_LAYOUTS[kvargs.get("cpu_weight_layout", "lightllm")]
        self.ops = ops_for(self.device)
        super().__init__(kvargs)

    # ---- construction ------------------------------------------------------------------

    def _verify_params(self):
        super()._verify_params()
        # the same checks model preparation makes; a sliding window is judged against the
        # longest sequence this instance admits
        problems = config_problems(self.config, max_context=self.max_context)
        if problems:
            raise UnsupportedModelError("; ".join(problems))
        if "rope_theta" not in self.config:
            raise ValueError(
                "config.json has no top-level rope_theta; LightLLM would silently use 10000. "
                "Add it (transformers 5 nests it under rope_parameters)."
            )

    def _init_weights(self):
        # Upstream's loader (hf_load_utils.load_func) calls torch.cuda.set_device; read the
        # safetensors here and hand LightLLM's weight classes the same name -> tensor dict.
        self.transformer_weight_class.device = self.device
        self.pre_and_post_weight_class.device = self.device
        files = sorted(glob.glob(os.path.join(self.weight_dir_, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {self.weight_dir_}")
        weights = {}
        for path in files:
            if self.world_size_ > 1:  # each rank copies only its slices (weight_files.py)
                weights.update(map_safetensors(path))
                continue
            with safe_open(path, "pt", "cpu") as f:
                for key in f.keys():
                    weights[key] = f.get_tensor(key)
        # Tied embeddings (transformers' rule: the lm_head *is* the embedding, whatever else the
        # files hold; Qwen2.5 <= 3B ships no lm_head.weight). Upstream loads lm_head.weight only.
        tied = bool(self.config.get("tie_word_embeddings", family_of(self.config).tie_default))
        if "lm_head.weight" not in weights and not tied:
            raise FileNotFoundError(f"no lm_head.weight in {self.weight_dir_} and tie_word_embeddings is false")
        self.pre_and_post_weight_class.tied = tied
        self.weight_dict = weights
        super()._init_weights()
        self.weight_dict = None
        if self.linear_copies:
            for layer_weight in self.trans_layers_weight:
                for name, linear_name in LINEAR_NAMES.items():
                    # w: [in, out] -> [out, in]; CaraTransformerLayerInfer uses it for 2+ rows
                    setattr(layer_weight, linear_name, getattr(layer_weight, name).t().contiguous())

    def _init_mem_manager(self):
        self.mem_manager = CaraMemoryManager(
            self.max_total_token_num,
            dtype=self.data_type,
            head_num=self.config["num_key_value_heads"] // self.world_size_,
            head_dim=self.config["hidden_size"] // self.config["num_attention_heads"],
            layer_num=self.config["num_hidden_layers"],
            device=self.device,
            shm_prefix=self.shm_prefix,
        )

    def _init_req_manager(self):
        self.req_manager = CaraReqManager(self.max_req_num, self.max_seq_length, self.mem_manager, self.device)

    def _init_infer_layer(self):
        CaraPostLayerInfer.ops = self.ops
        super()._init_infer_layer()
        for layer in self.layers_infer:
            layer.bind_ops(self.ops)

    def _init_custom(self):
        self._init_to_get_rotary()

    def _init_to_get_rotary(self, default_base=10000):
        """Overrides `LlamaTpPartModel._init_to_get_rotary`: plain, linear or llama3 RoPE
        (`rope.rotary_tables`), built on our device, one row per position the instance admits
        (upstream: max_position_embeddings * factor + 128K rows, plain or linear only)."""
        self._cos_cached, self._sin_cached = rope.rotary_tables(
            self.config, self.head_dim_, self.max_seq_length, self.data_type, self.device)

    # ---- inference ---------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch_size, total_token_num, max_len_in_batch, input_ids, b_req_idx, b_start_loc,
                b_seq_len, b_ready_cache_len=None, multimodal_params=None, is_prefill=True, lora=None):
        """Upstream `TpPartBaseModel.forward` plus `lora`: the step's `LoraBatch` (or None)."""
        state = self.infer_state_class()
        state.is_prefill = is_prefill
        state.is_token_healing = self.is_token_healing
        state.return_all_prompt_logics = self.return_all_prompt_logics
        state.use_dynamic_prompt_cache = self.use_dynamic_prompt_cache
        state.batch_size = batch_size
        state.total_token_num = total_token_num
        state.max_len_in_batch = max_len_in_batch
        state.b_req_idx = b_req_idx
        state.b_start_loc = b_start_loc
        state.b_seq_len = b_seq_len
        state.multimodal_params = multimodal_params
        state.mem_manager = self.mem_manager
        state.req_manager = self.req_manager
        state.lora = lora
        if is_prefill:
            state.b_ready_cache_len = (
                b_ready_cache_len if b_ready_cache_len is not None else torch.zeros_like(b_seq_len)
            )
            self._alloc_kv(state, input_ids.shape[0])
            self._fill_req_to_token(state)
        else:
            self._alloc_kv(state, batch_size)
            self.ops.copy_kv_index_to_req(self.req_manager.req_to_token_indexs, b_req_idx, b_seq_len, state.mem_index)
        state.init_some_extra_state(self, input_ids)
        if is_prefill:
            return self._context_forward(input_ids, state)
        return self._token_forward(input_ids, state)

    @torch.no_grad()
    def forward_mixed(self, input_ids, position_ids, decode_req_idx, decode_seq_len, chunk_req_idx, chunk_ready_len,
                      chunk_seq_len, sample_index, lora=None):
        """One chunked-prefill step (see `lightllm_patches.chunked_prefill`): the decode rows'
        tokens, then the prefill chunks' tokens, in one forward. Replaces upstream
        `TpPartBaseModel.splitfuse_forward` (CUDA-only allocations and kernels).

        Shapes: input_ids / position_ids [T]; decode_* [D]; chunk_* [P]; sample_index [N] (token
        rows whose logits to return: every decode row, and each chunk that ends its prompt).
        Returns logits [N, vocab].
        """
        state = CaraMixedInferState()
        state.lora = lora
        state.decode_num = int(decode_req_idx.shape[0])
        state.chunk_num = int(chunk_req_idx.shape[0])
        state.batch_size = state.decode_num + state.chunk_num
        state.mem_manager = self.mem_manager
        state.req_manager = self.req_manager
        state.sample_index = sample_index
        self._alloc_kv(state, int(input_ids.shape[0]))
        table = self.req_manager.req_to_token_indexs
        if state.decode_num:
            self.ops.copy_kv_index_to_req(table, decode_req_idx, decode_seq_len, state.mem_index[: state.decode_num])
            state.init_decode(self.infer_state_class, self.device, decode_req_idx, decode_seq_len)
        if state.chunk_num:
            chunk = types.SimpleNamespace(b_req_idx=chunk_req_idx, b_seq_len=chunk_seq_len,
                                          b_ready_cache_len=chunk_ready_len, mem_index=state.mem_index[state.decode_num:])
            self._fill_req_to_token(chunk)
            state.chunk_req_idx, state.chunk_ready_len, state.chunk_seq_len = chunk_req_idx, chunk_ready_len, chunk_seq_len
            state.init_chunks(self.device)
        state.position_cos = torch.index_select(self._cos_cached, 0, position_ids).view(position_ids.shape[0], -1)
        state.position_sin = torch.index_select(self._sin_cached, 0, position_ids).view(position_ids.shape[0], -1)
        # Upstream `_splitfuse_forward`, except that a step where no row samples (chunks that
        # only fill the KV cache) skips the lm_head.
        embs = self.pre_infer.splitfuse_forward(input_ids, state, self.pre_post_weight)  # [T, hidden]
        for i in range(self.layers_num):
            embs = self.layers_infer[i].splitfuse_forward(embs, state, self.trans_layers_weight[i])
        if sample_index.shape[0] == 0:
            return torch.empty((0, self.config["vocab_size"]), dtype=torch.float32, device=self.device)
        return self.post_infer.splitfuse_forward(embs, state, self.pre_post_weight, return_logics=True)

    def _alloc_kv(self, state, num_tokens: int) -> None:
        """KV slots for this step's tokens: a contiguous block if one is free, else scattered
        slots plus a staging buffer (upstream allocates that buffer on "cuda")."""
        block = self.mem_manager.alloc_contiguous(num_tokens)
        if block is not None:
            state.mem_is_contiguous = True
            state.mem_index, state.mem_start, state.mem_end = block
            return
        index = self.mem_manager.alloc(num_tokens)
        if index is None:
            raise RuntimeError(f"KV cache exhausted: {num_tokens} slots needed")
        state.mem_is_contiguous = False
        state.mem_index = index
        state.kv_buffer = torch.empty(
            (num_tokens, self.tp_k_head_num_ + self.tp_v_head_num_, self.head_dim_),
            dtype=self.data_type,
            device=self.device,
        )

    def _fill_req_to_token(self, state) -> None:
        """Record the new tokens' KV slots in the request table (upstream init_req_to_token_indexes)."""
        seq_len = state.b_seq_len.tolist()
        ready = state.b_ready_cache_len.tolist()
        req_idx = state.b_req_idx.tolist()
        table = self.req_manager.req_to_token_indexs
        start = 0
        for r, n, c in zip(req_idx, seq_len, ready):
            table[r, c:n] = state.mem_index[start : start + n - c].to(table.dtype)
            start += n - c
