"""Deterministic random PEFT LoRA adapters: demo adapters for the default model, and any
adapter a test needs for any llama base.

Adapters are made with PEFT itself (`LoraConfig` -> `get_peft_model` -> `save_pretrained`), so
the files (`adapter_config.json` + `adapter_model.safetensors`) are exactly what PEFT users
produce. PEFT initialises `lora_B` to zero (an adapter that changes nothing); here both A and B
are re-drawn from a seeded generator and scaled so that, for every adapted projection W,

    ||delta W||_F = strength * ||W||_F,   delta W = scaling * B @ A,

where `scaling` is PEFT's (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA). The
magnitude is thus set relative to the weight it perturbs, independent of rank and alpha:
`lora_alpha` only chooses how the same delta is split between the stored weights and the
scaling a server must apply (so a server that ignores the scaling gives visibly wrong output).
The default strength (DEFAULT_STRENGTH; see docs/MODELS.md for how it was chosen) changes the
greedy output of SmolLM2-135M-Instruct within a few tokens while the text stays readable.

A and B entries are i.i.d. normal before scaling; each module gets its own generator seeded
from (seed, module name), so an adapter does not depend on module order or PEFT internals.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from caraserve_router.assets import model_prep
from caraserve_router.assets.file_ops import emit as emit_progress, file_lock, write_json

__all__ = [
    "ALL_TARGETS",
    "ALPHA_MODES",
    "DEFAULT_STRENGTH",
    "MANIFEST_NAME",
    "adapter_files_ok",
    "alpha_for",
    "default_adapters_dir",
    "demo_adapter_name",
    "make_demo_adapters",
    "make_random_adapter",
    "parse_ranks",
    "parse_targets",
]

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = {
    "all": ALL_TARGETS,
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
ALPHA_MODES = ("double", "rank", "const", "rslora")
DEFAULT_STRENGTH = 0.1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
MANIFEST_VERSION = 1

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Argument parsing helpers (shared by the CLI and the library)


def parse_targets(spec: str | Sequence[str]) -> list[str]:
    """'all' | 'attn' | 'qkv' | 'mlp' | comma list of q,k,v,o,gate,up,down (or *_proj names),
    groups allowed in the list -> PEFT target module names in canonical order."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise ValueError("no target modules given")
    chosen: set[str] = set()
    for it in items:
        key = it.lower()
        if key in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[key])
        elif key in ALL_TARGETS:
            chosen.add(key)
        elif f"{key}_proj" in ALL_TARGETS:
            chosen.add(f"{key}_proj")
        else:
            raise ValueError(
                f"unknown target module {it!r}; use all, attn, qkv, mlp or a comma list of "
                "q, k, v, o, gate, up, down (or their *_proj names)"
            )
    return [t for t in ALL_TARGETS if t in chosen]


