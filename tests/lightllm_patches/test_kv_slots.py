"""lightllm_patches/kv_slots.py: KV-slot allocation from a host mirror of the reference counts
gives exactly LightLLM 0.0.1's allocator's slots and state (its own methods run side by side on
a twin), and allocating waits for nothing on the device (no nonzero, no .item())."""
from __future__ import annotations

import random
import uuid

import pytest
import torch
from lightllm.common.mem_manager import MemoryManager
from torch.utils._python_dispatch import TorchDispatchMode

from caraserve_router.contracts.processes import remove_shm
from lightllm_patches.model import CaraMemoryManager


class UpstreamSlots(CaraMemoryManager):
    """The same manager with LightLLM's own allocation methods (the reference)."""

    alloc = MemoryManager.alloc
    alloc_contiguous = MemoryManager.alloc_contiguous
    add_refs = MemoryManager.add_refs
    decrease_refs = MemoryManager.decrease_refs
    free_all = MemoryManager.free_all


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("nonzero", "_local_scalar_dense", "count_nonzero"):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def managers():
    made = []

    def make(cls):
        prefix = f"cskv_{uuid.uuid4().hex[:8]}"
        m = cls(64, torch.float32, 1, 4, 1, torch.device("cpu"), prefix)
        made.append((m, prefix))
        return m

    yield make
    for m, prefix in made:
        m.shared_can_use_token_num.shm.close()
        remove_shm(prefix)


def same_state(ours, ref):
    assert torch.equal(ours.mem_state, ref.mem_state)
    assert ours.can_use_mem_size == ref.can_use_mem_size
    assert ours.shared_can_use_token_num.get_value() == ref.shared_can_use_token_num.get_value()
    assert (torch.from_numpy(ours.host_refs) == ours.mem_state).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_slots_as_lightllm(managers, seed):
    rng = random.Random(seed)
    ours, ref = managers(CaraMemoryManager), managers(UpstreamSlots)
    held = []  # index tensors currently allocated
    for _ in range(120):
        op = rng.choice(["alloc", "alloc", "contiguous", "free", "free"])
        if op == "free" and held:
            block = held.pop(rng.randrange(len(held)))
            ours.free(block.clone())
            ref.free(block.clone())
        elif op in ("alloc", "contiguous"):
            n = rng.randint(1, 12)
            if op == "alloc":
                a, b = ours.alloc(n), ref.alloc(n)
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.equal(a, b)
                    held.append(a)
            else:
                a, b = ours.alloc_contiguous(n), ref.alloc_contiguous(n)
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
                    held.append(a[0])
        same_state(ours, ref)
    ours.free_all()
    ref.free_all()
    same_state(ours, ref)


def test_allocation_waits_for_nothing(managers):
    ours, ref = managers(CaraMemoryManager), managers(UpstreamSlots)
    for m, expect_syncs in ((ours, False), (ref, True)):
        with SyncCounter() as counter:
            m.alloc(5)
            m.alloc_contiguous(3)
        assert (counter.syncs > 0) == expect_syncs, counter.syncs


def test_resize_resets_the_mirror(managers):
    ours = managers(CaraMemoryManager)
    ours.alloc(10)
    ours.resize_mem(32)
    assert ours.host_refs.shape == (32,) and not ours.host_refs.any() and ours.can_use_mem_size == 32
    assert torch.equal(ours.alloc(3), torch.arange(3))
