"""DeviceLink: copies adapters host -> device pool, layer group by layer group, in priority order.

- `CudaLink`: asynchronous copies from page-locked host memory on a side stream; an event per
  layer group marks residency; the compute stream never blocks on the link.
- `EmulatedLink(bandwidth, latency)`: for machines without a GPU. The copy itself is a real
  memcpy into the pool, but a layer group becomes resident no earlier than
  `latency + bytes / bandwidth` after its transfer began, transfers are serial (one link), so
  the GPU regime where loading an adapter outlasts a prefill is reproduced on a CPU. Every
  number measured with it is labelled `emulated`.

Loads are served one layer group at a time from a priority queue (lower value first: the
arrival time of the earliest request waiting on that adapter), so a load that a waiting request
needs can overtake a prefetch.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod

import torch

from caraserve_router.lora.adapter_pool import AdapterPool, PoolEntry
from caraserve_router.lora.adapter_store import HostAdapter
from caraserve_router.lora.residency import CudaResidency, EmulatedResidency

log = logging.getLogger("caraserve.link")


def unit_index(pool: AdapterPool, entry: PoolEntry, host: HostAdapter) -> torch.Tensor:
    """int64 [host units per layer] on the pool's device: the pool unit that each unit of one
    layer of `host`'s segment goes to. The same for every layer (an adapter's rows sit at the same
    units in each), so it is built once per placement and cached on the entry."""
    if entry.unit_index is not None:
        return entry.unit_index
    unit, layout = pool.unit, host.layout
    index = torch.full((layout.layer_floats() // unit,), -1, dtype=torch.int64)
    for block in entry.blocks:
        offset, (_, row_len) = layout.block(0, block.group, "A" if block.which == "A" else block.slice)
        if block.which == "A":  # the group's lora_A rows hold every slice's, in slice order
            offset += sum(layout.slice_ranks(block.group)[: block.slice]) * row_len
        per_row = row_len // unit  # unit: the gcd of every row width
        units = torch.arange(per_row)
        host_units = offset // unit + torch.arange(len(block.starts))[:, None] * per_row + units    # [r, per_row]
        index[host_units.view(-1)] = (torch.tensor(block.starts)[:, None] + units).view(-1)
    if bool((index < 0).any()):
        raise RuntimeError(f"adapter {entry.name!r}: its pool blocks do not cover its host layout")
    if pool.device.type == "cuda":  # page-locked: a pageable copy would wait for the link's queued copies
        index = index.pin_memory()
    entry.unit_index = index.to(pool.device, non_blocking=True)
    return entry.unit_index


def copy_layers(pool: AdapterPool, entry: PoolEntry, host: HostAdapter, layers: range, non_blocking=False) -> int:
    """Copy `layers` (consecutive) of `host` into the entry's units; returns the bytes moved (its
    tensors' bytes: only the slices it targets, each at its own rank).

    One copy of the layers' contiguous bytes (host -> device on CUDA) and one `index_copy_` into
    the pool, whatever the number of slices and runs. A copy per block and run (6 a layer for a
    q,k,v adapter) cost the H200's link thread several times the 2.4 ms the bytes took."""
    start, _ = host.layout.layer_range(layers.start)
    _, end = host.layout.layer_range(layers.stop - 1)
    src = host.flat[start:end].view(len(layers), -1, pool.unit)              # [layers, host units, UNIT]
    if src.device != pool.W.device or src.dtype != pool.W.dtype:
        src = src.to(pool.W.device, pool.W.dtype, non_blocking=non_blocking)
    pool.W[layers.start : layers.stop].index_copy_(1, unit_index(pool, entry, host), src)
    return (end - start) * host.flat.element_size()


def layer_groups(num_layers: int, group_size: int) -> list:
    """Consecutive layer ranges of `group_size` layers (the last may be shorter)."""
    return [range(s, min(s + group_size, num_layers)) for s in range(0, num_layers, group_size)]


