"""AdapterStore: PEFT LoRA adapters validated against the base model; their bytes in host memory
only while they are used.

Registration reads and checks the adapter's config and the safetensors header (names, shapes,
dtypes): no tensor data, so registering thousands takes seconds. The bytes are read from the
file on first use (a load to the device, a CPU sidecar job) into one named shared-memory
segment per adapter (`/dev/shm/<prefix>_<content key>`), which the CPU sidecar maps without a
copy; on CUDA the segment is also page-locked for asynchronous host->device copies. The name is
derived from the adapter file's identity and the layout, so the instances of one host that are
given the same prefix map one copy (`host_segments`). The store keeps its segments in an LRU
cache with a byte budget (`--lora-host-cache-mb`): an adapter no load holds is unmapped when room
is needed (the copy goes when no instance of the host maps it), and read again when next used.

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
import concurrent.futures
import functools
import hashlib
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Callable, Optional

import torch

from caraserve_router.contracts import host_segments
from caraserve_router.lora.peft_files import AdapterError, AdapterSpec, parse_adapter, read_into, weights_path
from caraserve_router.lora.shapes import GROUPS, ModelShapes
from caraserve_router.lora.tp_shard import TpShard

__all__ = ["AdapterError", "AdapterSpec", "AdapterStore", "HostAdapter", "HostLayout", "parse_adapter"]

log = logging.getLogger("caraserve.lora.store")


@dataclass(frozen=True)
class HostLayout:
    """Element offsets of every (layer, group, A | B slice) block inside an adapter's segment.

    `ranks`: {group: per-slice ranks} (an adapter's `slice_ranks`), or one int for every slice.
    `shard`: the tensor-parallel rank whose shard the segment holds (`shapes` are that rank's)."""

    shapes: ModelShapes
    ranks: object
    shard: TpShard = TpShard()

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
                 shm, store: Optional["AdapterStore"] = None, shm_name: Optional[str] = None):
        # shm: a host_segments.Segment (the store's: closing it unlinks the name when no other
        # process maps it) or a SharedMemory attached by name (a sidecar worker's: only closed)
        self.spec = spec
        self.layout = layout
        self.dtype = dtype
        self.store = store
        self.shm = None
        self._flat: Optional[torch.Tensor] = None
        self._name = shm_name or (shm.name if shm is not None else None)
        self.pinned = False
        self.refs = 0  # loads (device copies) in flight: the segment may not be released
        if shm is not None:
            self._map(shm)

    def _map(self, shm) -> None:
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
        return cls(spec, HostLayout(shapes, spec.slice_ranks), dtype, shm)

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
        """Drop the bytes (the store's segment is unlinked when no other process maps it); the spec stays."""
        if self.shm is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._flat.data_ptr())
            self.pinned = False
        self._flat = None
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes when it does
            pass
        self.shm = None

    def close(self) -> None:
        self.unmap()


# --------------------------------------------------------------------------- the store


def _close_read(future: concurrent.futures.Future) -> None:
    """Done callback of a background read nobody will install (its adapter was removed)."""
    if not future.cancelled() and future.exception() is None:
        future.result()[0].close()


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}$")


