"""LoraRuntime: everything LoRA inside one model worker.

Owns the AdapterStore (host), AdapterPool (device), DeviceLink, the CPU sidecar (cpu-assist
mode) and the mode. The backend calls it per request (`attach_request` / `detach_request`) and
per step (`build_batch` / `after_forward`); the router calls it, in process, as the
instance's `AdapterManager` and for admission.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Optional

import torch

from caraserve_router.contracts.adapters import AdapterRequest, check_adapter_name
from caraserve_router.contracts.device_kind import kind_name
from caraserve_router.lora.adapter_names import AdapterNames, preflight, scrub
from caraserve_router.lora.adapter_pool import AdapterPool
from caraserve_router.lora.adapter_store import AdapterError, AdapterStore
from caraserve_router.lora.batch import LoraBatch
from caraserve_router.lora.device_link import make_link
from caraserve_router.lora.modes import AutoMode, mode_for
from caraserve_router.lora.resolver import AdapterResolver, pool_mb
from caraserve_router.contracts.names import DecodeKernel, LoraMode
from caraserve_router.lora.shapes import ModelShapes
from caraserve_router.lora.step_context import LoraStepContext
from caraserve_router.lora.tp_shard import TpShard

log = logging.getLogger("caraserve.lora")


class LoraRuntime:
    """Implements `contracts.adapters.AdapterManager` (add / remove / pin / unpin / list / stats)
    for the router's control calls, plus the admission calls of the router's queue (`admit`,
    `prefetch`, `is_known`, `begin_admission`) and the per-request / per-step calls of the
    backend. Adapters are known by name; pool, store and sidecar entries by storage key
    (`AdapterNames`: several names of one directory share one key)."""

    def __init__(self, config, model):
        self.config = config
        lora = config.lora
        # Under tensor parallelism (LightLLM's tp_rank_ / world_size_) this rank's pool, host
        # segments, link and sidecar carry only its shard of every adapter (lora/tp_shard.py).
        self.shard = TpShard(model.tp_rank_, model.world_size_)
        self.shapes = self.shard.shapes(ModelShapes.from_config(model.config))  # this rank's
        self.device = model.device
        self.store = AdapterStore(ModelShapes.from_config(model.config), model.data_type, config.adapter_store_prefix,
                                  lora.max_rank, pin=self.device.type == "cuda",
                                  cache_bytes=int(lora.host_cache_mb * 2**20) if lora.host_cache_mb else None,
                                  shard=self.shard)
        self.mode: LoraMode = lora.mode  # the configured mode; `policy` is its decisions (lora/modes.py)
        self.decode_kernel: DecodeKernel = lora.decode_kernel
        self.pool = AdapterPool(self.shapes, model.data_type, self.device, pool_mb(lora, self.device), lora.max_rank)
        self.resolver = AdapterResolver(lora.adapter_dir) if lora.adapter_dir else None
        self.link = make_link(self.pool, lora)
        self.policy = mode_for(self.mode)
        from caraserve_router.lora.auto_mode import measure_link

        # the link's rate, measured now (emulated: its configured rate): the profile's load cost
        self.link_bytes_per_ms, _ = measure_link(self.link, self.pool, lora)
        self.device_kind = kind_name(self.device.type, torch.cuda.get_device_name(self.device)
                                     if self.device.type == "cuda" else "")
        self.auto = None  # auto mode: chooses on-demand / pipeline / cpu-assist per cold load
        if self.mode is LoraMode.AUTO:
            from caraserve_router.lora.auto_mode import AutoChooser

            self.auto = AutoChooser(self, lora)
            self.policy = AutoMode(self.auto.choices)
        self._step_started = 0.0
        # what every step's LoraBatch reads of this instance, frozen (step_context.py)
        self.step_context = LoraStepContext.build(self.pool, self.shapes, self.decode_kernel)
        self.sidecar = self._start_sidecar(config, model) if self.mode.uses_sidecar else None
        if self.sidecar is not None:  # the workers read an adapter's host bytes while they are mapped
            self.store.max_mapped = self.sidecar.layout.max_adapters
            self.store.on_map = self.sidecar.register_adapter
            self.store.on_unmap = self.sidecar.unregister_adapter
        self.load_s = 0.0  # host->device loads, submit to last layer (queueing included)
        self.register_s = 0.0  # registrations (config and header checks)
        self.names = AdapterNames()
        self.request_adapter: dict[int, str] = {}  # request id -> storage key
        # Since start: loads, warm/cold requests, and every step's counters (LoraBatch.counters).
        self.counters = collections.Counter()
        self._prefetching: set = set()  # keys whose host read a request's arrival started (prefetch)
        self._last_batch: Optional[LoraBatch] = None  # the next decode step may reuse its prepared ops
        log.info("LoRA pool: %.1f MiB (%d units of %d elements per layer), mode %s, decode %s",
                 self.pool.bytes_total / 2**20, self.pool.num_units, self.pool.unit, self.mode, self.decode_kernel)

    def _start_sidecar(self, config, model):
        from caraserve_router.lora.sidecar import CpuLoraSidecar

        sidecar = CpuLoraSidecar(config.sidecar, self.shapes, model.data_type, config.shm_prefix,
                                 max_tokens=config.max_req_total_len * 2)
        sidecar.start()
        if self.device.type == "cuda":
            sidecar.pin_memory()  # page-lock now, not inside the first cold prefill
        return sidecar

    # ---- registration (AdapterManager) --------------------------------------------------------

    def add(self, name: str, path: str) -> dict:
        """Register the PEFT adapter at `path` (absolute) as `name`; a directory already held under
        another name is not read again (the new name is an alias of that copy)."""
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise AdapterError(str(e)) from None
        if name in self.names:
            raise AdapterError(f"adapter {name!r} is already registered", status=409)
        started = time.monotonic()
        real = preflight(name, path)
        key = self.names.key_for_dir(real)
        if key is None:
            key = self.names.new_key(name, taken=self.store.__contains__)
            self._load_host(name, key, (path, real, os.path.abspath(path)), real)
        self.names.bind(name, key, real)
        self.register_s += time.monotonic() - started
        return self.info(name)

    def _load_host(self, name: str, key: str, paths: tuple, real: str) -> None:
        try:
            host = self.store.add(key, real)
        except AdapterError as e:
            raise scrub(e, name, paths) from None
        try:  # (the sidecar learns of the host bytes when they are mapped: store.on_map)
            if self.mode.preloads:
                self._preload(host)
        except Exception:
            self._drop(key)
            raise

    def _preload(self, host) -> None:
        entry = self.pool.place(host, self.link.new_residency())
        if entry is None:
            raise AdapterError(
                f"cached mode keeps every adapter on the device, and the pool ({self.pool.bytes_total / 2**20:.0f} "
                f"MiB) has no room for {host.spec.name!r}: raise --lora-pool-mb", 507)
        self.store.acquire(host.spec.name)
        try:
            self.link.load_now(entry, host)
        finally:
            self.store.release(host.spec.name)
        self.pool.set_pinned(host.spec.name, True)

    def remove(self, name: str) -> bool:
        """Forget `name`; its host copy goes with its last name (409 while requests use it)."""
        key = self.names.key(name)  # 404 if unknown
        if len(self.names.names_of(key)) == 1:
            entry = self.pool.get(key)
            if entry is not None and entry.refs > 0:
                raise AdapterError(f"adapter {name!r} is in use by {entry.refs} request(s)", 409)
            if entry is not None and not entry.residency.all_ready():
                raise AdapterError(f"adapter {name!r} is being loaded; retry", 409)
        _, last = self.names.unbind(name)
        if last:
            self._drop(key)
        return True

    def _drop(self, key: str) -> None:
        if key in self.pool:
            self.pool.remove(key)
        if self.sidecar is not None:
            self.sidecar.unregister_adapter(key)
        if key in self.store:
            self.store.remove(key)

    def info(self, name: str) -> dict:
        return {**self.store.get(self.names.key(name)).spec.info(), "lora_int_id": self.names.id(name)}

    def list(self) -> dict:
        return {n: self.info(n) for n in self.names.names()}

    def is_known(self, name: str) -> bool:
        return name in self.names

    def resolve(self, name: str) -> dict:
        """The adapter's info, registering DIR/name first when it is unknown and the resolver
        (`--lora-adapter-dir`) is on. AdapterError: 400 for a name that is not a plain directory
        name or a bad adapter, 404 when there is no such adapter."""
        if name in self.names:
            return self.info(name)
        if self.resolver is None:
            raise AdapterError(f"adapter {name!r} is not registered", 404)
        info = self.add(name, self.resolver.path(name))
        self.counters["resolved"] += 1
        return info

    def pin(self, name: str) -> bool:
        if not self.admit(name):
            raise AdapterError(f"no room in the pool to pin {name!r}", 507)
        self.pool.set_pinned(self.names.key(name), True)
        return True

    def unpin(self, name: str) -> bool:
        key = self.names.key(name)
        if self.pool.get(key) is not None and not self.mode.preloads:
            self.pool.set_pinned(key, False)
        return True

    # ---- admission and loading ---------------------------------------------------------------

    def begin_admission(self) -> None:
        """A new batch is being formed: adapters admitted from now on stay in the pool until
        the batch's requests attach to them (placing one adapter must not evict another that
        was admitted a moment earlier for the same batch)."""
        self.pool.protected.clear()

    def admit(self, name: str) -> bool:
        """Is `name` resident or placeable now? Starts its load if it was not on the device."""
        if name not in self.names:
            return True  # the router fails such a request; it must not block the queue
        key = self.names.key(name)
        self.pool.protected.add(key)
        if key in self.pool:
            self.pool.touch(key)
            return True
        return self._start_load(key)

    def prefetch(self, name: str) -> bool:
        """Start loading `name` on a request's arrival (when `--lora-prefetch` is on); unlike
        `admit` it protects nothing: a prefetched adapter stays evictable. When its host bytes
        must be read first, the copy starts once the read is done (`poll_prefetches`)."""
        if not self.config.lora.prefetch or name not in self.names:
            return False
        key = self.names.key(name)
        if key in self.pool:
            return False
        if self._start_load(key):
            return True
        if self.store.reading(key):
            self._prefetching.add(key)
        return False

    def map_host(self, name: str) -> None:
        """Map `name`'s host bytes now, waiting for the read (callers without a serving loop)."""
        self.store.materialize(self.names.key(name))

    def poll_prefetches(self) -> None:
        """Start the device copy of prefetched adapters whose host read has finished (each step)."""
        for key in list(self._prefetching):
            if key in self.store and key not in self.pool and self.store.read_running(key):
                continue
            self._prefetching.discard(key)
            if key in self.store and key not in self.pool:
                self._start_load(key)  # installs the read's bytes; a bad file refuses the adapter there

    def _host_ready(self, key: str) -> bool:
        """Are `key`'s bytes mapped on the host? If not, their read runs on the store's reader
        thread (started here once) and this says False until it is done, so the thread that
        serves requests never stalls on a file. Raises the read's AdapterError."""
        return self.store.start_read(key) or self.store.finish_read(key)

    def _refuse(self, key: str, error: AdapterError) -> bool:
        """The file changed or holds NaN: refuse the adapter from now on."""
        log.error("adapter %s dropped: %s", key, error)
        for name in self.names.names_of(key):
            self.names.unbind(name)
        self._drop(key)
        self._prefetching.discard(key)
        return True  # not registered any more: the router fails its requests

    def _start_load(self, key: str) -> bool:
        """Place `key` in the pool and start its copy; False when the pool has no room or its
        host bytes are still being read."""
        try:
            if not self._host_ready(key):
                return False
        except AdapterError as e:
            return self._refuse(key, e)
        host = self.store.get(key)
        entry = self.pool.place(host, self.link.new_residency())
        if entry is None:
            return False
        started = time.monotonic()
        try:
            self.store.acquire(key)  # host bytes held until copied (read again if released meanwhile)
        except AdapterError as e:
            return self._refuse(key, e)
        self.link.submit(entry, host, priority=started, on_done=lambda: self._loaded(key, started))
        self.counters["loads_cold"] += 1
        self.counters["load_bytes"] += self.pool.entry_bytes(entry)
        return True

    def _loaded(self, key: str, started: float) -> None:
        self.store.release(key)
        self.load_s += time.monotonic() - started

    # ---- requests and steps --------------------------------------------------------------------

    def attach_request(self, r_id: int, adapter: Optional[AdapterRequest]) -> None:
        if adapter is None:
            return
        key = self.names.key(adapter.name)
        if key not in self.pool:  # not admitted first (the router admits; drivers may not): read now
            self.map_host(adapter.name)
        if key not in self.pool and not self.admit(adapter.name):
            raise AdapterError(f"adapter {adapter.name!r} could not be placed in the pool", 503)
        entry = self.pool.acquire(key)  # the reference now keeps it; the admission guard can go
        self.pool.protected.discard(key)
        self.request_adapter[r_id] = key
        self.counters["requests_warm" if entry.residency.all_ready() else "requests_cold"] += 1

    def detach_request(self, r_id: int) -> None:
        adapter = self.request_adapter.pop(r_id, None)
        if adapter is not None:
            self.pool.release(adapter)

    def request_rank(self, r_id: int) -> int:
        key = self.request_adapter.get(r_id)
        return self.store.get(key).spec.rank if key is not None and key in self.store else 0

    def slice_ranks(self, entry, group: str) -> tuple:
        if entry is None:
            return (0,) * self.shapes.group(group).num_slices
        return self.store.get(entry.name).spec.slice_ranks[group]

    def build_batch(self, reqs, kwargs) -> Optional[LoraBatch]:
        if self._prefetching:
            self.poll_prefetches()
        names = [self.request_adapter.get(r.r_id) for r in reqs]
        if not any(names):
            return None
        entries = [self.pool.get(n) if n else None for n in names]
        seg_lens = None
        if kwargs["is_prefill"]:
            seg_lens = (kwargs["b_seq_len"] - kwargs["b_ready_cache_len"]).tolist()
        if self.auto is not None:
            self.auto.decide(entries, seg_lens)
            self._step_started = time.monotonic()
        batch = LoraBatch(self.step_context, entries, kwargs["is_prefill"], seg_lens, self.policy, self.sidecar,
                          previous=self._last_batch)
        self._last_batch = batch
        batch.start()
        return batch

    def after_forward(self, batch: Optional[LoraBatch]) -> None:
        """Postprocess a step (also a failed one): disarm the sidecar, keep the step's counters."""
        if batch is not None:
            batch.finish()
            if self.auto is not None:
                self.auto.observe_step(batch, time.monotonic() - self._step_started)
            self.counters.update(batch.counters)

    # ---- introspection -------------------------------------------------------------------

    def stats(self) -> dict:
        resident = [  # one row per name: the scheduler knows adapters by the names clients use
            {"name": name, "rank": e.rank, "refs": e.refs, "pinned": e.pinned, "loaded": e.residency.all_ready()}
            for e in self.pool.entries.values() for name in self.names.names_of(e.name)
        ]
        return {
            "mode": self.mode.value,
            "tp": self.shard.size,  # the instance's tensor-parallel size (these stats are rank 0's shard)
            "link": "emulated" if self.link.emulated else "cuda",
            "device_kind": self.device_kind,
            "link_measured_mb_s": self.link_bytes_per_ms / 1e3,
            "num_layers": self.shapes.num_layers,
            "registered": self.names.names(),
            "host_copies": len(self.store.names()),
            "resident": resident,
            # full-rank-row equivalents, both rounded down (a ceiling here could read one page
            # more than pages_total when the pool is full to its last unit)
            "pages_used": self.pool.bytes_used // self.page_bytes,
            "pages_total": self.pool.bytes_total // self.page_bytes,
            "loads": {"cold": self.counters["loads_cold"], "warm_requests": self.counters["requests_warm"],
                      "cold_requests": self.counters["requests_cold"],
                      "cpu_assisted_steps": self.counters["cpu_assisted_steps"]},
            "counters": dict(self.counters),
            "link_bytes": self.link.bytes_moved,
            "page_bytes": self.page_bytes,
            "residency": self.residency_stats(),
            "link_bandwidth_mbps": self.config.lora.link_bandwidth_mbps if self.link.emulated else None,
            "link_latency_us": self.config.lora.link_latency_us if self.link.emulated else None,
            "sidecar": self.sidecar.stats() if self.sidecar is not None else None,
            "auto": self.auto.stats() if self.auto is not None else None,
        }

    @property
    def page_bytes(self) -> int:
        """Bytes of one rank row on all seven projections over all layers (the old page size)."""
        return self.shapes.floats_per_rank_per_layer() * self.shapes.num_layers * self.pool.dtype.itemsize

    def residency_stats(self) -> dict:
        """Adapters registered / mapped on host / resident on device, their bytes, loads,
        evictions, device hit rate, time spent loading."""
        host = self.store.stats()
        warm, cold = self.counters["requests_warm"], self.counters["requests_cold"]
        return {
            "registered": len(self.names.names()), "host_copies": host["registered"],
            "mapped_on_host": host["mapped_on_host"],
            "host_bytes": host["host_bytes"], "host_budget_bytes": host["host_budget_bytes"],
            "host_reads": host.get("host_reads", 0), "host_evictions": host.get("host_evictions", 0),
            # mapped from the copy another instance of this host had made: no file read
            "host_shared_hits": host.get("host_shared_hits", 0),
            "resident_on_device": len(self.pool.entries), "device_bytes": self.pool.bytes_used,
            "device_budget_bytes": self.pool.bytes_total,
            "device_loads": self.counters["loads_cold"], "device_load_bytes": self.counters["load_bytes"],
            "device_evictions": self.pool.evictions,
            "device_hit_rate": warm / (warm + cold) if warm + cold else None,
            "load_s": self.load_s, "register_s": self.register_s, "resolved": self.counters["resolved"],
        }

    def shutdown(self) -> None:
        self.link.stop()
        if self.sidecar is not None:
            self.sidecar.stop()
        self.store.close()
