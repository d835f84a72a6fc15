"""AdapterStore: PEFT LoRA adapters validated against the base model, kept in host memory.

Each registered adapter lives in one named shared-memory segment (`/dev/shm/<prefix>_ad<n>`)
so the CPU sidecar reads the weights without a copy; on CUDA the segment is also page-locked
for asynchronous host->device copies. Layout of a segment (`HostLayout`), layer-major so a
layer group is one contiguous range:

    for layer in 0..L-1:  for group in (qkv, o, gate_up, down):
        A: [R, S, IN]    A[j, s] = row j of slice s's lora_A.weight      (zero past its rank)
        B: [R, OUT]      B[j, off_s:off_s+n_s] = scale_s * column j of lora_B.weight

R is the adapter's largest rank over all its projections (PEFT `rank_pattern` may vary it
per module and layer); rows past a projection's own rank are zero, so computing with R rows
is exact. The scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA, per `alpha_pattern`) is
folded into B once here, so kernels run with scale 1.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Optional

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
    rank: int  # largest rank over its projections: pages it owns in the pool
    slice_ranks: dict  # group -> tuple of per-slice ranks (max over layers; 0 = not targeted)
    target_modules: tuple
    layers: tuple
    use_rslora: bool

    def info(self) -> dict:
        return {"rank": self.rank, "target_modules": list(self.target_modules), "path": self.path}


@dataclass(frozen=True)
class HostLayout:
    """Element offsets of every (layer, group, A|B) block inside an adapter's segment."""

    shapes: ModelShapes
    rank: int

    def _layer_floats(self) -> int:
        return self.rank * self.shapes.floats_per_rank_per_layer()

    def total_floats(self) -> int:
        return self.shapes.num_layers * self._layer_floats()

    def layer_range(self, layer: int) -> tuple[int, int]:
        start = layer * self._layer_floats()
        return start, start + self._layer_floats()

    def block(self, layer: int, group: str, which: str) -> tuple[int, tuple[int, ...]]:
        """(offset, shape) of block `which` ("A" or "B") of `group` in `layer`."""
        offset = self.layer_range(layer)[0]
        for name in GROUPS:
            g = self.shapes.group(name)
            a_size = self.rank * g.num_slices * g.in_features
            if name == group:
                if which == "A":
                    return offset, (self.rank, g.num_slices, g.in_features)
                return offset + a_size, (self.rank, g.out_total)
            offset += a_size + self.rank * g.out_total
        raise KeyError(group)


class HostAdapter:
    """One adapter's weights in a named shared-memory segment (creator or attached view)."""

    def __init__(self, spec: AdapterSpec, layout: HostLayout, dtype: torch.dtype, shm: shared_memory.SharedMemory,
                 owner: bool):
        self.spec = spec
        self.layout = layout
        self.dtype = dtype
        self.shm = shm
        self.owner = owner
        self.flat = torch.frombuffer(shm.buf, dtype=dtype, count=layout.total_floats())
        self.pinned = False

    @property
    def shm_name(self) -> str:
        return self.shm.name

    @classmethod
    def attach(cls, spec: AdapterSpec, shapes: ModelShapes, dtype: torch.dtype, shm_name: str) -> "HostAdapter":
        """Map an existing segment (used by sidecar workers; never unlinks it)."""
        shm = shared_memory.SharedMemory(name=shm_name, create=False)
        # Python < 3.13 registers attached segments with this process's resource tracker,
        # which would unlink them when the worker exits; the creator owns the lifetime.
        try:
            resource_tracker.unregister(shm._name, "shared_memory")
        except Exception:  # noqa: BLE001 - tracker absent in some start methods
            pass
        return cls(spec, HostLayout(shapes, spec.rank), dtype, shm, owner=False)

    def block(self, layer: int, group: str, which: str) -> torch.Tensor:
        offset, shape = self.layout.block(layer, group, which)
        size = math.prod(shape)
        return self.flat[offset : offset + size].view(shape)

    def layer_bytes(self, layer: int) -> int:
        start, end = self.layout.layer_range(layer)
        return (end - start) * self.flat.element_size()

    def pin(self) -> None:
        """Page-lock the segment for async copies (CUDA only)."""
        if torch.cuda.is_available() and not self.pinned:
            torch.cuda.cudart().cudaHostRegister(self.flat.data_ptr(), self.flat.numel() * self.flat.element_size(), 0)
            self.pinned = True

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.pinned = False
        self.flat = None
        self.shm.close()
        if self.owner:
            self.shm.unlink()


