"""CpuLoraSidecar: the engine side of CaraServe's CPU-assisted prefill.

While a cold adapter is copied to the device, the engine asks the sidecar, layer by layer and
group by group, for the LoRA delta `x @ A^T @ B^T` (scale folded into B) of the rows whose
adapter layer is not resident yet, and adds it to the base projection's output. The work is
done by k worker processes (`sidecar_worker.py`), each pinned to a core, which poll integer
flags in one shared-memory segment (`sidecar_shm.py`); no pipe, queue or lock is on the
per-call path.

Per call (`compute`): pack the rows of the segments into the shared input buffer (CPU: a
memcpy; CUDA: an async device->host copy into the page-locked segment), write the job
descriptor, bump the job word of each participating worker (CUDA: a device->host copy of a
device-side sequence number queued on the same stream, so it lands after `x` with no host
synchronisation), wait for every participant's done word (bounded by the deadline), then add
the deltas to `out` (CUDA: one async host->device copy, then the adds). A dead, failing or
late worker makes the call return False with `out` untouched; the worker is replaced and the
engine falls back to waiting for the device copy.

How many workers a call uses comes from `c`, the tokens one core handles per layer within a
budget (`SidecarConfig.tokens_per_core`, or profiled at start): ceil(rows / c), at most the
ready workers, as in the paper.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing import shared_memory
from typing import Optional

import numpy as np
import torch

from caraserve_router.contracts.configs import SidecarConfig
from caraserve_router.lora.adapter_store import AdapterSpec, HostAdapter, HostLayout
from caraserve_router.lora.shapes import GROUPS, ModelShapes
from caraserve_router.lora.sidecar_shm import H_ARM_SEQ, H_ARMED, H_STOP, ControlBlock, ControlLayout, flat_slice_ranks, max_features

log = logging.getLogger("caraserve.sidecar")

START_TIMEOUT_S = 120.0  # k fresh processes importing torch on a loaded machine
STOP_GRACE_S = 1.0  # workers see the stop word within a few ms; then they are killed
KILL_WAIT_S = 2.0
# The waiting engine polls the done words ENGINE_SPIN_POLLS times (about 50 us: a round trip
# and small jobs end within it), then naps ENGINE_NAP_S (about 70 us with Linux's default
# timer slack) between polls. Napping matters whenever the kernel puts the engine on a core a
# worker is pinned to: a nap hands that core over at once, where spinning or sched_yield lets
# every other busy process run first (measured on 2 loaded cores: a longer 1 ms spin made the
# median round trip 1.1 ms instead of 13 us in such a run).
ENGINE_SPIN_POLLS = 100
ENGINE_NAP_S = 20e-6
LIVENESS_PERIOD_S = 0.001  # how often a waiting engine checks that participants are alive
FLAG_LANDING_LIMIT_S = 30.0  # CUDA: a flag still not landed after this is given up on
RESTART_BACKOFF_S = (0.0, 0.5, 10.0)  # first, second and cap of the delay after failed starts
LATENCY_WINDOW = 4096  # calls kept for the latency percentiles
PROFILE_RANK = 16
PROFILE_LAYER_BUDGET_MS = 1.0  # per layer (all four groups) per core; see profile_tokens_per_core
PROFILE_SIZES = (16, 128)
PROFILE_REPEATS = 15
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def split_rows(rows: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous, balanced (start, end) row ranges, one per worker (sizes differ by <= 1)."""
    base, extra = divmod(rows, workers)
    ranges, start = [], 0
    for i in range(workers):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def workers_for(rows: int, tokens_per_core: int, available: int) -> int:
    """The paper's split: ceil(rows / c) cores, at least 1, at most the available workers."""
    return max(1, min(available, math.ceil(rows / max(1, tokens_per_core))))


