"""Launchers: argument checks with clear messages, dispatch by device, backend override."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import KernelArgumentError, _registry

I32 = torch.int32


def decode_args(rows=3, slices=2, rank=4, in_features=8, out=(5, 3), units=40, dtype=torch.float32):
    table = (torch.arange(rows * slices * rank, dtype=I32).view(rows, slices, rank) * 2) % (units - 8)
    return dict(
        x=torch.randn(rows, in_features, dtype=dtype),
        W=torch.randn(units, 4, dtype=dtype),
        a_rows=table,
        b_rows=table.clone(),
        ranks=torch.full((rows, slices), rank, dtype=I32),
        y=torch.zeros(rows, slices, rank),
        scales=torch.ones(rows, slices),
        slice_offsets=torch.tensor([0, out[0], sum(out)], dtype=I32),
        out=torch.zeros(rows, sum(out), dtype=dtype),
    )


def shrink(a, **kw):
    kernels.mbgmv_shrink(a["x"], a["W"], a["a_rows"], a["ranks"], a["y"], **kw)


def expand(a, **kw):
    kernels.mbgmv_expand(a["y"], a["W"], a["b_rows"], a["ranks"], a["scales"], a["slice_offsets"],
                         a["out"], **kw)


@pytest.mark.parametrize("name, value, message", [
    ("x", torch.randn(3, 8, dtype=torch.float64), "x must have dtype"),
    ("W", torch.randn(40, 4, dtype=torch.float16), "W must have dtype torch.float32"),
    ("W", torch.randn(40, 4, 1), r"W must have shape \[\*, \*\]"),
    ("y", torch.zeros(3, 2, 4, dtype=torch.float16), "y must have dtype torch.float32"),
    ("y", torch.zeros(3, 2, 5), r"y must have shape \[3, 2, 4\]"),
    ("a_rows", torch.zeros(3, 2, 4, dtype=torch.int64), "a_rows must have dtype torch.int32"),
    ("a_rows", torch.zeros(3, 4, dtype=I32), r"a_rows must have shape \[3, \*, \*\]"),
    ("ranks", torch.zeros(3, 3, dtype=I32), r"ranks must have shape \[3, 2\]"),
    ("x", torch.randn(8, 3).t(), "x must be contiguous"),
    ("W", torch.randn(40, 4, device="meta"), "W is on meta"),
])
def test_shrink_argument_errors(name, value, message):
    args = decode_args()
    args[name] = value
    with pytest.raises(KernelArgumentError, match=message):
        shrink(args)


@pytest.mark.parametrize("name, value, message", [
    ("out", torch.zeros(3, 8, dtype=torch.float16), "out must have dtype torch.float32"),
    ("W", torch.randn(40, 4, dtype=torch.float64), "W must have dtype"),
    ("scales", torch.ones(3, 2, dtype=torch.float64), "scales must have dtype torch.float32"),
    ("slice_offsets", torch.tensor([0, 8], dtype=I32), r"slice_offsets must have shape \[3\]"),
    ("slice_offsets", torch.tensor([0, 9, 8], dtype=I32), "slice_offsets .* must rise from 0 to OUT_TOTAL=8"),
    ("b_rows", torch.zeros(3, 2, 5, dtype=I32), r"b_rows must have shape \[3, 2, 4\]"),
])
def test_expand_argument_errors(name, value, message):
    args = decode_args()
    args[name] = value
    with pytest.raises(KernelArgumentError, match=message):
        expand(args)


def test_sgmv_segment_count_must_match_descriptors():
    args = decode_args()
    with pytest.raises(KernelArgumentError, match=r"seg_starts must have shape \[4\]"):
        kernels.sgmv_shrink(args["x"], args["W"], torch.tensor([0, 3], dtype=I32), args["a_rows"],
                            args["ranks"], args["y"])


def test_cpu_tensors_dispatch_to_the_cpu_path(monkeypatch):
    calls = []
    monkeypatch.setitem(_registry._resolved, ("mbgmv_shrink", "cpu"), lambda *a, **k: calls.append("cpu"))
    monkeypatch.setitem(_registry._resolved, ("mbgmv_shrink", "reference"),
                        lambda *a, **k: calls.append("reference"))
    shrink(decode_args())
    shrink(decode_args(), backend="reference")
    assert calls == ["cpu", "reference"]


def test_registry_tables():
    import kernels.cpu
    import kernels.reference
    assert _registry.DEVICE_BACKEND == {"cuda": "triton", "cpu": "cpu"}
    assert _registry.lookup("sgmv_expand", None, torch.device("cpu")) is kernels.cpu.sgmv_expand
    assert _registry.lookup("mbgmv_shrink", "reference", torch.device("cpu")) is kernels.reference.mbgmv_shrink


def test_cuda_device_selects_triton():
    import kernels.triton_ops   # compiled (not interpreted) kernels: only imported, never launched here
    assert _registry.lookup("mbgmv_expand", None, torch.device("cuda")) is kernels.triton_ops.mbgmv_expand


def test_unknown_backend_and_device():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        shrink(decode_args(), backend="cuda")
    with pytest.raises(ValueError, match="no kernel backend for device type 'meta'"):
        _registry.lookup("mbgmv_shrink", None, torch.device("meta"))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_batch_is_a_no_op(backend):
    args = decode_args(rows=2, rank=0)
    args["ranks"].zero_()
    before = args["out"].clone()
    shrink(args, backend=backend)
    expand(args, backend=backend)
    assert torch.equal(args["out"], before)
