"""Argument checks shared by the launchers: cheap attribute tests only, never a device sync."""
from __future__ import annotations

import torch

# dtypes of x / A / B / out the launchers accept (y and scales are float32, descriptors int32).
DATA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelArgumentError(ValueError):
    """A launcher argument has the wrong dtype, shape, layout or device."""


def fail(op: str, message: str) -> None:
    raise KernelArgumentError(f"{op}: {message}")


def tensor(op: str, name: str, t, shape: tuple, dtype, device: torch.device) -> None:
    """`t` is a contiguous tensor of `dtype` on `device` whose shape matches `shape`.

    `shape` entries are ints (must match) or None (any size); `dtype` a dtype or a tuple of them.
    """
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        fail(op, f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        fail(op, f"{name} must have shape {want}, got {list(t.shape)}")
    if t.device != device:
        fail(op, f"{name} is on {t.device}, expected {device} (all tensors on one device)")
    if not t.is_contiguous():
        fail(op, f"{name} must be contiguous (strides {t.stride()} for shape {list(t.shape)})")


def same_dtype(op: str, **tensors: torch.Tensor) -> None:
    """x / A / B / out share one data dtype."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        fail(op, "x/A/B/out must share one dtype, got " + ", ".join(f"{n}={d}" for n, d in dtypes.items()))


def rank_room(op: str, rank: int, slot_rank: int) -> None:
    """bgmv: the batch's max rank R fits in a slot of RS pages."""
    if rank > slot_rank:
        fail(op, f"y's rank dimension {rank} exceeds the slot size {slot_rank} of the stacked pool")


def prepared_call(op: str, prepared, rows: int, x, W, out) -> None:
    """A prepared op's per-call check: x [rows, IN], W and out [rows, OUT_TOTAL] have the shapes,
    dtype and device it was prepared for (attribute tests only)."""
    dtype, device = prepared.dtype, prepared.device
    if x.shape != (rows, prepared.in_features) or x.dtype != dtype or not x.is_contiguous():
        fail(op, f"x must be a contiguous {dtype} [{rows}, {prepared.in_features}], got {x.dtype} {list(x.shape)}")
    if W.shape != prepared.w_shape or W.dtype != dtype:
        fail(op, f"W must be {dtype} {list(prepared.w_shape)} (as prepared), got {W.dtype} {list(W.shape)}")
    if out.shape != (rows, prepared.out_features) or out.dtype != dtype or not out.is_contiguous():
        fail(op, f"out must be a contiguous {dtype} [{rows}, {prepared.out_features}], got {out.dtype} "
                 f"{list(out.shape)}")
    if x.device != device or W.device != device or out.device != device:
        fail(op, f"x, W and out must be on {device}")


def prepared_args(op: str, prepared, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features: int,
                  out_features: int | None = None) -> int:
    """A prepared op's descriptors, checked once (as the launchers check them per call); sets
    `prepared`'s in_features, out_features, w_shape, dtype and device; returns N (rows or segments).

    `out_features` (= slice_offsets[-1]) when the caller knows it: reading it from a device
    tensor would wait for the device (a host sync in every step)."""
    int32 = torch.int32
    tensor(op, "W", W, (None, None), DATA_DTYPES, W.device)
    device = W.device
    tensor(op, "a_rows", a_rows, (None, None, None), int32, device)
    rows, slices, rank = a_rows.shape
    tensor(op, "b_rows", b_rows, (rows, slices, rank), int32, device)
    tensor(op, "ranks", ranks, (rows, slices), int32, device)
    tensor(op, "scales", scales, (rows, slices), torch.float32, device)
    tensor(op, "slice_offsets", slice_offsets, (slices + 1,), int32, device)
    if in_features <= 0:
        fail(op, f"in_features must be positive, got {in_features}")
    if out_features is None:
        out_features = int(slice_offsets[-1])
    prepared.in_features, prepared.out_features = in_features, out_features
    prepared.w_shape, prepared.dtype, prepared.device = tuple(W.shape), W.dtype, device
    return rows


def prepared_split_call(op: str, prepared, rows: int, x, W, out_lo, out_hi) -> None:
    """A prepared op's per-call check when its output is two buffers: out_lo [rows, OUT_lo] and
    out_hi [rows, OUT_TOTAL - OUT_lo], each with unit column stride (rows may be strided)."""
    dtype, device = prepared.dtype, prepared.device
    if x.shape != (rows, prepared.in_features) or x.dtype != dtype or not x.is_contiguous():
        fail(op, f"x must be a contiguous {dtype} [{rows}, {prepared.in_features}], got {x.dtype} {list(x.shape)}")
    if W.shape != prepared.w_shape or W.dtype != dtype:
        fail(op, f"W must be {dtype} {list(prepared.w_shape)} (as prepared), got {W.dtype} {list(W.shape)}")
    for name, t in (("out_lo", out_lo), ("out_hi", out_hi)):
        if t.dim() != 2 or t.shape[0] != rows or t.dtype != dtype or t.stride(1) != 1 or t.device != device:
            fail(op, f"{name} must be a {dtype} [{rows}, *] on {device} with unit column stride, got {t.dtype} "
                     f"{list(t.shape)} strides {t.stride()}")
    if out_lo.shape[1] + out_hi.shape[1] != prepared.out_features:
        fail(op, f"out_lo and out_hi must hold {prepared.out_features} columns together, got "
                 f"{out_lo.shape[1]} + {out_hi.shape[1]}")
    if x.device != device or W.device != device:
        fail(op, f"x and W must be on {device}")
