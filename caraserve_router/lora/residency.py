"""Per-layer residency of one adapter in the device pool, as its layer groups land.

`EmulatedResidency`: a layer is resident once the link's (emulated) transfer of its group has
ended (`ready_at[layer]`, monotonic seconds) and the real copy is done.
`CudaResidency`: a layer is resident once the CUDA event recorded after its group's copy has
completed; waiting on it is a device-side stream wait, never a host synchronisation.
"""
from __future__ import annotations

import math
import threading
import time


class EmulatedResidency:
    def __init__(self, num_layers: int):
        self.ready_at = [math.inf] * num_layers
        self.failed = False
        self._done = threading.Event()

    def mark(self, layers, ready_at: float) -> None:
        for layer in layers:
            self.ready_at[layer] = ready_at
        if all(t != math.inf for t in self.ready_at):
            self._done.set()

    def mark_all_now(self) -> None:
        self.mark(range(len(self.ready_at)), time.monotonic())

    def is_ready(self, layer: int) -> bool:
        return time.monotonic() >= self.ready_at[layer]

    def all_ready(self) -> bool:
        return self._done.is_set() and time.monotonic() >= max(self.ready_at)

    def wait(self, layer: int) -> float:
        """Block until `layer` is resident; returns the seconds waited."""
        start = time.monotonic()
        while self.ready_at[layer] == math.inf:
            self._done.wait(0.0005)
        delay = self.ready_at[layer] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return time.monotonic() - start

    def wait_all(self) -> float:
        start = time.monotonic()
        self._done.wait()
        delay = max(self.ready_at) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return time.monotonic() - start


class CudaResidency:
    def __init__(self, num_layers: int, device=None):
        self.device = device  # the pool's CUDA device: waits go on its current stream
        self.events = [None] * num_layers  # torch.cuda.Event per layer (shared within a group)
        self.marked = [False] * num_layers
        self.failed = False
        self._recorded = threading.Event()

    def mark(self, layers, event) -> None:
        for layer in layers:
            self.events[layer] = event
            self.marked[layer] = True
        if all(self.marked):
            self._recorded.set()

    def mark_all_now(self) -> None:
        self.mark(range(len(self.events)), None)

    def is_ready(self, layer: int) -> bool:
        event = self.events[layer]
        return self.marked[layer] and (event is None or event.query())

    def all_ready(self) -> bool:
        return self._recorded.is_set() and all(e is None or e.query() for e in self.events)

    def wait(self, layer: int) -> float:
        import torch

        while not self.marked[layer]:
            self._recorded.wait(0.0005)
        if self.events[layer] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.events[layer])
        return 0.0

    def wait_all(self) -> float:
        self._recorded.wait()
        for layer in range(len(self.events)):
            self.wait(layer)
        return 0.0