class WorkerProcess:
    """One worker slot: the process in it (replaced on failure) and its restart backoff."""

    def __init__(self, index: int, cpu: int, command: list):
        self.index = index
        self.cpu = cpu
        self.command = command
        self.proc: Optional[subprocess.Popen] = None
        self.was_ready = False
        self.failed_starts = 0
        self.spawn_at = 0.0  # monotonic time of a deferred spawn

    def spawn(self, ctl: ControlBlock) -> None:
        ctl.words[ctl.pid_word(self.index)] = 0  # not ready until the new process says so
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, close_fds=True)
        self.was_ready = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self, ctl: ControlBlock) -> bool:
        if self.proc is None or ctl.words[ctl.pid_word(self.index)] != self.proc.pid or not self.alive():
            return False
        if not self.was_ready:
            self.was_ready, self.failed_starts = True, 0
        return True

    def kill(self) -> None:
        """SIGKILL and reap, so a late worker can never write into a later job's output."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("sidecar worker %d (pid %d) did not die after SIGKILL", self.index, self.proc.pid)
        if not self.was_ready:
            self.failed_starts += 1
        self.proc = None

    def restart_delay(self) -> float:
        first, second, cap = RESTART_BACKOFF_S
        if self.failed_starts == 0:
            return first
        return min(cap, second * 2 ** (self.failed_starts - 1))

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None


class CallStats:
    """Counters and a window of call latencies."""

    def __init__(self):
        self.calls = 0
        self.rows = 0
        self.fallbacks: collections.Counter = collections.Counter()
        self.restarts = 0
        self.latencies: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)

    def success(self, rows: int, seconds: float) -> None:
        self.calls += 1
        self.rows += rows
        self.latencies.append(seconds)

    def as_dict(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "calls": self.calls,
            "rows": self.rows,
            "fallbacks": sum(self.fallbacks.values()),
            "fallback_reasons": dict(self.fallbacks),
            "restarts": self.restarts,
            "mean_ms": 1e3 * sum(lat) / len(lat) if lat else None,
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        }


class _Job:
    """One packed call: the rows of the segments, back to back in the shared buffers."""

    __slots__ = ("layer", "group", "pieces", "rows")

    def __init__(self, layer: int, group: str, pieces: list, rows: int):
        self.layer, self.group = layer, group
        self.pieces = pieces  # [(row start in x/out, row end, slot, packed row start)]
        self.rows = rows

    def descriptor_segments(self) -> list:
        return [(pos, pos + end - start, slot) for start, end, slot, pos in self.pieces]


class _Ticket:
    """A submitted job, between `submit` and `collect`."""

    __slots__ = ("job", "x", "posted", "participants", "seq", "on_cuda", "start")

    def __init__(self, job: _Job, x: Optional[torch.Tensor]):
        self.job, self.x = job, x
        self.posted = False
        self.participants, self.seq, self.on_cuda, self.start = [], 0, False, 0.0


class _CudaPath:
    """The device half of a call when `x` lives on a CUDA device (not runnable on a CPU host).

    - The whole segment is page-locked once (cudaHostRegister), so copies to and from it are
      truly asynchronous DMA.
    - Input: the rows are packed on the device (one cat) and copied device->host with
      non_blocking=True on the current stream.
    - Signal: a device int64 tensor is filled with the sequence number and copied into the
      participants' job words on the same stream: the words change only after `x` has landed,
      and the host never waits for the stream.
    - Output: one non_blocking host->device copy of the deltas, then the adds, on the stream.
      The next job's flags are queued behind that copy, so workers cannot overwrite the
      output buffer before the copy has read it. Host-signalled jobs (profiling, round trips)
      first wait for an event recorded after the last such copy.
    """

    def __init__(self, ctl: ControlBlock):
        self.ctl = ctl
        self.base = torch.frombuffer(ctl.shm.buf, dtype=torch.uint8, count=ctl.layout.total_bytes)
        self.registered = False
        self.seq: dict = {}  # device -> int64 [workers]
        self.last_copy: Optional[torch.cuda.Event] = None

    def register(self) -> None:
        if self.registered:
            return
        err = torch.cuda.cudart().cudaHostRegister(self.base.data_ptr(), self.ctl.layout.total_bytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the sidecar segment failed (error {int(err)})")
        self.registered = True

    def stage_input(self, x: torch.Tensor, job: _Job, in_features: int) -> None:
        host = self.ctl.input_rows(job.rows, in_features)  # [rows, IN], pinned
        parts = [x[start:end] for start, end, _, _ in job.pieces]
        packed = parts[0] if len(parts) == 1 else torch.cat(parts)  # [rows, IN] on the device
        host.copy_(packed.to(host.dtype), non_blocking=True)

    def signal(self, workers: list, seq: int, device: torch.device) -> None:
        seqs = self.seq.get(device)
        if seqs is None:
            seqs = self.seq[device] = torch.zeros(self.ctl.layout.workers, dtype=torch.int64, device=device)
        seqs.fill_(seq)  # a kernel on the stream; the value is set in stream order
        for start, end in _runs(sorted(w.index for w in workers)):
            self.ctl.job_flags[start:end].copy_(seqs[: end - start], non_blocking=True)

    def apply_output(self, out: torch.Tensor, job: _Job, out_features: int) -> None:
        host = self.ctl.output_rows(job.rows, out_features)  # [rows, OUT], pinned
        delta = host.to(out.device, non_blocking=True)
        for start, end, _, pos in job.pieces:
            out[start:end] += delta[pos : pos + end - start]
        self.last_copy = torch.cuda.Event()
        self.last_copy.record()

    def drain(self) -> None:
        """Wait until no copy of ours is pending on the stream (fallbacks, host-signalled jobs)."""
        if self.last_copy is not None:
            self.last_copy.synchronize()
        if torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.base.data_ptr())
            self.registered = False
        self.base = None
        self.seq.clear()
        self.last_copy = None


# Host copies and adds of the CPU path go through numpy where it has the dtype: they are short,
# memory-bound, and torch would split them over an OpenMP team whose barrier then waits for a
# thread sharing a core with a polling worker (measured: 20 ms instead of 1 ms per call on 2 cores).
_NUMPY_DTYPES = (torch.float32, torch.float64)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.dtype == src.dtype and dst.dtype in _NUMPY_DTYPES:
        np.copyto(dst.numpy(), src.detach().numpy())
    else:
        dst.copy_(src)


def _add_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.dtype == src.dtype and dst.dtype in _NUMPY_DTYPES and not dst.requires_grad:
        view = dst.numpy()
        np.add(view, src.numpy(), out=view)
    else:
        dst += src


def _runs(indices: list) -> list:
    """Sorted indices as [start, end) runs of consecutive values."""
    runs = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


def _stop_weak(ref) -> None:
    sidecar = ref()
    if sidecar is not None:
        sidecar.stop()


class CpuLoraSidecar:
    """k pinned worker processes that compute LoRA deltas of layers not yet on the device."""

    def __init__(self, config: SidecarConfig, shapes: ModelShapes, dtype: torch.dtype, shm_prefix: str,
                 max_tokens: int, max_adapters: int = 4096, max_segments: int = 1024):
        config.validate()
        if max_tokens < 1 or max_adapters < 1 or max_segments < 1:
            raise ValueError("sidecar max_tokens, max_adapters and max_segments must be >= 1")
        if not shm_prefix:
            raise ValueError("sidecar needs a non-empty shm_prefix (its segment is <prefix>_sidecar)")
        self.config = config
        self.shapes = shapes
        self.dtype = dtype
        self.shm_prefix = shm_prefix
        self.max_tokens = max_tokens
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        self.num_workers = config.workers or max(1, len(cores))
        self.cores = cores
        max_in, max_out = max_features(shapes)
        self.layout = ControlLayout(workers=self.num_workers, max_tokens=max_tokens, max_in=max_in,
                                    max_out=max_out, max_segments=max_segments, max_adapters=max_adapters,
                                    dtype=dtype)
        self.tokens_per_core = config.tokens_per_core
        self.profile: Optional[dict] = None
        self._calls = CallStats()
        self._ctl: Optional[ControlBlock] = None
        self._workers: list[WorkerProcess] = []
        self._slots: dict[str, int] = {}  # adapter name -> table slot
        self._generation = 0
        self._seq = 0
        self._lock = threading.RLock()
        self._open_ticket = None  # a submitted job not collected yet
        self._cuda: Optional[_CudaPath] = None
        self._atexit = functools.partial(_stop_weak, weakref.ref(self))

    # ---- life cycle --------------------------------------------------------------------------

    @property
    def segment_name(self) -> str:
        return f"{self.shm_prefix}_sidecar"

    def start(self) -> None:
        """Create the segment, start the workers and wait until all are ready; profile `c` when
        `tokens_per_core` is 0. Raises RuntimeError (after cleaning up) if workers do not start."""
        with self._lock:
            if self._ctl is not None:
                return
            try:
                self._ctl = ControlBlock.create(self.segment_name, self.layout)
            except FileExistsError as e:
                raise RuntimeError(f"shared memory {self.segment_name!r} already exists: another instance uses "
                                   f"prefix {self.shm_prefix!r}, or a crashed one left it behind") from e
            atexit.register(self._atexit)
            self._workers = [WorkerProcess(i, self._core(i), self._command(i)) for i in range(self.num_workers)]
        try:
            for w in self._workers:
                w.spawn(self._ctl)
            self._wait_started(START_TIMEOUT_S)
            if self.tokens_per_core == 0:
                self.profile_tokens_per_core()
        except BaseException:
            self.stop()
            raise
        log.info("CPU LoRA sidecar: %d worker(s) on cores %s, c = %d tokens/core/layer", self.num_workers,
                 [w.cpu for w in self._workers], self.tokens_per_core)

    def _core(self, index: int) -> int:
        return self.cores[index % len(self.cores)] if self.config.pin_cores and self.cores else -1

    def _command(self, index: int) -> list:
        return [sys.executable, "-m", "caraserve_router.lora.sidecar_worker", "--control", self.segment_name,
                "--index", str(index), "--cpu", str(self._core(index)), "--spin-iters",
                str(self.config.spin_iters), "--shapes", json.dumps(dataclasses.asdict(self.shapes))]

    def _wait_started(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not all(w.ready(self._ctl) for w in self._workers):
            for w in self._workers:
                if w.proc is not None and w.proc.poll() is not None:
                    raise RuntimeError(f"sidecar worker {w.index} exited at start-up with code "
                                       f"{w.proc.returncode} (its stderr is in this process's log)")
            if time.monotonic() > end:
                raise RuntimeError(f"sidecar workers not ready after {timeout:.0f} s")
            time.sleep(0.01)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker is ready (replacements included); False after `timeout` s."""
        end = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        """Stop the workers (stop word, then SIGKILL after a grace period), reap them, unmap and
        unlink the segment. Idempotent; also runs at interpreter exit."""
        with self._lock:
            ctl = self._ctl
            if ctl is None:
                return
            ctl.words[H_STOP] = 1
            end = time.monotonic() + STOP_GRACE_S
            for w in self._workers:
                if w.proc is not None:
                    try:
                        w.proc.wait(max(0.0, end - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                w.kill()
            if self._cuda is not None:
                self._cuda.close()
                self._cuda = None
            ctl.close()
            self._ctl = None
            self._slots.clear()
            atexit.unregister(self._atexit)

    def healthy(self) -> bool:
        """Started, not stopped, and every worker ready (dead ones are being replaced)."""
        with self._lock:
            if self._ctl is None:
                return False
            self._refresh()
            return all(w.ready(self._ctl) for w in self._workers)

    def worker_pids(self) -> list:
        """Pids of the current worker processes (None for a slot waiting to respawn)."""
        return [w.pid for w in self._workers]

    def pin_memory(self) -> None:
        """Page-lock the segment for the CUDA path now (otherwise done on the first CUDA call)."""
        with self._lock:
            self._require_started()
            self._cuda_path().register()

    # ---- adapters -----------------------------------------------------------------------------

    def register_adapter(self, host: HostAdapter) -> int:
        """Make `host` (an AdapterStore entry) computable by the workers; returns its table slot.
        Workers map its segment on first use."""
        name = host.spec.name
        if host.dtype != self.dtype:
            raise ValueError(f"adapter {name!r} is stored as {host.dtype}, the sidecar computes {self.dtype}")
        if host.layout.shapes != self.shapes:
            raise ValueError(f"adapter {name!r} was laid out for other model shapes")
        with self._lock:
            self._require_started()
            if name in self._slots:
                raise ValueError(f"adapter {name!r} is already registered with the sidecar")
            used = set(self._slots.values())
            slot = next((s for s in range(self.layout.max_adapters) if s not in used), None)
            if slot is None:
                raise RuntimeError(f"sidecar adapter table is full ({self.layout.max_adapters} adapters)")
            self._generation += 1
            self._ctl.set_slot(slot, self._generation, host.spec.rank, flat_slice_ranks(host.spec.slice_ranks),
                               host.shm_name)
            self._slots[name] = slot
            return slot

    def unregister_adapter(self, name: str) -> bool:
        """Forget `name`; workers unmap its segment when they next look at the table (after a job
        or while idle). Returns False if it was not registered. Idempotent."""
        with self._lock:
            slot = self._slots.pop(name, None)
            if slot is None or self._ctl is None:
                return False
            self._ctl.clear_slot(slot)
            return True

    # ---- arming -------------------------------------------------------------------------------

    def arm(self) -> None:
        """A prefill that needs the sidecar is starting: workers poll without sleeping (until
        `disarm()`, or a second without a job or another `arm()`)."""
        with self._lock:
            if self._ctl is not None:
                self._refresh()
                self._ctl.words[H_ARMED] = 1
                self._ctl.words[H_ARM_SEQ] += 1

    def disarm(self) -> None:
        """That prefill is over: workers back off to short, then longer sleeps."""
        with self._lock:
            if self._ctl is not None:
                self._ctl.words[H_ARMED] = 0

    # ---- compute ------------------------------------------------------------------------------

    def compute(self, layer: int, group: str, x: torch.Tensor, segments: list, out: torch.Tensor) -> bool:
        """out[rows of each segment] += LoRA delta of `group` at `layer` with that segment's adapter.

        x: [T, IN] (CPU or CUDA); out: [T, OUT_TOTAL], same device; segments: [(row_start,
        row_end, adapter_name)]. Returns True when every delta was added; False, with `out`
        untouched, when the sidecar cannot answer in time (dead, failing or late worker, no
        ready worker, too many rows or segments): the caller then waits for the device copy.
        Raises KeyError for an adapter never registered, ValueError for bad shapes.
        """
        if group not in GROUPS:
            raise ValueError(f"unknown projection group {group!r}; one of {GROUPS}")
        shape = self.shapes.group(group)
        if (x.dim() != 2 or out.dim() != 2 or x.shape[0] != out.shape[0] or x.shape[1] != shape.in_features
                or out.shape[1] != shape.out_total):
            raise ValueError(f"sidecar {group}: x {tuple(x.shape)} / out {tuple(out.shape)} do not match "
                             f"[T, {shape.in_features}] / [T, {shape.out_total}]")
        if x.device != out.device:
            raise ValueError(f"x is on {x.device} but out is on {out.device}")
        if not 0 <= layer < self.shapes.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.shapes.num_layers - 1}")
        return self.collect(self.submit(layer, group, x, segments), out)

    def submit(self, layer: int, group: str, x: torch.Tensor, segments: list) -> "_Ticket":
        """First half of `compute`: post the job and return at once, so the engine can run the
        base projection while the workers compute (on a GPU this is the natural overlap; on a
        CPU host it needs the engine and the workers on different cores). `collect` it before
        the next `submit` or `compute`."""
        if group not in GROUPS:
            raise ValueError(f"unknown projection group {group!r}; one of {GROUPS}")
        shape = self.shapes.group(group)
        if x.dim() != 2 or x.shape[1] != shape.in_features:
            raise ValueError(f"sidecar {group}: x {tuple(x.shape)} does not match [T, {shape.in_features}]")
        if not 0 <= layer < self.shapes.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.shapes.num_layers - 1}")
        with self._lock:
            self._require_started()
            if self._open_ticket is not None:  # never collected (the step failed): drain it first
                log.warning("sidecar job %d was never collected; draining it", self._open_ticket.seq)
                stale, self._open_ticket = self._open_ticket, None
                self._finish(stale, None)
            job = self._pack(layer, group, segments, x.shape[0])
            ticket = _Ticket(job, x)
            if job.rows:
                ticket.posted = self._start(ticket)
                self._open_ticket = ticket if ticket.posted else None
            return ticket

    def collect(self, ticket: "_Ticket", out: torch.Tensor) -> bool:
        """Second half of `compute`: wait for the job, add its deltas to `out` (True), or leave
        `out` untouched (False) as `compute` does."""
        if ticket.job.rows == 0:
            return True
        shape = self.shapes.group(ticket.job.group)
        if out.dim() != 2 or out.shape[0] != ticket.x.shape[0] or out.shape[1] != shape.out_total:
            raise ValueError(f"sidecar {ticket.job.group}: out {tuple(out.shape)} does not match "
                             f"[{ticket.x.shape[0]}, {shape.out_total}]")
        if ticket.x.device != out.device:
            raise ValueError(f"x is on {ticket.x.device} but out is on {out.device}")
        with self._lock:
            if not ticket.posted:
                return False
            self._open_ticket = None
            return self._finish(ticket, out)

    def _pack(self, layer: int, group: str, segments: list, total_rows: int) -> _Job:
        """Segments -> packed pieces; adjacent rows of one adapter become one piece."""
        pieces, pos = [], 0
        for start, end, name in segments:
            if not 0 <= start <= end <= total_rows:
                raise ValueError(f"segment rows [{start}, {end}) outside x's {total_rows} rows")
            if start == end:
                continue
            slot = self._slots.get(name)
            if slot is None:
                raise KeyError(f"adapter {name!r} is not registered with the sidecar")
            if pieces and pieces[-1][1] == start and pieces[-1][2] == slot:
                prev = pieces[-1]
                pieces[-1] = (prev[0], end, slot, prev[3])
            else:
                pieces.append((start, end, slot, pos))
            pos += end - start
        return _Job(layer, group, pieces, pos)

    def _run(self, job: _Job, x: Optional[torch.Tensor], out: Optional[torch.Tensor],
             max_workers: Optional[int] = None) -> bool:
        """Post `job`, wait, add its deltas to `out`. x/out None: a sync-only job (no rows)."""
        ticket = _Ticket(job, x)
        return self._start(ticket, max_workers) and self._finish(ticket, out)

    def _start(self, ticket: "_Ticket", max_workers: Optional[int] = None) -> bool:
        """Stage the input, write the descriptor, bump the participants' job words."""
        job, x = ticket.job, ticket.x
        if job.rows > self.max_tokens:
            return self._fallback("too_many_rows", f"{job.rows} rows > max_tokens {self.max_tokens}")
        if len(job.pieces) > self.layout.max_segments:
            return self._fallback("too_many_segments", f"{len(job.pieces)} segments")
        self._refresh()
        ready = [w for w in self._workers if w.ready(self._ctl)]
        if not ready:
            return self._fallback("no_ready_worker", "no worker is ready")
        ticket.start = time.perf_counter()
        limit = len(ready) if max_workers is None else min(max_workers, len(ready))
        ticket.participants = ready[: workers_for(job.rows, self.tokens_per_core, limit) if job.rows else limit]
        ticket.on_cuda = x is not None and x.is_cuda
        shape = self.shapes.group(job.group)
        if ticket.on_cuda:
            self._cuda_path().register()
            self._cuda.stage_input(x, job, shape.in_features)
        else:
            self._stage_input_host(x, job, shape.in_features)
        ticket.seq = self._post(job, ticket.participants, shape)
        if ticket.on_cuda:
            self._cuda.signal(ticket.participants, ticket.seq, x.device)
        else:
            for w in ticket.participants:
                self._ctl.words[self._ctl.job_word(w.index)] = ticket.seq
        return True

    def _finish(self, ticket: "_Ticket", out: Optional[torch.Tensor]) -> bool:
        """Wait for the participants of a started job, then apply its output."""
        job = ticket.job
        failed = self._wait(ticket.participants, ticket.seq, self.config.deadline_ms / 1e3)
        if failed:
            return self._fail(failed, ticket.seq, ticket.on_cuda)
        if out is not None:
            self._apply_output(out, job, self.shapes.group(job.group).out_total, ticket.on_cuda)
        self._calls.success(job.rows, time.perf_counter() - ticket.start)
        return True

    def _stage_input_host(self, x: Optional[torch.Tensor], job: _Job, in_features: int) -> None:
        if self._cuda is not None:
            self._cuda.drain()  # a pending host->device copy may still read the output buffer
        if x is None:
            return
        packed = self._ctl.input_rows(job.rows, in_features)  # [rows, IN]
        for start, end, _, pos in job.pieces:
            _copy_rows(packed[pos : pos + end - start], x[start:end])

    def _post(self, job: _Job, participants: list, shape) -> int:
        """Write the descriptor (the job words are bumped by the caller); returns the sequence."""
        self._seq += 1
        ranges = [(0, 0)] * self.num_workers
        for w, rows in zip(participants, split_rows(job.rows, len(participants))):
            ranges[w.index] = rows
        self._ctl.write_job(self._seq, job.layer, GROUPS.index(job.group), job.rows, shape.in_features,
                            shape.out_total, job.descriptor_segments(), ranges)
        return self._seq

    def _wait(self, participants: list, seq: int, budget: float) -> list:
        """[(reason, worker)] of the participants that failed the job; empty when all did it.

        Returns only once no participant can still write into the buffers for this job: each
        is done, reported an error, is dead, or was late and gets killed by the caller. (A
        healthy worker still computing after a failure elsewhere would otherwise write stale
        rows over the next job's output.) The deadline runs from when the job words hold
        `seq`: on CUDA the host runs ahead of the stream, and time spent before the flag lands
        is the device's, not the workers'."""
        words, ctl = self._ctl.words, self._ctl
        pending = [(w, ctl.done_word(w.index)) for w in participants]
        failed = []
        started = time.perf_counter()
        deadline = started + budget
        polls, next_check = 0, 0.0
        while True:
            still = []
            for item in pending:
                value = words[item[1]]
                if value == -seq:
                    failed.append(("worker_error", item[0]))
                elif value != seq:
                    still.append(item)
            pending = still
            if not pending:
                return failed
            polls += 1
            napping = polls > ENGINE_SPIN_POLLS
            if napping:
                time.sleep(ENGINE_NAP_S)  # see ENGINE_SPIN_POLLS
            if not (napping or polls % 64 == 0):
                continue
            now = time.perf_counter()
            if now > deadline:
                landed = all(words[ctl.job_word(w.index)] == seq for w, _ in pending)
                if landed or now - started > FLAG_LANDING_LIMIT_S:
                    return failed + [("late", w) for w, _ in pending]
                deadline = now + budget
            if now >= next_check:
                dead = [item for item in pending if not item[0].alive()]
                failed += [("dead", w) for w, _ in dead]
                pending = [item for item in pending if item not in dead]
                next_check = now + LIVENESS_PERIOD_S

    def _fail(self, failed: list, seq: int, on_cuda: bool) -> bool:
        if on_cuda:
            self._cuda.drain()  # no flag of this job may land after its workers are replaced
        for reason, w in failed:
            if reason != "worker_error":  # an error report comes from a live, sane worker
                self._replace(w, reason)
        reason = failed[0][0]
        return self._fallback(reason, f"job {seq}: " + ", ".join(f"worker {w.index} {r}" for r, w in failed))

    def _apply_output(self, out: torch.Tensor, job: _Job, out_features: int, on_cuda: bool) -> None:
        if on_cuda:
            self._cuda.apply_output(out, job, out_features)
            return
        delta = self._ctl.output_rows(job.rows, out_features)  # [rows, OUT]
        for start, end, _, pos in job.pieces:
            _add_rows(out[start:end], delta[pos : pos + end - start])

    def _fallback(self, reason: str, detail: str) -> bool:
        self._calls.fallbacks[reason] += 1
        log.warning("sidecar fallback (%s): %s", reason, detail)
        return False

    def _replace(self, w: WorkerProcess, reason: str) -> None:
        """Kill (and reap) the worker in slot `w.index` and start a new one there; the new one is
        used once it reports ready. Repeated start-up failures back off."""
        pid = w.pid
        w.kill()
        self._calls.restarts += 1
        w.spawn_at = time.monotonic() + w.restart_delay()
        log.warning("sidecar worker %d (pid %s) %s; restarting it", w.index, pid, reason)
        self._spawn_due(w)

    def _spawn_due(self, w: WorkerProcess) -> None:
        if w.proc is None and time.monotonic() >= w.spawn_at:
            w.spawn(self._ctl)

    def _refresh(self) -> None:
        """Notice dead workers and start their (possibly deferred) replacements. A few waitpid
        calls: cheap enough for every call."""
        for w in self._workers:
            if w.proc is None:
                self._spawn_due(w)
            elif w.proc.poll() is not None:
                self._replace(w, f"exited with code {w.proc.returncode}")

    def _require_started(self) -> None:
        if self._ctl is None:
            raise RuntimeError("the CPU LoRA sidecar is not running (start() it first, or it was stopped)")

    def _cuda_path(self) -> _CudaPath:
        if self._cuda is None:
            self._cuda = _CudaPath(self._ctl)
        return self._cuda

    # ---- measurement ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _armed_for_measurement(self):
        """Armed for the block, then back to the caller's state."""
        was_armed = self._ctl.words[H_ARMED]
        self._ctl.words[H_ARMED] = 1
        self._ctl.words[H_ARM_SEQ] += 1
        try:
            yield
        finally:
            self._ctl.words[H_ARMED] = was_armed

    def sync_roundtrip_us(self, n: int = 1000, workers: Optional[int] = None) -> dict:
        """Round trip of the synchronisation alone: job words written -> every done word seen,
        with no rows. Uses the first `workers` ready workers (default: all), armed."""
        with self._lock:
            self._require_started()
            samples = []
            with self._armed_for_measurement():
                for _ in range(n):
                    start = time.perf_counter()
                    if not self._run(_Job(0, GROUPS[0], [], 0), None, None, max_workers=workers):
                        raise RuntimeError("sidecar round trip failed (see the log)")
                    samples.append((time.perf_counter() - start) * 1e6)
        samples.sort()
        return {"workers": len([w for w in self._workers if w.ready(self._ctl)]) if workers is None else workers,
                "samples": n, "median_us": samples[n // 2], "p99_us": samples[min(n - 1, int(0.99 * n))],
                "mean_us": sum(samples) / n}

    def profile_tokens_per_core(self, budget_ms: float = PROFILE_LAYER_BUDGET_MS, rank: int = PROFILE_RANK) -> int:
        """Measure c: the tokens one worker computes for one layer (all four groups) within
        `budget_ms`, at `rank`, with one worker, armed. Fits t(T) = a + b * T per layer from two
        sizes; c = floor((budget - a) / b), in [1, max_tokens]. Sets and returns c."""
        with self._lock:
            self._require_started()
            adapter = _ProfileAdapter(self.shapes, self.dtype, f"{self.shm_prefix}_scprof", rank)
            name = adapter.host.spec.name
            try:
                self.register_adapter(adapter.host)
                sizes = [min(s, self.max_tokens) for s in PROFILE_SIZES]
                with self._armed_for_measurement():
                    times = [self._time_layer(name, t) for t in sizes]
            finally:
                self.unregister_adapter(name)
                adapter.close()
            c, fixed, per_token = _fit_tokens_per_core(sizes, times, budget_ms / 1e3, self.max_tokens)
            self.tokens_per_core = c
            self.profile = {"budget_ms": budget_ms, "rank": rank, "sizes": sizes,
                            "layer_ms": [1e3 * t for t in times], "fixed_us": 1e6 * fixed,
                            "per_token_us": 1e6 * per_token,
                            "tokens_per_ms": 1e-3 / per_token, "tokens_per_core": c}
            log.info("sidecar profile: %s", self.profile)
            return c

    def _time_layer(self, name: str, tokens: int) -> float:
        """Seconds of one layer's four group calls for `tokens` rows on one worker: per group the
        fastest of a few calls after a warm-up one (the least disturbed by other processes)."""
        total = 0.0
        for group in GROUPS:
            shape = self.shapes.group(group)
            x = torch.randn(tokens, shape.in_features).to(self.dtype)
            out = torch.zeros(tokens, shape.out_total, dtype=self.dtype)
            job = self._pack(0, group, [(0, tokens, name)], tokens)
            samples = []
            for _ in range(PROFILE_REPEATS + 1):
                start = time.perf_counter()
                if not self._run(job, x, out, max_workers=1):
                    raise RuntimeError("sidecar profiling call failed (see the log)")
                samples.append(time.perf_counter() - start)
            total += min(samples[1:])
        return total

    def stats(self) -> dict:
        """running, workers, ready, armed, tokens_per_core, profile, calls, rows, fallbacks,
        fallback_reasons, restarts, mean_ms, p99_ms (latency of successful calls, last 4096)."""
        with self._lock:
            running = self._ctl is not None
            ready = sum(w.ready(self._ctl) for w in self._workers) if running else 0
            return {"running": running, "workers": self.num_workers, "ready": ready,
                    "armed": bool(running and self._ctl.words[H_ARMED]), "tokens_per_core": self.tokens_per_core,
                    "profile": self.profile, **self._calls.as_dict()}


def _fit_tokens_per_core(sizes: list, times: list, budget: float, max_tokens: int) -> tuple[int, float, float]:
    """(c, fixed s, s per token) from layer times at two sizes: t(T) = fixed + per_token * T.
    A noisy, non-increasing pair falls back to no fixed part. When the fixed part alone
    exceeds the budget no split meets it, and c = 1 spreads every call over all workers."""
    per_token = (times[1] - times[0]) / max(1, sizes[1] - sizes[0])
    fixed = times[0] - per_token * sizes[0]
    if per_token <= 0 or fixed < 0:
        per_token, fixed = times[1] / sizes[1], 0.0
    c = int((budget - fixed) // per_token) if budget > fixed else 1
    return max(1, min(max_tokens, c)), fixed, per_token


class _ProfileAdapter:
    """A random adapter of one rank, in its own segment, for profiling only."""

    def __init__(self, shapes: ModelShapes, dtype: torch.dtype, shm_name: str, rank: int,
                 name: str = "__sidecar_profile__"):
        layout = HostLayout(shapes, rank)
        nbytes = layout.total_floats() * torch.empty((), dtype=dtype).element_size()
        shm = shared_memory.SharedMemory(name=shm_name, create=True, size=nbytes)
        spec = AdapterSpec(name=name, path="", rank=rank,
                           slice_ranks={g: (rank,) * shapes.group(g).num_slices for g in GROUPS},
                           target_modules=(), layers=(), use_rslora=False)
        self.host = HostAdapter(spec, layout, dtype, shm, owner=True)
        generator = torch.Generator().manual_seed(0)
        self.host.flat.copy_(torch.randn(self.host.flat.numel(), generator=generator).to(dtype) * 0.01)

    def close(self) -> None:
        self.host.close()


# ---------------------------------------------------------------------------------- benchmark

# The default model (SmolLM2-135M-Instruct); --model-dir takes another's config.json.
DEFAULT_SHAPES = ModelShapes(num_layers=30, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate=1536)


def _percentiles_ms(samples: list) -> dict:
    samples = sorted(samples)
    return {"median_ms": 1e3 * samples[len(samples) // 2],
            "p99_ms": 1e3 * samples[min(len(samples) - 1, int(0.99 * len(samples)))]}


def _bench_inline(shapes: ModelShapes, rank: int, tokens: int, repeats: int) -> dict:
    """The worker's kernel (`lora_delta`) in this process, one thread: compute with no IPC."""
    from caraserve_router.lora.sidecar_worker import lora_delta

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {}
        for group in GROUPS:
            shape = shapes.group(group)
            x = torch.randn(tokens, shape.in_features)
            a = torch.randn(rank, shape.num_slices, shape.in_features)
            b = torch.randn(rank, shape.out_total)
            out = torch.empty(tokens, shape.out_total)
            samples = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                lora_delta(x, a, b, (rank,) * shape.num_slices, shape.slice_offsets, out)
                samples.append(time.perf_counter() - start)
            result[group] = _percentiles_ms(samples[1:])
        return result
    finally:
        torch.set_num_threads(threads)


def _bench_calls(sidecar: CpuLoraSidecar, name: str, tokens: int, repeats: int) -> dict:
    """Engine-side latency of compute() per group (copy in, workers, copy out), armed, cycling
    through the layers so each call reads a layer block that was not just used."""
    result = {}
    sidecar.arm()
    try:
        for group in GROUPS:
            shape = sidecar.shapes.group(group)
            x = torch.randn(tokens, shape.in_features).to(sidecar.dtype)
            out = torch.zeros(tokens, shape.out_total, dtype=sidecar.dtype)
            samples = []
            for i in range(repeats + 1):
                start = time.perf_counter()
                if not sidecar.compute(i % sidecar.shapes.num_layers, group, x, [(0, tokens, name)], out):
                    raise RuntimeError("benchmark call fell back (see the log)")
                samples.append(time.perf_counter() - start)
            result[group] = _percentiles_ms(samples[1:])
    finally:
        sidecar.disarm()
    return result


def benchmark(shapes: ModelShapes, dtype: torch.dtype, workers: list, ranks: list, tokens: int,
              roundtrips: int, repeats: int) -> dict:
    """Round trips, per-group call latency per rank and worker count, inline kernel times, and
    the profiled tokens per core (with one worker)."""
    import uuid

    report: dict = {"shapes": dataclasses.asdict(shapes), "dtype": str(dtype), "tokens": tokens,
                    "inline": {r: _bench_inline(shapes, r, tokens, repeats) for r in ranks}, "runs": {}}
    for k in workers:
        prefix = "scbench" + uuid.uuid4().hex[:8]
        # c = 1: every call uses all k workers, so the numbers show the k-way split
        sidecar = CpuLoraSidecar(SidecarConfig(workers=k, tokens_per_core=1), shapes, dtype, prefix, tokens)
        try:
            sidecar.start()
            run = {"roundtrip_us": sidecar.sync_roundtrip_us(roundtrips), "calls": {}}
            for rank in ranks:
                adapter = _ProfileAdapter(shapes, dtype, f"{prefix}_r{rank}", rank, name=f"bench-r{rank}")
                try:
                    sidecar.register_adapter(adapter.host)
                    run["calls"][rank] = _bench_calls(sidecar, adapter.host.spec.name, tokens, repeats)
                finally:
                    sidecar.unregister_adapter(adapter.host.spec.name)
                    adapter.close()
            if k == 1:
                sidecar.profile_tokens_per_core()
                run["profile"] = sidecar.profile
            run["stats"] = sidecar.stats()
            report["runs"][k] = run
        finally:
            sidecar.stop()
    return report


def _print_report(report: dict) -> None:
    print(f"tokens {report['tokens']}, dtype {report['dtype']}, shapes {report['shapes']}")
    for k, run in report["runs"].items():
        rt = run["roundtrip_us"]
        print(f"\n{k} worker(s): sync round trip median {rt['median_us']:.1f} us, p99 {rt['p99_us']:.1f} us")
        print("rank | " + " | ".join(f"{g} median/p99 ms" for g in GROUPS) + " | layer (sum of medians) ms")
        for rank, groups in run["calls"].items():
            cells = " | ".join(f"{groups[g]['median_ms']:.3f} / {groups[g]['p99_ms']:.3f}" for g in GROUPS)
            print(f"{rank} | {cells} | {sum(groups[g]['median_ms'] for g in GROUPS):.3f}")
        if "profile" in run:
            print(f"profile: {run['profile']}")
    print("\ninline lora_delta, one thread, no IPC (median ms):")
    for rank, groups in report["inline"].items():
        print(f"{rank} | " + " | ".join(f"{groups[g]['median_ms']:.3f}" for g in GROUPS))


def main(argv: Optional[list] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Benchmark the CPU LoRA sidecar on this machine")
    parser.add_argument("--model-dir", default=None, help="take shapes from this model's config.json "
                        "(default: SmolLM2-135M's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--roundtrips", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shapes = ModelShapes.from_model_dir(args.model_dir) if args.model_dir else DEFAULT_SHAPES
    report = benchmark(shapes, getattr(torch, args.dtype), args.workers, args.ranks, args.tokens,
                       args.roundtrips, args.repeats)
    _print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
