"""AdapterStore: PEFT LoRA adapters validated against the base model; their bytes in host memory
only while they are used.

Registration reads and checks the adapter's config and the safetensors header (names, shapes,
dtypes): no tensor data, so registering thousands takes seconds. The bytes are read from the
file on first use (a load to the device, a CPU sidecar job) into one named shared-memory
segment per adapter (`/dev/shm/<prefix>_ad<n>`), which the CPU sidecar maps without a copy; on
CUDA the segment is also page-locked for asynchronous host->device copies. The store keeps
those segments in an LRU cache with a byte budget (`--lora-host-cache-mb`): an adapter no load
holds is unmapped when room is needed, and read again from its file when next used.

Layout of a segment (`HostLayout`), layer-major so a layer is one contiguous range; per layer
and group (qkv, o, gate_up, down) only the slices the adapter targets, each at its own rank r_s:

    A: [sum_s r_s, IN]   rows of slice s at rows sum_{s' < s} r_s' ..: slice s's lora_A.weight
    B_s: [r_s, OUT_s]    for each targeted slice s: scale_s * lora_B.weight^T

so a segment holds exactly the adapter's tensors. r_s is the slice's largest rank over the
layers (PEFT `rank_pattern` may vary it per layer; smaller layers are zero-padded, which is
exact). The scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA, per `alpha_pattern`) is
folded into B here, so kernels run with scale 1.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Callable, Optional

import torch
from safetensors import safe_open

from caraserve_router.lora.shapes import GROUPS, GROUP_MODULES, MODULE_PARENT, MODULE_SLOTS, ModelShapes

log = logging.getLogger("caraserve.lora.store")

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


@dataclass(frozen=True)
class HostLayout:
    """Element offsets of every (layer, group, A | B slice) block inside an adapter's segment.

    `ranks`: {group: per-slice ranks} (an adapter's `slice_ranks`), or one int for every slice."""

    shapes: ModelShapes
    ranks: object

    def slice_ranks(self, group: str) -> tuple[int, ...]:
        if isinstance(self.ranks, int):
            return (self.ranks,) * self.shapes.group(group).num_slices
        return tuple(self.ranks[group])

    @functools.cached_property
    def _offsets(self) -> tuple[int, dict]:
        """(floats per layer, {(group, "A") | (group, s): (offset in the layer, shape)})."""
        table, offset = {}, 0
        for name in GROUPS:
            g, ranks = self.shapes.group(name), self.slice_ranks(name)
            table[(name, "A")] = (offset, (sum(ranks), g.in_features))
            offset += sum(ranks) * g.in_features
            for s, r in enumerate(ranks):
                table[(name, s)] = (offset, (r, g.out_features[s]))
                offset += r * g.out_features[s]
        return offset, table

    def layer_floats(self) -> int:
        return self._offsets[0]

    def total_floats(self) -> int:
        return self.shapes.num_layers * self.layer_floats()

    def layer_range(self, layer: int) -> tuple[int, int]:
        start = layer * self.layer_floats()
        return start, start + self.layer_floats()

    def block(self, layer: int, group: str, which) -> tuple[int, tuple[int, int]]:
        """(offset, shape) of `which`: "A" (the group's lora_A rows, [sum_s r_s, IN]) or a slice
        index s (its scaled lora_B^T, [r_s, OUT_s]) of `group` in `layer`."""
        offset, shape = self._offsets[1][(group, which)]
        return layer * self.layer_floats() + offset, shape


class HostAdapter:
    """One registered adapter: its spec and layout, and its bytes in a named shared-memory segment
    while mapped. `flat` / `block()` / `shm_name` map it first if needed (through the store)."""

    def __init__(self, spec: AdapterSpec, layout: HostLayout, dtype: torch.dtype,
                 shm: Optional[shared_memory.SharedMemory], owner: bool, store: Optional["AdapterStore"] = None,
                 shm_name: Optional[str] = None):
        self.spec = spec
        self.layout = layout
        self.dtype = dtype
        self.owner = owner
        self.store = store
        self.shm = None
        self._flat: Optional[torch.Tensor] = None
        self._name = shm_name or (shm.name if shm is not None else None)
        self.pinned = False
        self.refs = 0  # loads (device copies) in flight: the segment may not be released
        if shm is not None:
            self._map(shm)

    def _map(self, shm: shared_memory.SharedMemory) -> None:
        self.shm = shm
        self._flat = torch.frombuffer(shm.buf, dtype=self.dtype, count=self.layout.total_floats())

    @property
    def nbytes(self) -> int:
        return self.layout.total_floats() * torch.empty((), dtype=self.dtype).element_size()

    @property
    def mapped(self) -> bool:
        return self.shm is not None

    def ensure(self) -> "HostAdapter":
        """Map the bytes (read them from the adapter's file when the store released them)."""
        if self.shm is None:
            if self.store is None:
                raise AdapterError(f"adapter {self.spec.name!r}: its host segment is gone", 500)
            self.store.materialize(self.spec.name)
        return self

    @property
    def flat(self) -> torch.Tensor:
        return self.ensure()._flat

    @property
    def shm_name(self) -> str:
        return self.ensure().shm.name

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
        return cls(spec, HostLayout(shapes, spec.slice_ranks), dtype, shm, owner=False)

    def block(self, layer: int, group: str, which) -> torch.Tensor:
        """View of block `which` ("A" or a slice index, see HostLayout.block)."""
        offset, shape = self.layout.block(layer, group, which)
        return self.flat[offset : offset + math.prod(shape)].view(shape)

    def layer_bytes(self, layer: int) -> int:
        start, end = self.layout.layer_range(layer)
        return (end - start) * self.dtype.itemsize

    def pin(self) -> None:
        """Page-lock the segment for async copies (CUDA only)."""
        if torch.cuda.is_available() and not self.pinned and self.nbytes:
            torch.cuda.cudart().cudaHostRegister(self._flat.data_ptr(), self.nbytes, 0)
            self.pinned = True

    def unmap(self) -> None:
        """Drop the bytes (unlink the segment if this process made it); the spec stays."""
        if self.shm is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._flat.data_ptr())
            self.pinned = False
        self._flat = None
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere: the unlink below still frees the name
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:  # someone removed /dev/shm/<name> under us: it is gone either way
                log.warning("host segment of adapter %s was already unlinked", self.spec.name)
        self.shm = None

    def close(self) -> None:
        self.unmap()


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


