"""The CPU LoRA sidecar's CUDA path against its CPU path and a float64 reference.

On CUDA the engine's `x` is copied device->host into the page-locked segment and the workers'
job words are written by a copy queued on the same stream, so nothing waits on the host:
- same deltas as the CPU path (fp16, every group, several adapters and a row without one);
- with the stream held up by a GPU sleep, `submit` returns at once (the stream is still busy)
  and the result is still right: had the flag been written by the host before `x` landed,
  the workers would have computed on the previous call's input.
"""
from __future__ import annotations

import time
import uuid

import pytest
import torch

from caraserve_router.contracts.configs import SidecarConfig
from caraserve_router.lora.adapter_store import AdapterStore
from caraserve_router.lora.shapes import GROUP_MODULES, GROUPS, ModelShapes
from caraserve_router.lora.sidecar import CpuLoraSidecar
from tests.cuda.adapters import write_adapter
from tests.cuda.common import CUDA_TESTS, cuda_device
from tests.testing import assert_close

pytestmark = CUDA_TESTS

SHAPES = ModelShapes(num_layers=2, hidden=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate=512)
DTYPE = torch.float16
ADAPTERS = {"a4": (4, list(sum(GROUP_MODULES.values(), ()))), "b8": (8, ["q_proj", "v_proj", "o_proj", "down_proj"])}
SEGMENTS = [(0, 5, "a4"), (5, 6, "b8"), (8, 15, "a4"), (15, 24, "b8")]  # rows 6..7: no adapter
ROWS = 24
SLEEP_CYCLES = 400_000_000  # about 0.2 s of GPU time at H100 clocks


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecar-cuda")
    prefix = "sc" + uuid.uuid4().hex[:10]
    store = AdapterStore(SHAPES, DTYPE, prefix, max_rank=16, pin=True)
    car = CpuLoraSidecar(SidecarConfig(workers=2, tokens_per_core=4, spin_iters=2000, deadline_ms=5000.0), SHAPES,
                         DTYPE, prefix, max_tokens=64)
    try:
        for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
            store.add(name, str(write_adapter(root / name, SHAPES, rank, targets, seed=i)))
        car.start()
        car.pin_memory()
        for name in ADAPTERS:
            car.register_adapter(store.acquire(name))  # mapped and page-locked while registered
        car.arm()
        yield car, store
    finally:
        car.stop()
        store.close()


def _reference(store, layer: int, group: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """base + x @ A^T @ (scale B)^T per segment and slice, in float64, from the host store."""
    out = base.double().clone()
    shape = SHAPES.group(group)
    for start, end, name in SEGMENTS:
        host = store.get(name)
        a = host.block(layer, group, "A").double()  # [sum of slice ranks, IN]
        first = 0
        for s, r in enumerate(host.layout.slice_ranks(group)):
            if r:
                b = host.block(layer, group, s).double()  # [r, OUT_s]: lora_B^T, scale folded in
                cols = slice(shape.slice_offsets[s], shape.slice_offsets[s + 1])
                out[start:end, cols] += x[start:end].double() @ a[first : first + r].t() @ b
            first += r
    return out


def _inputs(group: str, seed: int):
    shape = SHAPES.group(group)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(ROWS, shape.in_features, generator=g).to(DTYPE),
            torch.randn(ROWS, shape.out_total, generator=g).to(DTYPE))


@pytest.mark.parametrize("group", GROUPS)
def test_cuda_path_gives_the_cpu_path_deltas(sidecar, group):
    car, store = sidecar
    for layer in range(SHAPES.num_layers):
        x, base = _inputs(group, seed=layer)
        out_cpu = base.clone()
        assert car.compute(layer, group, x, SEGMENTS, out_cpu)
        out_gpu = base.to(cuda_device())
        assert car.compute(layer, group, x.to(cuda_device()), SEGMENTS, out_gpu)
        torch.cuda.synchronize()
        assert_close(out_gpu, out_cpu, msg=f"CUDA vs CPU path, layer {layer} {group}")
        assert_close(out_gpu, _reference(store, layer, group, x, base), dtype=DTYPE, msg=f"{layer} {group}")
        assert torch.equal(out_gpu[6:8].cpu(), base[6:8]), "rows without a segment must be untouched"


def test_flag_lands_in_stream_order_without_host_sync(sidecar):
    car, store = sidecar
    x0, _ = _inputs("gate_up", seed=100)
    warm = torch.zeros(ROWS, SHAPES.group("gate_up").out_total, dtype=DTYPE, device=cuda_device())
    assert car.compute(1, "gate_up", x0.to(cuda_device()), SEGMENTS, warm)  # the buffer now holds x0
    x, base = _inputs("gate_up", seed=101)
    x_dev, out = x.to(cuda_device()), base.to(cuda_device())
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # the stream is busy; x's copy and the flag queue behind it
    start = time.perf_counter()
    ticket = car.submit(1, "gate_up", x_dev, SEGMENTS)
    posted_s = time.perf_counter() - start
    busy = not stream.query()
    assert car.collect(ticket, out)
    torch.cuda.synchronize()
    assert busy and posted_s < 0.05, f"submit waited for the stream ({posted_s * 1e3:.1f} ms)"
    assert_close(out, _reference(store, 1, "gate_up", x, base), dtype=DTYPE,
                 msg="workers must see x, not the previous input: the flag lands after the copy")
