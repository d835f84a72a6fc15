"""Read a llama GGUF file: metadata fields, hyperparameters, and every tensor dequantised to
float32 in HF llama names and HF row order.

llama.cpp permutes the q/k rows of each head for its rotary layout; `gguf_tensors` undoes it.
numpy, torch and gguf are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import time
from typing import Any

from caraserve_router.assets.errors import ModelPrepError
from caraserve_router.assets.file_ops import Log, emit


def _short_float(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    import numpy as np

    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


# llama.cpp tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_field(reader, key: str, default: Any = KeyError) -> Any:
    """The value of metadata field `key`; `default` when absent (ModelPrepError without one)."""
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise ModelPrepError(f"GGUF metadata lacks {key!r}")
        return default
    return f.contents()


def _unpermute_rows(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's `permute`).

    llama.cpp stores each head's rows interleaved (pairs (i, i + d/2) adjacent) for its
    rotary layout; HF llama keeps the two halves apart. `w` is [n_head * head_dim, in].
    """
    out = w.shape[0]
    if out % (2 * n_head):
        raise ModelPrepError(f"cannot un-permute a tensor of {out} rows into {n_head} heads")
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_hparams(reader) -> dict:
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ModelPrepError(f"only llama-architecture GGUF files are supported, this one is {arch!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else None
    hp = {
        "hidden_size": int(gguf_field(reader, "llama.embedding_length")),
        "intermediate_size": int(gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(gguf_field(reader, "llama.block_count")),
        "num_attention_heads": int(gguf_field(reader, "llama.attention.head_count")),
        "max_position_embeddings": int(gguf_field(reader, "llama.context_length")),
        "rms_norm_eps": _short_float(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
    }
    hp["num_key_value_heads"] = int(gguf_field(reader, "llama.attention.head_count_kv", hp["num_attention_heads"]))
    hp["vocab_size"] = int(gguf_field(reader, "llama.vocab_size", n_tokens))
    head_dim = hp["hidden_size"] // hp["num_attention_heads"]
    rope_dim = int(gguf_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim or hp["hidden_size"] % hp["num_attention_heads"]:
        raise ModelPrepError(
            f"unsupported GGUF: head_dim {head_dim} (hidden {hp['hidden_size']} / heads "
            f"{hp['num_attention_heads']}) vs rotary dimension {rope_dim}; LightLLM's llama needs "
            "full rotary and hidden = heads x head_dim"
        )
    if "llama.rope.scaling.type" in reader.fields:
        raise ModelPrepError("GGUF files with rope scaling are not supported")
    return hp


def gguf_tensors(reader, hp: dict, log: Log | None) -> dict:
    """All tensors as float32 torch tensors in HF names and HF row order."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    out: dict[str, Any] = {}
    n = len(reader.tensors)
    last = time.monotonic()
    for i, t in enumerate(reader.tensors):
        name = t.name
        if name in _GLOBAL_TENSORS:
            hf = _GLOBAL_TENSORS[name]
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest not in _LAYER_TENSORS:
                raise ModelPrepError(f"unexpected tensor {name!r} in the GGUF file")
            hf = f"model.layers.{int(layer)}.{_LAYER_TENSORS[rest]}"
        elif name == "rope_freqs.weight":
            raise ModelPrepError("GGUF files with llama-3 rope frequency factors are not supported")
        else:
            raise ModelPrepError(f"unexpected tensor {name!r} in the GGUF file")
        # A plain ndarray view of the memory map: numpy's memmap subclass makes every one of
        # dequantize's row slices pay for __array_finalize__ (about 2x slower).
        arr = dequantize(np.asarray(t.data), t.tensor_type)
        if arr.dtype != np.float32 or not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=np.float32, order="C")  # F32 tensors are read-only views
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if tuple(arr.shape) != expected:
            arr = arr.reshape(expected)
        w = torch.from_numpy(arr)
        if hf.endswith("self_attn.q_proj.weight"):
            w = _unpermute_rows(w, hp["num_attention_heads"])
        elif hf.endswith("self_attn.k_proj.weight"):
            w = _unpermute_rows(w, hp["num_key_value_heads"])
        out[hf] = w.contiguous()
        if time.monotonic() - last > 2.0:
            emit(log, f"  dequantised {i + 1}/{n} tensors")
            last = time.monotonic()
    return out