def _weights_path(path: str) -> str:
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise AdapterError(f"{path}: only adapter_model.safetensors is supported (found adapter_model.bin)")
        raise AdapterError(f"{path}: missing adapter_model.safetensors")
    return weights_path


def _read_header(path: str) -> dict[str, tuple]:
    """{tensor name: shape} from the safetensors header; no tensor data is read. The header's
    offsets are checked against the file size, so a truncated file is refused here."""
    weights_path = _weights_path(path)
    try:
        with safe_open(weights_path, "pt", "cpu") as f:
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


def read_into(host: HostAdapter, found: dict, ranks: dict) -> None:
    """Read the adapter's tensors from its file into the (zeroed) segment; refuses NaN / inf."""
    path = host.spec.path
    shapes = host.layout.shapes
    try:
        f = safe_open(_weights_path(path), "pt", "cpu")
    except Exception as e:  # noqa: BLE001
        raise AdapterError(f"{path}: cannot read adapter_model.safetensors: {e}") from e
    with f:
        for (layer, module), pair in found.items():
            group, slot = MODULE_SLOTS[module]
            r, scale = ranks[(layer, module)]
            a, b = f.get_tensor(pair["A"][0]), f.get_tensor(pair["B"][0])
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"{path}: layer {layer} {module} holds NaN or inf")
            first = sum(host.layout.slice_ranks(group)[:slot])
            host.block(layer, group, "A")[first : first + r] = a.to(host.dtype)        # [r, IN]
            host.block(layer, group, slot)[:r] = (b.float() * scale).t().to(host.dtype)  # [r, OUT_s]
    del shapes


# --------------------------------------------------------------------------- the store

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}$")


