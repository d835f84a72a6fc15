"""One CPU LoRA sidecar worker: a process pinned to a core that computes LoRA deltas of jobs
posted in the sidecar's shared-memory segment (see `shm.py` for the protocol).

Started by `CpuLoraSidecar` as

    python -m caraserve_router.lora.sidecar.worker --control NAME --index W --cpu C \
        --spin-iters N --shapes JSON

Everything heavy (torch, the adapter store) is imported once at start; the per-job path is
flag polling, a few reads of the descriptor and float32 matmuls on views of shared memory.
The worker exits when the engine sets the stop word or when its parent process is gone.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from caraserve_router.lora.adapter_store import AdapterSpec, HostAdapter
from caraserve_router.lora.shapes import GROUPS, GroupShape, ModelShapes
from caraserve_router.lora.sidecar.shm import H_ARM_SEQ, H_ARMED, H_STOP, H_TABLE_EPOCH, ControlBlock, group_slice_ranks

log = logging.getLogger("caraserve.sidecar.worker")

YIELD_BATCH = 64  # sched_yield polls between checks of the stop word and the clock


@dataclass(frozen=True)
class WaitPolicy:
    """How a worker waits for its next job.

    After a job it spins `spin_iters` polls (layers of one prefill come back to back), then
    polls with `sched_yield` in between (so an engine thread on the same core still runs)
    until `yield_window_s` has passed since the last job, then naps `nap_s` at a time; after
    `idle_after_s` without a job it sleeps `deep_sleep_s` at a time, and after `dormant_after_s`
    `dormant_sleep_s` (measured on 2 loaded cores: 2.4% of a core per idle worker at 2 ms,
    1.5% at 5 ms). The sleep bounds the extra latency of a call made while the sidecar is not
    armed, and of noticing `arm()`. While armed (the engine is in a prefill that needs the
    sidecar) it never sleeps, unless `armed_idle_limit_s` passes without a job or a new `arm()`:
    an engine that failed before `disarm()` must not leave the cores spinning.
    """

    spin_iters: int
    yield_window_s: float = 0.002
    nap_s: float = 0.0001
    idle_after_s: float = 0.05
    deep_sleep_s: float = 0.002
    dormant_after_s: float = 1.0
    dormant_sleep_s: float = 0.005
    armed_idle_limit_s: float = 1.0

    def sleep_for(self, idle: float) -> float:
        if idle < self.idle_after_s:
            return self.nap_s
        return self.deep_sleep_s if idle < self.dormant_after_s else self.dormant_sleep_s


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slice_ranks: tuple, offsets: tuple,
               out: torch.Tensor) -> None:
    """out = per slice s: x @ A_s^T @ B_s, computed in float32, written in out's dtype, for
    weights padded to one rank R over the slices (the sidecar benchmark's inline timing and the
    warm-up; adapters' own weights go through `group_delta`).

    x: [n, IN]; a: [R, S, IN] (row j, slice s = row j of lora_A of slice s); b: [R, OUT_TOTAL]
    (scale folded in); out: [n, OUT_TOTAL]. Rows past a slice's rank are zero in the store, so
    using only the first `slice_ranks[s]` rows is exact and saves work.
    """
    r = max(slice_ranks)
    if r == 0:
        out.zero_()
        return
    n, num_slices = x.shape[0], a.shape[1]
    a_rows = a[:r].reshape(r * num_slices, a.shape[2]).float()  # [r * S, IN]
    y = (x.float() @ a_rows.t()).view(n, r, num_slices)  # [n, r, S]
    for s, rs in enumerate(slice_ranks):
        cols = out[:, offsets[s] : offsets[s + 1]]  # [n, OUT_s]
        if rs == 0:
            cols.zero_()
        else:
            cols.copy_(y[:, :rs, s] @ b[:rs, offsets[s] : offsets[s + 1]].float())


def group_delta(x: torch.Tensor, a: torch.Tensor, bs: tuple, slice_ranks: tuple, offsets: tuple,
                out: torch.Tensor) -> None:
    """out = per slice s: x @ A_s^T @ B_s, in float32, written in out's dtype (the host layout).

    x: [n, IN]; a: [sum_s r_s, IN] (every targeted slice's lora_A rows, slice order); bs: per slice
    [r_s, OUT_s] (scale folded in); out: [n, OUT_TOTAL]. Slices of rank 0 get zeros.
    """
    if sum(slice_ranks) == 0:
        out.zero_()
        return
    y = x.float() @ a.float().t()                                     # [n, sum r]
    pos = 0
    for s, rs in enumerate(slice_ranks):
        cols = out[:, offsets[s] : offsets[s + 1]]                      # [n, OUT_s]
        if rs == 0:
            cols.zero_()
        else:
            cols.copy_(y[:, pos : pos + rs] @ bs[s].float())
        pos += rs


class MappedAdapter:
    """One attached adapter segment and the views of its (layer, group) blocks, made once: the
    layout arithmetic costs more than a small job's matmuls."""

    def __init__(self, host: HostAdapter, generation: int):
        self.host = host
        self.generation = generation
        self.slice_ranks = host.spec.slice_ranks
        self._blocks: dict[tuple, tuple] = {}

    def blocks(self, layer: int, group: str) -> tuple:
        """(A [sum_s r_s, IN], (B_s [r_s, OUT_s] per slice)) of `group` in `layer`."""
        key = (layer, group)
        views = self._blocks.get(key)
        if views is None:
            bs = tuple(self.host.block(layer, group, s) for s in range(len(self.slice_ranks[group])))
            views = self._blocks[key] = (self.host.block(layer, group, "A"), bs)
        return views

    def close(self) -> None:
        self._blocks.clear()  # views pin the mapping; drop them before unmapping
        self.host.close()


class AdapterCache:
    """Adapters this worker has mapped, by table slot; attached on first use (or while idle, after
    a table change), closed when the engine clears or reuses their slot."""

    def __init__(self, ctl: ControlBlock, shapes: ModelShapes):
        self.ctl = ctl
        self.shapes = shapes
        self.maps: dict[int, MappedAdapter] = {}
        self.epoch = -1

    def get(self, slot: int) -> MappedAdapter:
        cached = self.maps.get(slot)
        if cached is not None and cached.generation == self.ctl.slot_generation(slot):
            return cached
        self._close(slot)
        entry = self.ctl.read_slot(slot)
        if entry is None:
            raise LookupError(f"job names adapter slot {slot}, which is empty")
        generation, rank, flat_ranks, shm_name = entry
        spec = AdapterSpec(name=shm_name, path="", rank=rank, slice_ranks=group_slice_ranks(flat_ranks),
                           target_modules=(), layers=(), use_rslora=False)
        mapped = MappedAdapter(HostAdapter.attach(spec, self.shapes, self.ctl.layout.dtype, shm_name), generation)
        self.maps[slot] = mapped
        return mapped

    def sync(self) -> None:
        """After a table change: close mappings of cleared or reused slots and map new ones, so
        the first job of an adapter does not pay for the attach. Cheap when nothing changed."""
        epoch = self.ctl.words[H_TABLE_EPOCH]
        if epoch == self.epoch:
            return
        self.epoch = epoch
        for slot in range(self.ctl.layout.max_adapters):
            generation = self.ctl.slot_generation(slot)
            cached = self.maps.get(slot)
            if cached is not None and cached.generation != generation:
                self._close(slot)
            if generation and slot not in self.maps:
                try:
                    self.get(slot)
                except (OSError, LookupError) as e:  # gone again already; a job would report it
                    log.warning("sidecar worker: cannot map adapter slot %d: %s", slot, e)

    def _close(self, slot: int) -> None:
        mapped = self.maps.pop(slot, None)
        if mapped is not None:
            mapped.close()

    def close(self) -> None:
        for slot in list(self.maps):
            self._close(slot)


class Waiter:
    """Polls one job word with the backoff of `WaitPolicy`."""

    def __init__(self, ctl: ControlBlock, index: int, policy: WaitPolicy, on_idle):
        self.words = ctl.words
        self.job_word = ctl.job_word(index)
        self.policy = policy
        self.on_idle = on_idle
        self.parent = os.getppid()
        self.last_job = time.monotonic()  # or the last arm(): activity the backoff counts from
        self.arm_seq = self.words[H_ARM_SEQ]

    def wait(self, last: int) -> Optional[int]:
        """The job word once it differs from `last`; None when told to stop or orphaned."""
        words, j = self.words, self.job_word
        for _ in range(self.policy.spin_iters):
            value = words[j]
            if value != last:
                return self._got(value)
        while True:
            if words[H_STOP] or os.getppid() != self.parent:
                return None
            if words[H_ARM_SEQ] != self.arm_seq:
                self.arm_seq = words[H_ARM_SEQ]
                self.last_job = time.monotonic()
            idle = time.monotonic() - self.last_job
            armed = words[H_ARMED] and idle < self.policy.armed_idle_limit_s
            if armed or idle < self.policy.yield_window_s:
                for _ in range(YIELD_BATCH):
                    os.sched_yield()
                    value = words[j]
                    if value != last:
                        return self._got(value)
                continue
            self.on_idle()
            time.sleep(self.policy.sleep_for(idle))
            value = words[j]
            if value != last:
                return self._got(value)

    def _got(self, value: int) -> int:
        self.last_job = time.monotonic()
        return value


class Worker:
    """The worker's main loop: wait for a job, compute its rows, publish the done word."""

    def __init__(self, ctl: ControlBlock, index: int, shapes: ModelShapes, policy: WaitPolicy):
        self.ctl = ctl
        self.index = index
        self.groups: list[GroupShape] = [shapes.group(g) for g in GROUPS]
        self.adapters = AdapterCache(ctl, shapes)
        self.waiter = Waiter(ctl, index, policy, self.adapters.sync)

    def warm_up(self) -> None:
        """One small delta per group shape: the first matmul of a process pays for the math
        library's set-up, which must not land on a job (or count against the deadline)."""
        for shape in self.groups:
            x = torch.randn(4, shape.in_features)
            a = torch.randn(2, shape.num_slices, shape.in_features)
            b = torch.randn(2, shape.out_total)
            lora_delta(x, a, b, (2,) * shape.num_slices, shape.slice_offsets, torch.empty(4, shape.out_total))
        self.adapters.sync()

    def run(self) -> None:
        words, ctl = self.ctl.words, self.ctl
        last = words[ctl.job_word(self.index)]  # whatever was posted before this process is not ours
        words[ctl.done_word(self.index)] = last
        words[ctl.pid_word(self.index)] = os.getpid()  # ready
        while True:
            seq = self.waiter.wait(last)
            if seq is None:
                return
            ok = self._run_job(seq)
            words[ctl.done_word(self.index)] = seq if ok else -seq  # after the output rows
            last = seq
            self.adapters.sync()

    def _run_job(self, seq: int) -> bool:
        job_seq, layer, group, rows, in_f, out_f, (lo, hi), segments = self.ctl.read_job(self.index)
        if job_seq != seq:
            # A flag that landed late (CUDA path after a fallback): that job is gone; acknowledge.
            return True
        if lo >= hi:
            return True
        try:
            shape = self.groups[group]
            x = self.ctl.input_rows(rows, in_f)  # [rows, IN]
            out = self.ctl.output_rows(rows, out_f)  # [rows, OUT_TOTAL]
            for start, end, slot in segments:
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    self._segment(layer, shape, slot, x[a:b], out[a:b])
            return True
        except Exception:  # noqa: BLE001 - report the failure to the engine instead of dying
            log.exception("sidecar worker %d: job %d failed", self.index, seq)
            return False

    def _segment(self, layer: int, shape: GroupShape, slot: int, x: torch.Tensor, out: torch.Tensor) -> None:
        adapter = self.adapters.get(slot)
        a, bs = adapter.blocks(layer, shape.name)
        group_delta(x, a, bs, adapter.slice_ranks[shape.name], shape.slice_offsets, out)

    def close(self) -> None:
        self.adapters.close()


def _pin(cpu: int, index: int) -> None:
    if cpu < 0:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except (OSError, AttributeError) as e:  # not Linux, or the core is outside our cpuset
        log.warning("sidecar worker %d: cannot pin to core %d (%s); running unpinned", index, cpu, e)


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CaraServe CPU LoRA sidecar worker (started by the engine)")
    parser.add_argument("--control", required=True, help="name of the sidecar's shared-memory segment")
    parser.add_argument("--index", type=int, required=True, help="worker slot")
    parser.add_argument("--cpu", type=int, default=-1, help="core to pin to (-1: none)")
    parser.add_argument("--spin-iters", type=int, default=20000, help="flag polls before yielding")
    parser.add_argument("--shapes", required=True, help="ModelShapes fields as JSON")
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the engine stops us
    _pin(args.cpu, args.index)
    torch.set_num_threads(1)  # one core per worker; the split over workers is the parallelism
    ctl = ControlBlock.attach(args.control)
    worker = Worker(ctl, args.index, ModelShapes(**json.loads(args.shapes)), WaitPolicy(args.spin_iters))
    try:
        worker.warm_up()
        worker.run()
    finally:
        worker.close()
        ctl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
