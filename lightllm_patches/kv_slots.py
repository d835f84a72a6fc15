"""KV-slot allocation without waiting for the device: a host mirror of the slots' reference counts.

| ours | upstream | why |
|---|---|---|
| `HostMirroredSlots.alloc` / `alloc_contiguous` | `MemoryManager.alloc` / `alloc_contiguous` (LightLLM 0.0.1) | upstream finds free slots with `torch.nonzero(mem_state == 0)` on the device and counts them with `count_nonzero(...).item()` (add_refs): every decode step waited for the device twice before its first launch. Here the free slots are found in a host copy of the counts (numpy), the same slots upstream picks (the lowest free ones; for a contiguous block the first run), and the device's `mem_state` is updated by launches that do not wait. |
| `free`, `add_refs`, `decrease_refs`, `free_all` | the same | keep the host mirror and the device's `mem_state` equal. `free` reads the freed indices to the host (one copy when requests finish, between steps). |

The router's view (`shared_can_use_token_num`) and the device's `mem_state` stay exactly what
upstream keeps (tests/lightllm_patches/test_kv_slots.py runs both side by side).
"""
from __future__ import annotations

import numpy as np
import torch

from lightllm.common.mem_manager import MemoryManager, logger


class HostMirroredSlots(MemoryManager):
    """Mixed into `CaraMemoryManager`; `_init_host_state` must run after `mem_state` exists."""

    def _init_host_state(self) -> None:
        self.host_refs = np.zeros(self.size, dtype=np.int32)  # [size]: mirror of mem_state

    def _to_device(self, index: np.ndarray) -> torch.Tensor:
        """int64 indices on the KV cache's device (a non-blocking copy from page-locked memory)."""
        t = torch.from_numpy(index.astype(np.int64, copy=False))
        if self.mem_state.device.type == "cpu":
            return t
        return t.pin_memory().to(self.mem_state.device, non_blocking=True)

    def _set_counts(self, host_index: np.ndarray, device_index: torch.Tensor) -> None:
        """Copy the host counts of `host_index` into the device's mem_state (launches only)."""
        counts = torch.from_numpy(self.host_refs[host_index].copy())
        if self.mem_state.device.type != "cpu":
            counts = counts.pin_memory().to(self.mem_state.device, non_blocking=True)
        self.mem_state[device_index] = counts

    def _publish(self) -> None:
        self.shared_can_use_token_num.set_value(self.can_use_mem_size)

    @torch.no_grad()
    def alloc(self, need_size):
        if need_size > self.can_use_mem_size:
            logger.warn(f"warn no enough cache need_size {need_size} left_size {self.can_use_mem_size}")
            return None
        index = np.flatnonzero(self.host_refs == 0)[:need_size]  # the lowest free slots, as upstream
        self.host_refs[index] += 1
        self.can_use_mem_size -= len(index)
        self._publish()
        device_index = self._to_device(index)
        self.mem_state[device_index] += 1
        return device_index

    @torch.no_grad()
    def alloc_contiguous(self, need_size):
        if self.always_copy:
            return None
        if need_size > self.can_use_mem_size:
            logger.warn(f"warn no enough cache need_size {need_size} left_size {self.can_use_mem_size}")
            return None
        free = np.flatnonzero(self.host_refs == 0)
        runs = np.flatnonzero(free[need_size - 1:] - free[: len(free) - need_size + 1] == need_size - 1)
        if len(runs) == 0:
            return None
        start = int(free[runs[0]])
        end = start + need_size
        self.host_refs[start:end] += 1
        self.can_use_mem_size -= need_size
        self._publish()
        self.mem_state[start:end] += 1
        return self.indexes[start:end], start, end

    @torch.no_grad()
    def add_refs(self, token_index: torch.Tensor):
        host = token_index.long().cpu().numpy()
        # as upstream: every index not yet used takes a slot; each named index counts once
        self.can_use_mem_size -= int((self.host_refs[host] == 0).sum())
        uniq = np.unique(host)
        self.host_refs[uniq] += 1
        self._publish()
        self._set_counts(uniq, self._to_device(uniq))

    @torch.no_grad()
    def decrease_refs(self, token_index: torch.Tensor):
        host = token_index.long().cpu().numpy()  # requests finished: between steps
        uniq, counts = np.unique(host, return_counts=True)
        self.host_refs[uniq] -= counts.astype(np.int32)
        self.can_use_mem_size += int((self.host_refs[uniq] == 0).sum())
        self._publish()
        self._set_counts(uniq, self._to_device(uniq))

    @torch.no_grad()
    def free_all(self):
        super().free_all()
        self.host_refs[:] = 0
