"""Helpers shared by every test: one `assert_close` with one tolerance table, one `wait_until`,
and the HTTP calls the server tests make (`generate`, `decisions`).

Tolerances are per dtype of the *computed* tensor; the reference is always computed in
float64 (or is an independent implementation in float32 where noted by the caller).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Union

import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

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


def generate(url: str, prompt: Union[str, list[int]], adapter: Optional[str] = None, max_new_tokens: int = 6,
             timeout_s: float = 300.0, headers: Optional[dict] = None, **parameters) -> dict:
    """POST LightLLM's `/generate` body to `url` (a front end or one instance): text or token ids,
    an optional adapter, `max_new_tokens` with `ignore_eos` (unless `parameters` say otherwise)
    and any other sampling `parameters`; asserts 200 and returns the reply's JSON (the front end
    answers `token_ids`, `finish_reason`; an instance `tokens` with `return_details=True`).
    `headers`: e.g. the key an instance asks of its callers."""
    body = {"inputs" if isinstance(prompt, str) else "input_ids": prompt,
            "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True, **parameters}}
    if adapter is not None:
        body["adapter"] = adapter
    r = requests.post(url + "/generate", json=body, headers=headers, timeout=timeout_s)
    assert r.status_code == 200, r.text
    return r.json()


def decisions(url: str) -> dict[str, float]:
    """The front end's scheduling decisions so far, per instance name (`/metrics`)."""
    text = requests.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "caraserve_scheduler_decisions":
            out.update({s.labels["instance"]: s.value for s in family.samples if s.name.endswith("_total")})
    return out
