"""PEFT LoRA adapter files, checked against the base model: config, safetensors header, tensors.

`parse_adapter` reads an adapter's `adapter_config.json` and the header of its
`adapter_model.safetensors` (names, shapes; no tensor data) and refuses what CaraServe cannot
serve with an `AdapterError` (400) that says why. `read_into` reads the tensors into an
AdapterStore segment on first use (and refuses NaN / inf there).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from caraserve_router.lora.shapes import GROUPS, GROUP_MODULES, MODULE_PARENT, MODULE_SLOTS, ModelShapes

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")


class AdapterError(ValueError):
    """A request about an adapter that cannot be honoured; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AdapterSpec:
    """What the engine and the API need to know about a validated adapter."""

    name: str
    path: str
    rank: int  # largest rank over its projections
    slice_ranks: dict  # group -> tuple of per-slice ranks (max over layers; 0 = not targeted)
    target_modules: tuple
    layers: tuple
    use_rslora: bool

    def info(self) -> dict:
        return {"rank": self.rank, "target_modules": list(self.target_modules), "path": self.path}


def _read_config(path: str) -> dict:
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise AdapterError(f"{path}: missing adapter_config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: adapter_config.json is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: adapter_config.json must hold a JSON object")
    return config


def _check_config(path: str, config: dict, max_rank: int) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{path}: rank r must be a positive integer, got {r!r}")
    ranks = [r] + list((config.get("rank_pattern") or {}).values())
    if any((not isinstance(x, int)) or x <= 0 for x in ranks):
        raise AdapterError(f"{path}: every rank in rank_pattern must be a positive integer")
    if max(ranks) > max_rank:
        raise AdapterError(f"{path}: rank {max(ranks)} exceeds this server's max rank {max_rank}")
    unsupported = {
        "use_dora": "DoRA adapters",
        "modules_to_save": "modules_to_save",
        "fan_in_fan_out": "fan_in_fan_out",
        "trainable_token_indices": "trainable tokens",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} ({key}) are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: LoRA bias ({config['bias']!r}) is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if t.split(".")[-1] not in MODULE_SLOTS]
        if bad:
            raise AdapterError(
                f"{path}: unsupported target module(s) {bad}; supported: {sorted(MODULE_SLOTS)}"
            )


def weights_path(path: str) -> str:
    """The adapter directory's safetensors file (AdapterError if it has none)."""
    found = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(found):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise AdapterError(f"{path}: only adapter_model.safetensors is supported (found adapter_model.bin)")
        raise AdapterError(f"{path}: missing adapter_model.safetensors")
    return found


def _read_header(path: str) -> dict[str, tuple]:
    """{tensor name: shape} from the safetensors header; no tensor data is read. The header's
    offsets are checked against the file size, so a truncated file is refused here."""
    file = weights_path(path)
    try:
        with safe_open(file, "pt", "cpu") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise AdapterError(f"{path}: cannot read adapter_model.safetensors (truncated or corrupt?): {e}") from e


def _pattern_value(patterns: dict, key: str, default):
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def _index_tensors(path: str, tensors: dict, shapes: ModelShapes) -> dict:
    """{(layer, module): {"A": (key, shape), "B": (key, shape)}} from PEFT keys; refuses unknown
    or misplaced keys."""
    found: dict = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (only lora_A/lora_B of llama projections)")
        layer, parent, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULE_SLOTS:
            raise AdapterError(f"{path}: unsupported target module {module!r}; supported: {sorted(MODULE_SLOTS)}")
        if MODULE_PARENT[module] != parent:
            raise AdapterError(f"{path}: tensor {key!r} puts {module} under {parent}")
        if layer >= shapes.num_layers:
            raise AdapterError(f"{path}: tensor {key!r} is for layer {layer}; the base model has {shapes.num_layers}")
        found.setdefault((layer, module), {})[which] = (key, tensor)
    if not found:
        raise AdapterError(f"{path}: adapter_model.safetensors holds no LoRA tensors")
    return found


def _expected_pairs(config: dict, found: dict, shapes: ModelShapes) -> set:
    targets = config.get("target_modules")
    if not isinstance(targets, list):  # a regex: what is in the file is what it targets
        return set(found)
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    layers = layers if layers is not None else range(shapes.num_layers)
    modules = {t.split(".")[-1] for t in targets}
    return {(layer, module) for layer in layers for module in modules}


