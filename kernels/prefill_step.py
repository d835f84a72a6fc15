"""PrefillStep: one prefill batch's LoRA delta (sgmv shrink, then expand) prepared once per
forward step and module group, then run for every layer.

The segments, their live slices and where each segment's rows sit in the pool are the same
for every layer of a step; the CPU's sgmv works them out per call (about 70 small ops per
segment), which cost as much as the LoRA arithmetic of a 64-token-per-segment prefill.
`PrefillStep` does that once:

    step = prepare_prefill(seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features)
    for layer in layers:
        step(x, pool.W[layer], out)          # out += delta; checks: shapes / dtype only

Semantics (per call, the same as sgmv_shrink into a scratch y followed by sgmv_expand):
    for i in range(N):
        for t in range(seg_starts[i], seg_starts[i + 1]):
            for s in range(S):
                cols = slice(slice_offsets[s], slice_offsets[s + 1])
                out[t, cols] += scales[i, s] * sum(
                    (x[t] @ A_row(a_rows[i, s, j])) * B_row(b_rows[i, s, j], s) for j in range(ranks[i, s]))

Shape:
    prepare: seg_starts [N + 1] int32 (0 .. T); a_rows, b_rows [N, S, R] int32; ranks [N, S] int32;
             scales [N, S] f32; slice_offsets [S + 1] int32; W [U, UNIT] (any layer's pool)
    call:    x [T, IN]; W [U, UNIT] (as prepared); out [T, OUT_TOTAL]

Backends: the CPU one (kernels/cpu/prefill.py `PreparedPrefill`: per segment one matmul over a
view of its lora_A run and one in-place GEMM per slice into `out`, no `y`); the others (Triton,
reference) keep a scratch `y` and call their sgmv pair.
"""
from __future__ import annotations

import torch

from . import _checks as check
from ._registry import lookup

I32 = torch.int32
F32 = torch.float32


class PrefillStep:
    """A prepared prefill LoRA op; call it as `step(x, W, out)` for each layer."""

    def __init__(self, seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features: int, *,
                 backend: str | None = None, out_features: int | None = None):
        segments = check.prepared_args("prepare_prefill", self, a_rows, b_rows, ranks, scales, slice_offsets, W,
                                       in_features, out_features)
        device = self.device
        check.tensor("prepare_prefill", "seg_starts", seg_starts, (segments + 1,), I32, device)
        self.tokens = int(seg_starts[-1])
        name = backend or ("cpu" if device.type == "cpu" else None)
        if name == "cpu":
            self._run = lookup("PreparedPrefill", "cpu", device)(
                seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features)
        else:
            self._run = _TwoOps(seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, self.tokens, backend,
                                device)

    def __call__(self, x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> None:
        """out += the LoRA delta of every token (x [T, IN], W: this layer's pool, out [T, OUT_TOTAL])."""
        check.prepared_call("prefill_step", self, self.tokens, x, W, out)
        self._run(x, W, out)


class _TwoOps:
    """Triton / reference: sgmv_shrink into a scratch y, then sgmv_expand (arguments checked at
    prepare, so the backend functions are called directly)."""

    def __init__(self, seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, tokens, backend, device):
        self.args = (seg_starts, a_rows, b_rows, ranks, scales, slice_offsets)
        self.y = torch.empty((tokens,) + tuple(a_rows.shape[1:]), dtype=F32, device=device)  # y: [T, S, R]
        self.shrink = lookup("sgmv_shrink", backend, device)
        self.expand = lookup("sgmv_expand", backend, device)

    def __call__(self, x, W, out) -> None:
        seg_starts, a_rows, b_rows, ranks, scales, slice_offsets = self.args
        self.shrink(x, W, seg_starts, a_rows, ranks, self.y)
        self.expand(self.y, W, seg_starts, b_rows, ranks, scales, slice_offsets, out)


def prepare_prefill(seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features: int, *,
                    backend: str | None = None, out_features: int | None = None) -> PrefillStep:
    """A PrefillStep for one prefill batch and module group (see the module docstring)."""
    return PrefillStep(seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features, backend=backend,
                       out_features=out_features)
