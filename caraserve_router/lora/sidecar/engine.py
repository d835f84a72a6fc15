"""`CpuLoraSidecar`: life cycle, adapter table, arming and the call path (see the package doc)."""
from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from typing import Optional

import torch

from caraserve_router.contracts.configs import SidecarConfig
from caraserve_router.lora.adapter_store import HostAdapter
from caraserve_router.lora.shapes import GROUPS, ModelShapes
from caraserve_router.lora.sidecar.call_stats import CallStats
from caraserve_router.lora.sidecar.cuda_path import CudaPath
from caraserve_router.lora.sidecar.jobs import Job, Ticket, add_rows, copy_rows
from caraserve_router.lora.sidecar.profiling import SidecarMeasurement
from caraserve_router.lora.sidecar.workers import START_TIMEOUT_S, STOP_GRACE_S, WorkerProcess, split_rows, workers_for
from caraserve_router.lora.sidecar.shm import H_ARM_SEQ, H_ARMED, H_STOP, ControlBlock, ControlLayout, flat_slice_ranks, max_features

log = logging.getLogger("caraserve.sidecar")

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


def _stop_weak(ref) -> None:
    sidecar = ref()
    if sidecar is not None:
        sidecar.stop()


class CpuLoraSidecar(SidecarMeasurement):
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
        self._cuda: Optional[CudaPath] = None
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
        return [sys.executable, "-m", "caraserve_router.lora.sidecar.worker", "--control", self.segment_name,
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

    def submit(self, layer: int, group: str, x: torch.Tensor, segments: list) -> "Ticket":
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
            ticket = Ticket(job, x)
            if job.rows:
                ticket.posted = self._start(ticket)
                self._open_ticket = ticket if ticket.posted else None
            return ticket

    def collect(self, ticket: "Ticket", out: torch.Tensor) -> bool:
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

    def _pack(self, layer: int, group: str, segments: list, total_rows: int) -> Job:
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
        return Job(layer, group, pieces, pos)

    def _run(self, job: Job, x: Optional[torch.Tensor], out: Optional[torch.Tensor],
             max_workers: Optional[int] = None) -> bool:
        """Post `job`, wait, add its deltas to `out`. x/out None: a sync-only job (no rows)."""
        ticket = Ticket(job, x)
        return self._start(ticket, max_workers) and self._finish(ticket, out)

    def _start(self, ticket: "Ticket", max_workers: Optional[int] = None) -> bool:
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

    def _finish(self, ticket: "Ticket", out: Optional[torch.Tensor]) -> bool:
        """Wait for the participants of a started job, then apply its output."""
        job = ticket.job
        failed = self._wait(ticket.participants, ticket.seq, self.config.deadline_ms / 1e3)
        if failed:
            return self._fail(failed, ticket.seq, ticket.on_cuda)
        if out is not None:
            self._apply_output(out, job, self.shapes.group(job.group).out_total, ticket.on_cuda)
        self._calls.success(job.rows, time.perf_counter() - ticket.start)
        return True

    def _stage_input_host(self, x: Optional[torch.Tensor], job: Job, in_features: int) -> None:
        if self._cuda is not None:
            self._cuda.drain()  # a pending host->device copy may still read the output buffer
        if x is None:
            return
        packed = self._ctl.input_rows(job.rows, in_features)  # [rows, IN]
        for start, end, _, pos in job.pieces:
            copy_rows(packed[pos : pos + end - start], x[start:end])

    def _post(self, job: Job, participants: list, shape) -> int:
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

    def _apply_output(self, out: torch.Tensor, job: Job, out_features: int, on_cuda: bool) -> None:
        if on_cuda:
            self._cuda.apply_output(out, job, out_features)
            return
        delta = self._ctl.output_rows(job.rows, out_features)  # [rows, OUT]
        for start, end, _, pos in job.pieces:
            add_rows(out[start:end], delta[pos : pos + end - start])

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

    def _cuda_path(self) -> CudaPath:
        if self._cuda is None:
            self._cuda = CudaPath(self._ctl)
        return self._cuda

    # ---- measurement ----------------------------------------------------------------------------


    def stats(self) -> dict:
        """running, workers, ready, armed, tokens_per_core, profile, calls, rows, fallbacks,
        fallback_reasons, restarts, mean_ms, p99_ms (latency of successful calls, last 4096)."""
        with self._lock:
            running = self._ctl is not None
            ready = sum(w.ready(self._ctl) for w in self._workers) if running else 0
            return {"running": running, "workers": self.num_workers, "ready": ready,
                    "armed": bool(running and self._ctl.words[H_ARMED]), "tokens_per_core": self.tokens_per_core,
                    "profile": self.profile, **self._calls.as_dict()}