class AdapterStore:
    """Registered adapters of one instance; their bytes in shared host memory while used, within
    a byte budget (LRU over the adapters no load holds)."""

    def __init__(self, shapes: ModelShapes, dtype: torch.dtype, shm_prefix: str, max_rank: int, pin: bool,
                 cache_bytes: Optional[int] = None, max_mapped: Optional[int] = None):
        self.shapes = shapes
        self.dtype = dtype
        self.shm_prefix = shm_prefix
        self.max_rank = max_rank
        self.pin = pin
        self.cache_bytes = cache_bytes  # None: unbounded
        self.max_mapped = max_mapped  # None: unbounded (the sidecar's table size otherwise)
        self._adapters: dict[str, HostAdapter] = {}
        self._sources: dict[str, tuple] = {}  # name -> (found, ranks) for reading on first use
        self._mapped: collections.OrderedDict = collections.OrderedDict()  # LRU of mapped adapters
        self.mapped_bytes = 0
        self._seq = 0
        self._lock = threading.RLock()
        # hooks (the runtime wires the sidecar): called after a segment is mapped / before unmapped
        self.on_map: Optional[Callable[[HostAdapter], None]] = None
        self.on_unmap: Optional[Callable[[str], None]] = None
        self.counters: collections.Counter = collections.Counter()

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def names(self) -> list[str]:
        return list(self._adapters)

    def get(self, name: str) -> HostAdapter:
        if name not in self._adapters:
            raise AdapterError(f"adapter {name!r} is not registered", status=404)
        return self._adapters[name]

    def add(self, name: str, path: str) -> HostAdapter:
        """Register: validate config and header (no tensor data is read; see `materialize`)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise AdapterError(f"invalid adapter name {name!r} (letters, digits, . _ : - /; at most 128)")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already registered", status=409)
        spec, found, ranks = parse_adapter(name, path, self.shapes, self.max_rank)
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"adapter {name!r} is already registered", status=409)
            self._seq += 1
            host = HostAdapter(spec, HostLayout(self.shapes, spec.slice_ranks), self.dtype, None, owner=True,
                               store=self, shm_name=f"{self.shm_prefix}_ad{self._seq}")
            self._adapters[name] = host
            self._sources[name] = (found, ranks)
        return host

    def remove(self, name: str) -> None:
        host = self.get(name)
        with self._lock:
            self._unmap(host)
            del self._adapters[name]
            self._sources.pop(name, None)

    def close(self) -> None:
        for name in list(self._adapters):
            self.remove(name)

    # ---- the host cache ------------------------------------------------------------------

    def materialize(self, name: str) -> HostAdapter:
        """Map `name`'s bytes (reading its file if they are not mapped), most recently used."""
        host = self.get(name)
        with self._lock:
            if host.mapped:
                self._mapped.move_to_end(name)
                self.counters["host_hits"] += 1
                return host
            self._make_room(host.nbytes, keep=name)
            shm = shared_memory.SharedMemory(name=host._name, create=True, size=max(1, host.nbytes))
            host._map(shm)  # a new segment reads as zeros
            try:
                found, ranks = self._sources[name]
                read_into(host, found, ranks)
                if self.pin:
                    host.pin()
            except Exception:
                host.unmap()
                raise
            self._mapped[name] = host
            self.mapped_bytes += host.nbytes
            self.counters["host_reads"] += 1
            self.counters["host_read_bytes"] += host.nbytes
        if self.on_map is not None:
            self.on_map(host)
        return host

    def acquire(self, name: str) -> HostAdapter:
        """Map `name` and hold it (a load in flight): not released until `release`."""
        with self._lock:
            host = self.materialize(name)
            host.refs += 1
            return host

    def release(self, name: str) -> None:
        with self._lock:
            host = self._adapters.get(name)
            if host is not None and host.refs > 0:
                host.refs -= 1

    def _make_room(self, nbytes: int, keep: str) -> None:
        """Unmap idle adapters (LRU) until `nbytes` more fit the budget and the count cap. Held ones
        stay: the budget is then exceeded rather than a request failed."""
        def over() -> bool:
            return ((self.cache_bytes is not None and self.mapped_bytes + nbytes > self.cache_bytes)
                    or (self.max_mapped is not None and len(self._mapped) + 1 > self.max_mapped))
        for victim in [n for n, h in self._mapped.items() if h.refs == 0 and n != keep]:
            if not over():
                return
            self._unmap(self._adapters[victim])
            self.counters["host_evictions"] += 1
        if over():
            log.warning("host adapter cache over budget: every mapped adapter is in use")

    def _unmap(self, host: HostAdapter) -> None:
        if not host.mapped:
            return
        if self.on_unmap is not None:
            self.on_unmap(host.spec.name)
        self._mapped.pop(host.spec.name, None)
        self.mapped_bytes -= host.nbytes
        host.unmap()

    def stats(self) -> dict:
        return {"registered": len(self._adapters), "mapped_on_host": len(self._mapped),
                "host_bytes": self.mapped_bytes, "host_budget_bytes": self.cache_bytes, **self.counters}
