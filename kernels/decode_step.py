"""DecodeStep: one decode batch's LoRA delta (shrink, then expand) prepared once per forward
step and module group, then run for every layer with no per-call planning or argument walks.

A decode step calls the LoRA kernels 2 x groups x layers times (240 calls for a 30-layer model
over four groups) with the same descriptors; checking them, building index tensors and
allocating `y` on every call was the fixed cost of LoRA per step (about 180 us a call on the
CPU, 21 ms of a 75 ms batch-1 step). `DecodeStep` does all of that once:

    step = prepare_decode(a_rows, b_rows, ranks, scales, slice_offsets, W, in_features)  # per step
    for layer in layers:
        step(x, pool.W[layer], out)          # out += delta; checks: shapes / dtype only

Semantics (per call, the same as mbgmv_shrink into a scratch y followed by mbgmv_expand):
    for i in range(N):
        for s in range(S):
            cols = slice(slice_offsets[s], slice_offsets[s + 1])
            out[i, cols] += scales[i, s] * sum(
                (x[i] @ A_row(a_rows[i, s, j])) * B_row(b_rows[i, s, j], s) for j in range(ranks[i, s]))

Shape:
    prepare: a_rows, b_rows [N, S, R] int32; ranks [N, S] int32; scales [N, S] f32;
             slice_offsets [S + 1] int32; W [U, UNIT] (any layer's pool: all share one shape)
    call:    x [N, IN]; W [U, UNIT] (same shape and dtype as at prepare); out [N, OUT_TOTAL]

Split output (`step.split(x, W, out_lo, out_hi)`): the group's output lives in two buffers,
out_lo [N, OUT_lo] (leading slices) and out_hi [N, OUT_TOTAL - OUT_lo] (the rest); the
engine's qkv group has q in one and k|v in the KV staging rows. The Triton expand accumulates
into both directly, so a decode step's LoRA is two launches per layer group: no scratch output
and no separate adds. Other backends go through one scratch [N, OUT_TOTAL] and two adds.

Backends: the CPU one (kernels/cpu/decode.py `PreparedDecode`) fuses the two ops (the shrink's
values feed the expand's weights directly: no `y`, no zeroing, no scale multiply when every
scale is 1); the others (Triton, reference) keep a scratch `y` and call their mbgmv pair.
"""
from __future__ import annotations

import torch

from . import _checks as check
from ._registry import lookup

F32 = torch.float32


class DecodeStep:
    """A prepared decode LoRA op; call it as `step(x, W, out)` for each layer."""

    def __init__(self, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features: int, *,
                 backend: str | None = None, out_features: int | None = None):
        self.rows = check.prepared_args("prepare_decode", self, a_rows, b_rows, ranks, scales, slice_offsets, W,
                                        in_features, out_features)
        device = self.device
        name = backend or ("cpu" if device.type == "cpu" else None)
        self.backend = name or "triton"
        if name == "cpu":
            self._run = lookup("PreparedDecode", "cpu", device)(
                a_rows, b_rows, ranks, scales, slice_offsets, W, in_features)
        else:
            self._run = _TwoOps(a_rows, b_rows, ranks, scales, slice_offsets, backend, device)

    def __call__(self, x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> None:
        """out += the LoRA delta of every row (x [N, IN], W: this layer's pool, out [N, OUT_TOTAL])."""
        check.prepared_call("decode_step", self, self.rows, x, W, out)
        self._run(x, W, out)

    def split(self, x: torch.Tensor, W: torch.Tensor, out_lo: torch.Tensor, out_hi: torch.Tensor) -> None:
        """out_lo | out_hi += the LoRA delta of every row, the output split in two buffers at a
        slice boundary (see the module docstring). Triton: shrink + one expand into both."""
        check.prepared_split_call("decode_step", self, self.rows, x, W, out_lo, out_hi)
        if isinstance(self._run, _TwoOps) and self._run.expand_split is not None:
            self._run.split(x, W, out_lo, out_hi)
            return
        delta = torch.zeros((self.rows, self.out_features), dtype=x.dtype, device=x.device)  # [N, OUT_TOTAL]
        self._run(x, W, delta)
        out_lo.add_(delta[:, : out_lo.shape[1]])
        out_hi.add_(delta[:, out_lo.shape[1]:])


class _TwoOps:
    """Triton / reference: mbgmv_shrink into a scratch y, then mbgmv_expand (arguments checked at
    prepare, so the backend functions are called directly)."""

    def __init__(self, a_rows, b_rows, ranks, scales, slice_offsets, backend, device):
        self.args = (a_rows, b_rows, ranks, scales, slice_offsets)
        self.y = torch.empty(a_rows.shape, dtype=F32, device=device)  # y: [N, S, R]
        self.shrink = lookup("mbgmv_shrink", backend, device)
        self.expand = lookup("mbgmv_expand", backend, device)
        # the split-output expand: one launch into both buffers (Triton); None: scratch + adds
        name = backend or ("triton" if device.type == "cuda" else None)
        self.expand_split = lookup("mbgmv_expand_split", "triton", device) if name == "triton" else None

    def __call__(self, x, W, out) -> None:
        a_rows, b_rows, ranks, scales, slice_offsets = self.args
        self.shrink(x, W, a_rows, ranks, self.y)
        self.expand(self.y, W, b_rows, ranks, scales, slice_offsets, out)

    def split(self, x, W, out_lo, out_hi) -> None:
        a_rows, b_rows, ranks, scales, slice_offsets = self.args
        self.shrink(x, W, a_rows, ranks, self.y)
        self.expand_split(self.y, W, b_rows, ranks, scales, slice_offsets, out_lo, out_hi)


def prepare_decode(a_rows, b_rows, ranks, scales, slice_offsets, W, in_features: int, *,
                   backend: str | None = None, out_features: int | None = None) -> DecodeStep:
    """A DecodeStep for one decode batch and module group (see the module docstring);
    `out_features` = slice_offsets[-1], given to avoid reading it back from the device."""
    return DecodeStep(a_rows, b_rows, ranks, scales, slice_offsets, W, in_features, backend=backend,
                      out_features=out_features)