def parse_ranks(spec: str | Iterable[int]) -> list[int]:
    """'8,16,32,64' (or a list of ints) -> [8, 16, 32, 64]; every rank a positive integer."""
    if isinstance(spec, str):
        try:
            ranks = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"ranks must be a comma list of positive integers, got {spec!r}") from None
    else:
        ranks = [int(r) for r in spec]
    if not ranks or any(r <= 0 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive integers, got {spec!r}")
    return ranks


def alpha_for(rank: int, mode: str = "double", alpha: float = 16.0) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) for a rank under an alpha mode:

    - `double`: lora_alpha = 2r, scaling 2 (the common convention);
    - `rank`: lora_alpha = r, scaling 1;
    - `const`: lora_alpha = `alpha` for every rank, scaling alpha / r;
    - `rslora`: lora_alpha = `alpha`, use_rslora, scaling alpha / sqrt(r).
    """
    if mode == "double":
        return float(2 * rank), False
    if mode == "rank":
        return float(rank), False
    if mode == "const":
        return float(alpha), False
    if mode == "rslora":
        return float(alpha), True
    raise ValueError(f"unknown alpha mode {mode!r}; choose one of {', '.join(ALPHA_MODES)}")


def demo_adapter_name(rank: int, index: int) -> str:
    return f"demo-r{rank}-{index}"


def default_adapters_dir() -> Path:
    """`<repo>/.cache/adapters` (next to the prepared models)."""
    return model_prep.default_cache_dir().parent / "adapters"


# --------------------------------------------------------------------------------------------
# Shapes of a llama base, from its config.json (no weights loaded)


def _module_dims(cfg: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """proj name -> (in_features, out_features) for a llama config."""
    h = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or h // nh)
    inter = int(cfg["intermediate_size"])
    return {
        "q_proj": (h, nh * hd),
        "k_proj": (h, nkv * hd),
        "v_proj": (h, nkv * hd),
        "o_proj": (nh * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def _proj_group(proj: str) -> str:
    return "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def adapter_files_ok(adapter_dir: Path | str, base_config: Mapping[str, Any], *, rank: int,
                     lora_alpha: float, targets: Sequence[str], use_rslora: bool = False) -> tuple[bool, str]:
    """Does `adapter_dir` hold a complete PEFT adapter with this rank/alpha/targets for a base
    with `base_config`? Reads adapter_config.json and the safetensors header only."""
    d = Path(adapter_dir)
    try:
        acfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return False, f"adapter_config.json unreadable ({exc})"
    if acfg.get("peft_type") != "LORA" or int(acfg.get("r", -1)) != rank:
        return False, "different rank or not a LoRA adapter"
    if not math.isclose(float(acfg.get("lora_alpha", -1)), lora_alpha) or bool(acfg.get("use_rslora")) != use_rslora:
        return False, "different lora_alpha / rsLoRA"
    if sorted(acfg.get("target_modules") or []) != sorted(targets) or acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        return False, "different target modules"
    f = d / "adapter_model.safetensors"
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        size = f.stat().st_size
    except (OSError, ValueError) as exc:
        return False, f"adapter_model.safetensors unreadable ({exc})"
    header.pop("__metadata__", None)
    dims = _module_dims(base_config)
    expected = {}
    for layer in range(int(base_config["num_hidden_layers"])):
        for proj in targets:
            i, o = dims[proj]
            p = f"base_model.model.model.layers.{layer}.{_proj_group(proj)}.{proj}"
            expected[f"{p}.lora_A.weight"] = [rank, i]
            expected[f"{p}.lora_B.weight"] = [o, rank]
    if set(header) != set(expected):
        return False, "tensor names do not match"
    for k, meta in header.items():
        if list(meta["shape"]) != expected[k]:
            return False, f"{k} has shape {meta['shape']}, expected {expected[k]}"
        if 8 + n + int(meta["data_offsets"][1]) > size:
            return False, "adapter_model.safetensors is truncated"
    return True, ""


# --------------------------------------------------------------------------------------------
# One adapter


def _module_seed(seed: int, module_name: str) -> int:
    h = hashlib.sha256(f"{int(seed)}/{module_name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _load_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    ).eval()


def make_random_adapter(
    base_model: Any,
    out_dir: Path | str,
    *,
    rank: int = 8,
    target_modules: str | Sequence[str] = "all",
    lora_alpha: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    layers_to_transform: Sequence[int] | None = None,
    seed: int = 0,
    strength: float = DEFAULT_STRENGTH,
    overwrite: bool = False,
) -> Path:
    """Make one PEFT LoRA adapter with seeded random A and B and write it to `out_dir`.

    `base_model` is a model directory (any HF llama, e.g. a tiny random one) or an already
    loaded transformers model (reused without reloading; it is left unchanged). `rank`,
    `lora_alpha` (default 2 * rank), `rank_pattern`, `alpha_pattern`, `use_rslora` and
    `layers_to_transform` are PEFT `LoraConfig` fields; `target_modules` is a spec for
    `parse_targets` or a list of module names. Every adapted module gets
    ||scaling * B @ A||_F = strength * ||W||_F (strength 0 writes all-zero weights).
    Same arguments -> same tensors, bit for bit. Returns `out_dir`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if strength < 0 or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out_dir)
    targets = parse_targets(target_modules)
    model = _load_base(Path(base_model)) if isinstance(base_model, (str, Path)) else base_model

    cfg = LoraConfig(
        r=int(rank),
        lora_alpha=float(2 * rank if lora_alpha is None else lora_alpha),
        target_modules=targets,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=bool(use_rslora),
        layers_to_transform=list(layers_to_transform) if layers_to_transform is not None else None,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    try:
        adapter = "default"
        prefix = "base_model.model."
        n = 0
        with torch.no_grad():
            for name, mod in peft_model.named_modules():
                if not isinstance(mod, LoraLayer) or adapter not in mod.lora_A:
                    continue
                key = name[len(prefix):] if name.startswith(prefix) else name
                a = mod.lora_A[adapter].weight  # [r, in]
                b = mod.lora_B[adapter].weight  # [out, r]
                w = mod.get_base_layer().weight
                gen = torch.Generator().manual_seed(_module_seed(seed, key))
                a0 = torch.randn(a.shape, generator=gen, dtype=torch.float64)
                b0 = torch.randn(b.shape, generator=gen, dtype=torch.float64)
                scaling = float(mod.scaling[adapter])
                delta_norm = scaling * torch.linalg.matrix_norm(b0 @ a0).item()
                c = strength * torch.linalg.matrix_norm(w.detach().double()).item() / delta_norm
                a.copy_((a0 * math.sqrt(c)).to(a.dtype))
                b.copy_((b0 * math.sqrt(c)).to(b.dtype))
                n += 1
        if n == 0:
            raise ValueError(f"no module of the base model matches target modules {targets}")
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
            os.chmod(tmp / "adapter_model.safetensors", 0o644)  # safetensors writes 0600
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        # Take the LoRA layers out again so a loaded base model can be reused.
        peft_model.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
    return out_dir


# --------------------------------------------------------------------------------------------
# Demo adapters for a base model


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def make_demo_adapters(
    model_dir: Path | str | None = None,
    out_dir: Path | str | None = None,
    ranks: Sequence[int] | str = (8, 16, 32, 64),
    count: int = 4,
    targets: str | Sequence[str] = "all",
    seed: int = 0,
    *,
    alpha_mode: str = "double",
    alpha: float = 16.0,
    strength: float = DEFAULT_STRENGTH,
    force: bool = False,
    log: Log | None = None,
) -> list[dict]:
    """Make `count` demo adapters `demo-r{rank}-{i}` in `out_dir` (ranks assigned round-robin
    by index) for the base in `model_dir` (default: the prepared default model), and write
    `out_dir/manifest.json`.

    Adapters that already exist with the same settings (checked against the manifest and
    the files) are skipped; `force` remakes them. Adapter i is seeded by (seed, its name), so
    the set is reproducible and growing `count` keeps the existing ones. Returns one dict per
    adapter: name, rank, lora_alpha, scaling, use_rslora, targets, seed, strength, path
    (absolute here; relative to out_dir in the manifest), size_bytes, made (False if skipped).
    """
    emit = log or (lambda m: emit_progress(None, m))
    ranks = parse_ranks(ranks)
    tlist = parse_targets(targets)
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    alpha_for(ranks[0], alpha_mode, alpha)  # validates the mode
    if strength < 0 or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    model_dir = Path(model_dir) if model_dir is not None else model_prep.prepare_default_model(log=log)
    info = model_prep.validate_model_dir(model_dir, check_tokenizer=False)
    base_cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    out = Path(out_dir) if out_dir is not None else default_adapters_dir()
    out.mkdir(parents=True, exist_ok=True)
    out = out.absolute()

    # One writer per adapter directory at a time (e.g. several instances starting at once).
    with file_lock(out / LOCK_NAME):
        old: dict[str, dict] = {}
        try:
            m = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
            if m.get("format_version") == MANIFEST_VERSION:
                old = {a["name"]: a for a in m.get("adapters", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

        entries: list[dict] = []
        todo: list[dict] = []
        for i in range(count):
            r = ranks[i % len(ranks)]
            la, rs = alpha_for(r, alpha_mode, alpha)
            name = demo_adapter_name(r, i)
            e = {
                "name": name, "rank": r, "lora_alpha": la,
                "scaling": la / (math.sqrt(r) if rs else r), "use_rslora": rs,
                "targets": tlist, "seed": _module_seed(seed, name) & 0x7FFFFFFF, "strength": float(strength),
                "path": name,
            }
            entries.append(e)
            prev = old.get(name)
            same = prev is not None and all(prev.get(k) == e[k] for k in ("rank", "lora_alpha", "use_rslora", "targets", "seed", "strength"))
            ok, why = adapter_files_ok(out / name, base_cfg, rank=r, lora_alpha=la, targets=tlist, use_rslora=rs) \
                if same else (False, "new or different settings")
            if ok and not force:
                e["made"] = False
                emit(f"[{i + 1}/{count}] {name}: exists, skipped")
            else:
                if (out / name).exists():
                    emit(f"[{i + 1}/{count}] {name}: remaking ({'forced' if force else why})")
                e["made"] = True
                todo.append(e)

        if todo:
            t0 = time.monotonic()
            emit(f"loading base model {model_dir} ({info.num_layers} layers, hidden {info.hidden_size})")
            base = _load_base(Path(model_dir))
            emit(f"  loaded in {time.monotonic() - t0:.1f} s")
            for e in todo:
                t1 = time.monotonic()
                i = entries.index(e)
                target = out / e["name"]
                tmp = out / f".{e['name']}.tmp-{uuid.uuid4().hex[:8]}"
                make_random_adapter(
                    base, tmp, rank=e["rank"], target_modules=tlist, lora_alpha=e["lora_alpha"],
                    use_rslora=e["use_rslora"], seed=e["seed"], strength=strength,
                )
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
                emit(f"[{i + 1}/{count}] {e['name']}: rank {e['rank']}, lora_alpha {e['lora_alpha']:g} "
                     f"(scaling {e['scaling']:.3g}), {len(tlist)} modules x {info.num_layers} layers, "
                     f"{_dir_size(target) / 2**20:.1f} MiB, {time.monotonic() - t1:.1f} s")
        for e in entries:
            e["size_bytes"] = _dir_size(out / e["name"])

        keep = ("name", "rank", "lora_alpha", "scaling", "use_rslora", "targets", "seed", "strength", "path", "size_bytes")
        write_json(out / MANIFEST_NAME, {
            "format_version": MANIFEST_VERSION,
            "base_model": str(Path(model_dir).absolute()),
            "base_model_name": Path(model_dir).name,
            "paths_relative_to": "this manifest's directory",
            "alpha_mode": alpha_mode,
            "adapters": [{k: e[k] for k in keep} for e in entries],
        })
        stale = sorted(p.name for p in out.iterdir()
                       if p.is_dir() and p.name.startswith("demo-") and p.name not in {e["name"] for e in entries})
        if stale:
            emit(f"note: {len(stale)} other demo adapter dir(s) in {out} are not in this set (left alone): {', '.join(stale[:5])}")
        for p in out.glob(".demo-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        return [{**e, "path": str(out / e["path"])} for e in entries]
