"""Worker slots of the sidecar: one supervised process each, replaced on failure with back-off,
and the paper's split of a call's rows over workers."""
from __future__ import annotations

import logging
import math
import os
import subprocess
from typing import Optional

from caraserve_router.lora.sidecar.shm import ControlBlock

log = logging.getLogger("caraserve.sidecar")

START_TIMEOUT_S = 120.0  # k fresh processes importing torch on a loaded machine
STOP_GRACE_S = 1.0  # workers see the stop word within a few ms; then they are killed
KILL_WAIT_S = 2.0
RESTART_BACKOFF_S = (0.0, 0.5, 10.0)  # first, second and cap of the delay after failed starts
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


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

