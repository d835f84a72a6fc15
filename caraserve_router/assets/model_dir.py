"""Check any HF model directory (the server's `--model-dir`) against what CaraServe serves.

`validate_model_dir` checks config.json (the families, rope types and features of
`contracts.model_families`), the safetensors headers and (optionally) the tokenizer, returns a
`ModelInfo`, and can fix the one fixable problem in place (a `rope_theta` only under
`rope_parameters`).
transformers and safetensors are imported only where needed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from caraserve_router.assets.errors import ModelDirError
from caraserve_router.assets.file_ops import Log, emit, write_json
from caraserve_router.assets.llama_layout import REQUIRED_CONFIG_KEYS, expected_shapes
from caraserve_router.contracts.model_families import FAMILIES, config_problems, family_of


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a validated model directory holds (the facts the server needs)."""

    path: Path
    model_type: str
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
                       log: Log | None = None, max_context: int | None = None) -> ModelInfo:
    """Check that `path` is an HF directory of a family CaraServe serves (llama, qwen2, mistral).

    Checks config.json (`model_families.config_problems`: model type, MoE, activation, biases,
    rope scaling, a sliding window shorter than `max_context` (default: max_position_embeddings);
    the keys the llama path reads; a top-level `rope_theta`; head layout), the safetensors
    weights (every tensor the model loads, with the right shape; `lm_head.weight` present unless
    the embeddings are tied) and, with `check_tokenizer`, that `AutoTokenizer.from_pretrained(path)`
    loads offline and fits the vocabulary.

    One problem is fixable in place, with `fix=True`: a `rope_theta` that only sits under
    `rope_parameters` is copied to the top level of config.json. Raises `ModelDirError`
    listing every problem otherwise.
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

    problems += config_problems(cfg, max_context=max_context)  # the instance's own checks
    known_family = cfg.get("model_type") in FAMILIES  # shapes are checked against a family's layout
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

    shapes_ok = not missing and known_family
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
    headers, st_problems = _safetensors_headers(path)
    problems += st_problems
    if not headers and not st_problems:
        bins = sorted(p.name for p in path.glob("*.bin"))
        problems.append(
            "no *.safetensors weights" + (f" (found {bins[:3]}; convert them to safetensors)" if bins else "")
        )
    elif headers and shapes_ok:
        expected = expected_shapes(cfg)
        tied = bool(cfg.get("tie_word_embeddings", family_of(cfg).tie_default))
        absent = [n for n in expected if n not in headers]
        if "lm_head.weight" in absent:
            absent.remove("lm_head.weight")
            if tied:
                notes.append("no lm_head.weight: tied to model.embed_tokens.weight (tie_word_embeddings)")
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
            write_json(cfg_path, cfg)
            emit(log, f"wrote rope_theta={rope_fix!r} at the top level of {cfg_path}")
        return validate_model_dir(path, fix=False, check_tokenizer=check_tokenizer, log=log, max_context=max_context)
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
        model_type=str(cfg["model_type"]),
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