def _check_pairs(path: str, config: dict, found: dict, shapes: ModelShapes) -> None:
    expected = _expected_pairs(config, found, shapes)
    for layer, module in sorted(expected - set(found)):
        raise AdapterError(f"{path}: missing tensors for layer {layer} {module} (lora_A and lora_B)")
    for layer, module in sorted(set(found) - expected):
        raise AdapterError(f"{path}: extra tensors for layer {layer} {module} not in target_modules")
    for (layer, module), pair in sorted(found.items()):
        for which in ("A", "B"):
            if which not in pair:
                raise AdapterError(f"{path}: layer {layer} {module} has no lora_{which}.weight")


def _module_key(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


def _rank_and_scale(config: dict, layer: int, module: str) -> tuple[int, float]:
    key = _module_key(layer, module)
    r = _pattern_value(config.get("rank_pattern") or {}, key, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, key, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scale


def _check_shapes(path: str, config: dict, found: dict, shapes: ModelShapes) -> dict:
    """Per (layer, module): (rank, scale), after checking both tensors' shapes."""
    ranks = {}
    for (layer, module), pair in found.items():
        r, scale = _rank_and_scale(config, layer, module)
        in_f, out_f = shapes.module_shape(module)
        a, b = pair["A"][1], pair["B"][1]
        if len(a) != 2 or len(b) != 2 or tuple(a) != (r, in_f) or tuple(b) != (out_f, r):
            raise AdapterError(
                f"{path}: layer {layer} {module}: lora_A {tuple(a)} / lora_B {tuple(b)} do not "
                f"fit the base model (expected ({r}, {in_f}) / ({out_f}, {r}))"
            )
        ranks[(layer, module)] = (r, scale)
    return ranks


def parse_adapter(name: str, path: str, shapes: ModelShapes, max_rank: int) -> tuple[AdapterSpec, dict, dict]:
    """Validate a PEFT adapter directory from its config and safetensors header; returns (spec,
    {(layer, module): {"A": (key, shape), "B": (key, shape)}}, {(layer, module): (rank, scale)})."""
    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} does not exist or is not a directory")
    config = _read_config(path)
    _check_config(path, config, max_rank)
    found = _index_tensors(path, _read_header(path), shapes)
    _check_pairs(path, config, found, shapes)
    ranks = _check_shapes(path, config, found, shapes)
    slice_ranks = {}
    for group in GROUPS:
        slice_ranks[group] = tuple(
            max([ranks[(l, m)][0] for (l, m) in ranks if m == module] or [0]) for module in GROUP_MODULES[group]
        )
    spec = AdapterSpec(
        name=name,
        path=os.path.abspath(path),
        rank=max(r for r, _ in ranks.values()),
        slice_ranks=slice_ranks,
        target_modules=tuple(m for m in MODULE_SLOTS if any(mm == m for _, mm in ranks)),
        layers=tuple(sorted({l for l, _ in ranks})),
        use_rslora=bool(config.get("use_rslora")),
    )
    return spec, found, ranks


def read_into(host, found: dict, ranks: dict) -> None:
    """Read the adapter's tensors from its file into the (zeroed) segment; refuses NaN / inf.

    It runs when an adapter is first used, so it is kept to one copy per tensor: B is scaled and
    transposed in one op straight into the segment, and the NaN / inf check is one pass over
    the whole segment at the end (the offending module is looked up only when it fails).
    Under tensor parallelism only the layout's rank's slice of each pair is kept (tp_shard)."""
    path = host.spec.path
    try:
        f = safe_open(weights_path(path), "pt", "cpu")
    except Exception as e:  # noqa: BLE001
        raise AdapterError(f"{path}: cannot read adapter_model.safetensors: {e}") from e
    with f:
        for (layer, module), pair in found.items():
            group, slot = MODULE_SLOTS[module]
            r, scale = ranks[(layer, module)]
            a, b = f.get_tensor(pair["A"][0]), f.get_tensor(pair["B"][0])
            a, b = host.layout.shard.slice_pair(module, a, b)  # a [r, IN], b [OUT_s, r] of this rank
            first = sum(host.layout.slice_ranks(group)[:slot])
            host.block(layer, group, "A")[first : first + r].copy_(a)                  # [r, IN]
            bt = b.t() if b.dtype == torch.float32 else b.t().float()                  # [r, OUT_s], scaled in fp32
            torch.mul(bt, scale, out=host.block(layer, group, slot)[:r])               # one rounding to host dtype
    if not bool(torch.isfinite(host.flat).all()):
        raise AdapterError(f"{path}: {_non_finite(host, found)} holds NaN or inf")


def _non_finite(host, found: dict) -> str:
    """Where the segment is not finite: 'layer L MODULE' of the first such module."""
    for layer, module in found:
        group, slot = MODULE_SLOTS[module]
        if not (torch.isfinite(host.block(layer, group, "A")).all() and torch.isfinite(host.block(layer, group, slot)).all()):
            return f"layer {layer} {module}"
    return "the adapter"