class AdapterStore:
    """Registered adapters of one instance; their bytes in shared host memory while used, within
    a byte budget (LRU over the adapters no load holds).

    `shm_prefix`: the segments' name prefix; instances of one host given the same one share each
    adapter's copy (a segment is counted in the budget of every store that maps it).

    `shapes` are the base model's; with a tensor-parallel `shard` a segment holds only that
    rank's shard of each adapter (`tp_shard`), laid out by `self.shapes`, the rank's shapes."""

    def __init__(self, shapes: ModelShapes, dtype: torch.dtype, shm_prefix: str, max_rank: int, pin: bool,
                 cache_bytes: Optional[int] = None, max_mapped: Optional[int] = None,
                 shard: TpShard = TpShard()):
        self.file_shapes = shapes  # what an adapter file is checked against
        self.shard = shard
        self.shapes = shard.shapes(shapes)  # this rank's: the segments' layout
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
        self._lock = threading.RLock()
        self._reads: dict[str, concurrent.futures.Future] = {}  # name -> background read (start_read)
        self._reader: Optional[concurrent.futures.ThreadPoolExecutor] = None
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
        spec, found, ranks = parse_adapter(name, path, self.file_shapes, self.max_rank)
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"adapter {name!r} is already registered", status=409)
            segment = f"{self.shm_prefix}_{self._content_key(spec, ranks)}"
            # the same directory twice in this store (the runtime aliases names, a store user may
            # not): a segment of its own, so removing one entry unmaps its bytes as before
            taken, n = {h._name for h in self._adapters.values()}, 1
            name_of_segment = segment
            while name_of_segment in taken:
                name_of_segment, n = f"{segment}_{n}", n + 1
            host = HostAdapter(spec, HostLayout(self.shapes, spec.slice_ranks, self.shard), self.dtype, None,
                               store=self, shm_name=name_of_segment)
            self._adapters[name] = host
            self._sources[name] = (found, ranks)
        return host

    def _content_key(self, spec: AdapterSpec, ranks: dict) -> str:
        """Names the bytes: the adapter directory, its weights file's identity (device, inode,
        size, mtime) and everything that shapes the segment (dtype, model shapes, per-slice
        ranks, every module's rank and scale). Two instances of a host reading the same
        directory agree on it; a rewritten file gets a new one; directories that hard-link one
        file stay separate adapters."""
        st = os.stat(weights_path(spec.path))
        ident = (os.path.realpath(spec.path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, str(self.dtype),
                 self.shapes, sorted(spec.slice_ranks.items()), sorted(ranks.items()))
        if self.shard.sharded:  # the ranks' shapes are equal, their bytes are not
            ident += (self.shard,)
        return hashlib.sha1(repr(ident).encode()).hexdigest()[:20]

    def remove(self, name: str) -> None:
        host = self.get(name)
        with self._lock:
            pending = self._reads.pop(name, None)
            if pending is not None:  # its segment, once read, is nobody's: close it
                pending.add_done_callback(_close_read)
            self._unmap(host)
            del self._adapters[name]
            self._sources.pop(name, None)

    def close(self) -> None:
        for name in list(self._adapters):
            self.remove(name)
        if self._reader is not None:
            self._reader.shutdown(wait=True)  # the reads left close their segments (_close_read)
            self._reader = None

    # ---- the host cache ------------------------------------------------------------------

    def materialize(self, name: str) -> HostAdapter:
        """Map `name`'s bytes (reading its file if they are not mapped), most recently used. Blocks
        for the read; `start_read` / `finish_read` do it off the caller's thread."""
        host = self.get(name)
        with self._lock:
            if host.mapped:
                self._mapped.move_to_end(name)
                self.counters["host_hits"] += 1
                return host
            pending = self._reads.pop(name, None)
            if pending is None:
                self._make_room(host.nbytes, keep=name)
                segment, read = self._read_segment(host, self._sources[name])
            else:
                segment, read = pending.result()  # its read was started in the background: wait for it
            self._install(host, segment, read)
        if self.on_map is not None:
            self.on_map(host)
        return host

    def start_read(self, name: str) -> bool:
        """True when `name`'s bytes are mapped; otherwise start reading them on the store's reader
        thread (once) and return False: `finish_read` maps them when the read is done. So the
        thread that serves requests never waits for a file (12-200 ms per adapter here)."""
        host = self.get(name)
        with self._lock:
            if host.mapped:
                return True
            if name not in self._reads:
                self._make_room(host.nbytes, keep=name)
                if self._reader is None:
                    self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapter-read")
                self._reads[name] = self._reader.submit(self._read_segment, host, self._sources[name])
            return False

    def reading(self, name: str) -> bool:
        """A background read of `name` was started and its bytes are not mapped yet."""
        return name in self._reads

    def read_running(self, name: str) -> bool:
        """A background read of `name` is still running (not done, nothing to install yet)."""
        pending = self._reads.get(name)
        return pending is not None and not pending.done()

    def finish_read(self, name: str) -> bool:
        """Map `name`'s bytes here if its background read is done (True; on_map runs on this
        thread); False while it runs. Raises the read's AdapterError."""
        host = self.get(name)
        with self._lock:
            if host.mapped:
                return True
            pending = self._reads.get(name)
            if pending is None or not pending.done():
                return False
            del self._reads[name]
            segment, read = pending.result()
            self._install(host, segment, read)
        if self.on_map is not None:
            self.on_map(host)
        return True

    def _read_segment(self, host: HostAdapter, source: tuple) -> tuple:
        """(segment, read from the file?) of `host`'s bytes: another instance's copy or a new one.
        Touches none of `host`'s fields (it may run on the reader thread): the file is read
        through a private view of the new segment."""
        read = []

        def fill(segment: host_segments.Segment) -> None:  # a new segment reads as zeros
            view = HostAdapter(host.spec, host.layout, host.dtype, segment)
            try:
                read_into(view, *source)


            finally:
                view._flat = None  # no export left: the segment can be closed
            read.append(True)

        try:
            return host_segments.attach_or_make(host._name, host.nbytes, fill), bool(read)
        except OSError as e:
            raise AdapterError(f"adapter {host.spec.name!r}: cannot map its host segment: {e}", 507) from e

    def _install(self, host: HostAdapter, segment: host_segments.Segment, read: bool) -> None:
        host._map(segment)
        try:
            if self.pin:
                host.pin()
        except Exception:
            host.unmap()
            raise
        self._mapped[host.spec.name] = host
        self.mapped_bytes += host.nbytes
        # a read from the file, or a copy another instance of this host had mapped already
        self.counters["host_reads" if read else "host_shared_hits"] += 1
        self.counters["host_read_bytes"] += host.nbytes if read else 0

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
