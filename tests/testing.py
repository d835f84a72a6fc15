"""Helpers shared by every test: one `assert_close` with one tolerance table, one `wait_until`.

Tolerances are per dtype of the *computed* tensor; the reference is always computed in
float64 (or is an independent implementation in float32 where noted by the caller).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

# dtype -> (atol, rtol). fp16/bf16 accumulate rounding of the inputs and of the partial sums.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 8e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for results of this dtype."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "", atol: float | None = None, rtol: float | None = None) -> None:
    """Compare `actual` to `expected` (any dtype) in float64 with the table's tolerance.

    `dtype` picks the row of the table (default: actual.dtype); `atol`/`rtol` override it.
    NaN or inf anywhere in `actual` fails, whatever the tolerance.
    """
    row_atol, row_rtol = tolerance(dtype or actual.dtype)
    atol = row_atol if atol is None else atol
    rtol = row_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{msg}: non-finite values in result"
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll `predicate` every `interval_s` until it is true (True) or `timeout_s` has passed (its
    value then, one last time)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())