# --------------------------------------------------------------------------- PEFT parsing


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


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise AdapterError(f"{path}: only adapter_model.safetensors is supported (found adapter_model.bin)")
        raise AdapterError(f"{path}: missing adapter_model.safetensors")
    try:
        with safe_open(weights_path, "pt", "cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise AdapterError(f"{path}: cannot read adapter_model.safetensors (truncated or corrupt?): {e}") from e


def _pattern_value(patterns: dict, key: str, default):
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def _index_tensors(path: str, tensors: dict, shapes: ModelShapes) -> dict:
    """{(layer, module): {"A": t, "B": t}} from PEFT keys; refuses unknown or misplaced keys."""
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
        found.setdefault((layer, module), {})[which] = tensor
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
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise AdapterError(
                f"{path}: layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                f"fit the base model (expected ({r}, {in_f}) / ({out_f}, {r}))"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{path}: layer {layer} {module} holds NaN or inf")
        ranks[(layer, module)] = (r, scale)
    return ranks


def parse_adapter(name: str, path: str, shapes: ModelShapes, max_rank: int) -> tuple[AdapterSpec, dict, dict]:
    """Validate a PEFT adapter directory; returns (spec, tensors by (layer, module), ranks/scales)."""
    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} does not exist or is not a directory")
    config = _read_config(path)
    _check_config(path, config, max_rank)
    found = _index_tensors(path, _read_tensors(path), shapes)
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


# --------------------------------------------------------------------------- the store

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}$")


class AdapterStore:
    """Registered adapters of one instance, in shared host memory."""

    def __init__(self, shapes: ModelShapes, dtype: torch.dtype, shm_prefix: str, max_rank: int, pin: bool):
        self.shapes = shapes
        self.dtype = dtype
        self.shm_prefix = shm_prefix
        self.max_rank = max_rank
        self.pin = pin
        self._adapters: dict[str, HostAdapter] = {}
        self._seq = 0
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def names(self) -> list[str]:
        return list(self._adapters)

    def get(self, name: str) -> HostAdapter:
        if name not in self._adapters:
            raise AdapterError(f"adapter {name!r} is not registered", status=404)
        return self._adapters[name]

    def add(self, name: str, path: str) -> HostAdapter:
        if not isinstance(name, str) or not _NAME.match(name):
            raise AdapterError(f"invalid adapter name {name!r} (letters, digits, . _ : - /; at most 128)")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already registered", status=409)
        spec, tensors, ranks = parse_adapter(name, path, self.shapes, self.max_rank)
        host = self._allocate(spec)
        try:
            self._fill(host, tensors, ranks)
            if self.pin:
                host.pin()
        except Exception:
            host.close()
            raise
        with self._lock:
            self._adapters[name] = host
        return host

    def remove(self, name: str) -> None:
        host = self.get(name)
        with self._lock:
            del self._adapters[name]
        host.close()

    def close(self) -> None:
        for name in list(self._adapters):
            self.remove(name)

    def _allocate(self, spec: AdapterSpec) -> HostAdapter:
        layout = HostLayout(self.shapes, spec.rank)
        nbytes = layout.total_floats() * torch.tensor([], dtype=self.dtype).element_size()
        self._seq += 1
        shm = shared_memory.SharedMemory(name=f"{self.shm_prefix}_ad{self._seq}", create=True, size=nbytes)
        host = HostAdapter(spec, layout, self.dtype, shm, owner=True)
        host.flat.zero_()
        return host

    def _fill(self, host: HostAdapter, tensors: dict, ranks: dict) -> None:
        for (layer, module), pair in tensors.items():
            group, slot = MODULE_SLOTS[module]
            r, scale = ranks[(layer, module)]
            g = self.shapes.group(group)
            off = g.slice_offsets
            a_block = host.block(layer, group, "A")  # [R, S, IN]
            b_block = host.block(layer, group, "B")  # [R, OUT_TOTAL]
            a_block[:r, slot, :] = pair["A"].to(self.dtype)
            b_block[:r, off[slot] : off[slot + 1]] = (pair["B"].float() * scale).t().to(self.dtype)