class _Job:
    __slots__ = ("entry", "host", "groups", "next", "on_done", "failed")

    def __init__(self, entry: PoolEntry, host: HostAdapter, group_size: int, num_layers: int):
        self.entry, self.host = entry, host
        self.groups = layer_groups(num_layers, group_size)
        self.next = 0
        self.on_done = None
        self.failed = False


class DeviceLink(ABC):
    emulated: bool = False

    def __init__(self, pool: AdapterPool, group_size: int):
        self.pool = pool
        self.group_size = group_size
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self.bytes_moved = 0
        self.groups_moved = 0
        self.busy_s = 0.0
        self._current = None  # the job of the group being copied (ms_ahead)
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()

    @abstractmethod
    def new_residency(self):
        """A residency object of this link's kind for a new pool entry."""

    @abstractmethod
    def _transfer(self, job: _Job, layers: range) -> None:
        """Move one layer group and mark it resident (called on the link thread)."""

    def _drain(self) -> None:
        """Wait until every group this thread queued has landed (before a job's on_done, which
        releases the host copy the copies read)."""

    def submit(self, entry: PoolEntry, host: HostAdapter, priority: float, on_done=None) -> None:
        """Queue the load of `host` into `entry`; `on_done()` runs on the link thread after its
        last layer group (or a failure)."""
        job = _Job(entry, host, self.group_size, self.pool.shapes.num_layers)
        job.on_done = on_done
        with self._cv:
            heapq.heappush(self._heap, (priority, next(self._seq), job))
            self._cv.notify()

    def load_now(self, entry: PoolEntry, host: HostAdapter) -> None:
        """Synchronous full copy (cached mode's preload); resident at once."""
        for layers in layer_groups(self.pool.shapes.num_layers, self.group_size):
            # a group at a time: on CUDA copy_layers stages its bytes on the device
            self.bytes_moved += copy_layers(self.pool, entry, host, layers)
        if self.pool.device.type == "cuda":
            torch.cuda.synchronize(self.pool.device)  # the pool's GPU, not whichever is current
        entry.residency.mark_all_now()

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def ms_ahead(self, entry: PoolEntry, bytes_per_ms: float) -> float:
        """Link time before `entry`'s next layer group starts: the groups still queued of the loads
        ahead of it (served whole, in priority order) and the rest of another load's group in
        flight; 0 when `entry` has no queued load. `auto`'s rule adds it to the load's own time."""
        layers = self.pool.shapes.num_layers
        with self._cv:
            queue = sorted(self._heap, key=lambda item: item[:2])
            current = self._current
        ahead = 0.0
        for _, _, job in queue:
            if job.entry is entry:
                break
            left = sum(len(g) for g in job.groups[job.next:])
            ahead += job.host.nbytes * left / layers  # what the copies move (copy_layers' bytes)
        else:
            return 0.0
        in_flight = self._in_flight_ms() if current is not None and current.entry is not entry else 0.0
        return ahead / bytes_per_ms + in_flight

    def _in_flight_ms(self) -> float:
        """The rest of the group being copied now, in ms (0 where copies are asynchronous)."""
        return 0.0

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._drain()  # the copies of an unfinished load still read its host copy

    def _next_group(self):
        with self._cv:
            while not self._heap and not self._stop:
                self._cv.wait()
            if self._stop:
                return None, None
            priority, seq, job = self._heap[0]
            layers = job.groups[job.next]
            job.next += 1
            if job.next == len(job.groups) or job.failed:
                heapq.heappop(self._heap)
            return job, layers

    def _run(self) -> None:
        while True:
            job, layers = self._next_group()
            if job is None:
                return
            self._current = job
            start = time.monotonic()
            try:
                self._transfer(job, layers)
            except Exception:  # noqa: BLE001 - a failed copy must not kill the link
                log.exception("copy of adapter %s layers %s failed", job.entry.name, list(layers))
                job.entry.residency.failed = True
                job.failed = True
            self.busy_s += time.monotonic() - start
            self._current = None
            self.groups_moved += 1
            if (job.next == len(job.groups) or job.failed) and job.on_done is not None:
                done, job.on_done = job.on_done, None
                try:
                    self._drain()
                except Exception:  # noqa: BLE001 - a device error: done() must still release the host copy
                    log.exception("waiting for the copies of adapter %s", job.entry.name)
                try:
                    done()
                except Exception:  # noqa: BLE001
                    log.exception("after the load of adapter %s", job.entry.name)


