"""Bounded shutdown on SIGINT / SIGTERM, under any load.

First signal: stop accepting connections (uvicorn), let in-flight requests run for the first
half of `--shutdown-timeout-s`, then end the rest with a clean 503 (an error event inside a
stream), stop the instances, exit. A watchdog thread kills every instance process group and
exits the process when the timeout passes, whatever is stuck. A second signal does that at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import uvicorn

log = logging.getLogger("caraserve.shutdown")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTTING_DOWN = "the server is shutting down"


class QuietServer(uvicorn.Server):
    """uvicorn's server without its own signal handling (the Shutdown below owns the signals)."""

    def capture_signals(self):  # noqa: D102 - uvicorn's hook, replaced by a no-op context
        import contextlib

        return contextlib.nullcontext()


class Shutdown:
    def __init__(self, front, server: uvicorn.Server, timeout_s: float):
        self.front = front
        self.server = server
        self.timeout_s = timeout_s
        self.started_at: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.main_task: asyncio.Task | None = None

    def install(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.main_task = asyncio.current_task()
        for sig in SIGNALS:
            self.loop.add_signal_handler(sig, self.on_signal, sig)

    @property
    def drain_s(self) -> float:
        """How long in-flight requests may still run to completion."""
        return self.timeout_s / 2

    def remaining_s(self) -> float:
        if self.started_at is None:
            return self.timeout_s
        return max(0.0, self.started_at + self.timeout_s - time.monotonic())

    def on_signal(self, sig: int) -> None:
        if self.started_at is not None:
            log.warning("second %s: ending now", signal.Signals(sig).name)
            self.force(130)
            return
        self.begin(f"{signal.Signals(sig).name}")

    def begin(self, why: str, interrupt_start: bool = True) -> None:
        """Start the bounded shutdown (idempotent). A signal during start-up interrupts it; the
        serve loop's own `finally` (`interrupt_start=False`) must not cancel the task it runs in,
        or a start-up error would surface as a CancelledError instead of its message."""
        if self.started_at is not None:
            return
        self.started_at = time.monotonic()
        log.warning("%s: shutting down (in-flight requests get %.0f s; everything ends within %.0f s)", why,
                    self.drain_s, self.timeout_s)
        watchdog = threading.Timer(self.timeout_s, self.force, args=(1,))
        watchdog.daemon = True
        watchdog.start()
        self.server.should_exit = True
        if interrupt_start and not self.server.started and self.main_task is not None:
            self.main_task.cancel()  # still starting (instances, model): stop waiting for them
        self.loop.call_later(self.drain_s, lambda: asyncio.ensure_future(self.front.abort_all(SHUTTING_DOWN)))

    def force(self, code: int) -> None:
        """Kill every instance process group and leave now (second signal, or the deadline)."""
        try:
            self.front.kill()
        finally:
            logging.shutdown()
            os._exit(code)