class EmulatedLink(DeviceLink):
    emulated = True

    def __init__(self, pool: AdapterPool, group_size: int, bandwidth_mbps: float, latency_us: float):
        self.bandwidth = bandwidth_mbps * 1e6  # bytes / s
        self.latency = latency_us * 1e-6
        self.free_at = 0.0
        super().__init__(pool, group_size)

    def new_residency(self):
        return EmulatedResidency(self.pool.shapes.num_layers)

    def _in_flight_ms(self) -> float:
        return max(0.0, self.free_at - time.monotonic()) * 1e3

    def _transfer(self, job: _Job, layers: range) -> None:
        start = max(time.monotonic(), self.free_at)
        moved = copy_layers(self.pool, job.entry, job.host, layers)
        end = start + self.latency + moved / self.bandwidth
        self.free_at = end
        self.bytes_moved += moved
        job.entry.residency.mark(layers, max(end, time.monotonic()))
        delay = end - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the link is busy with this group until then


class CudaLink(DeviceLink):
    # Layer groups queued on the link's stream before the link thread waits for the oldest. On the
    # H200 one host round trip per group (wake-up, event wait) took longer than a layer's copy, so
    # waiting for every group left the link idle most of a load; a few in flight keep it busy,
    # and a load that a waiting request needs still overtakes a prefetch within this many groups.
    IN_FLIGHT = 4

    def __init__(self, pool: AdapterPool, group_size: int):
        self.stream = torch.cuda.Stream(device=pool.device)
        self._in_flight: collections.deque = collections.deque()  # events of queued groups, oldest first
        super().__init__(pool, group_size)

    def new_residency(self):
        return CudaResidency(self.pool.shapes.num_layers, self.pool.device)

    def submit(self, entry: PoolEntry, host: HostAdapter, priority: float, on_done=None) -> None:
        # Rows may have belonged to an evicted adapter that kernels already enqueued still read.
        entry.reuse_fence = torch.cuda.current_stream(self.pool.device).record_event()
        super().submit(entry, host, priority, on_done)

    def _transfer(self, job: _Job, layers: range) -> None:
        with torch.cuda.stream(self.stream):
            fence = getattr(job.entry, "reuse_fence", None)
            if fence is not None:
                self.stream.wait_event(fence)
            self.bytes_moved += copy_layers(self.pool, job.entry, job.host, layers, non_blocking=True)
            event = self.stream.record_event()
        job.entry.residency.mark(layers, event)
        self._in_flight.append(event)
        while len(self._in_flight) > self.IN_FLIGHT:
            self._in_flight.popleft().synchronize()  # this thread only

    def _drain(self) -> None:
        while self._in_flight:
            self._in_flight.popleft().synchronize()


LINKS = {
    "emulated": lambda pool, cfg: EmulatedLink(pool, cfg.layer_group_size, cfg.link_bandwidth_mbps, cfg.link_latency_us),
    "cuda": lambda pool, cfg: CudaLink(pool, cfg.layer_group_size),
}


def make_link(pool: AdapterPool, lora_config) -> DeviceLink:
    kind = lora_config.link
    if kind == "auto":
        kind = "cuda" if pool.device.type == "cuda" else "emulated"
    if kind == "cuda" and pool.device.type != "cuda":
        raise ValueError("link 'cuda' needs the cuda device")
    link = LINKS[kind](pool, lora_config)
    if link.emulated:
        log.info("adapter link: emulated, %.0f MB/s, %.0f us latency, %d layer(s) per copy",
                 lora_config.link_bandwidth_mbps, lora_config.link_latency_us, lora_config.layer_group_size)
    return link
