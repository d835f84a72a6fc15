"""LoraBatch: the LoRA side of one forward step (built once per step, used by every layer).

Rows are the step's requests, in batch order (prefill: one segment of tokens per request;
decode: one token per request). The kernel descriptors of docs/DESIGN.md (page table, per-slice
ranks, segment starts; padded to the max rank for Punica bgmv) are built here once; `add_delta` is what the layer
calls for each projection group.

The batch owns the step's LoRA state: the adapters still loading, the sidecar jobs in flight,
whether the sidecar is armed, and the step's counters (`counters`, folded into the runtime's
by `LoraRuntime.after_forward`). It carries out the mode's decisions (`modes.py`); the mode
itself writes nowhere. What it needs of the instance comes from a frozen `LoraStepContext`
(step_context.py), never from the runtime itself.

The descriptors are built on the host (`host_rows`) and moved to the device once per step
(`a_rows`, ...); a CUDA-graph step copies the host ones into its static buffers instead
(`graph_lora.StaticLoraDescriptors`), so nothing is read back from the device.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Optional

import torch

import kernels

from caraserve_router.lora.descriptors import group_rows, mask_rows
from caraserve_router.lora.modes import LayerDecision, Mode, StepDecision
from caraserve_router.lora.shapes import GROUPS
from caraserve_router.lora.step_context import LoraStepContext

log = logging.getLogger("caraserve.lora")


class LoraBatch:
    def __init__(self, ctx: LoraStepContext, entries: list, is_prefill: bool, seg_lens: Optional[list], mode: Mode,
                 sidecar=None, previous: Optional["LoraBatch"] = None):
        self.ctx = ctx
        self.pool = ctx.pool
        self.entries = entries  # PoolEntry or None per row
        self.is_prefill = is_prefill
        self.device = self.pool.device
        self.names = [e.name if e is not None else None for e in entries]
        self._loading = [e for e in {e.name: e for e in entries if e is not None}.values()
                         if not e.residency.all_ready()]
        if self._same_decode_rows(previous):
            self._reuse(previous)
        else:
            self._skip_cache: dict[tuple, tuple] = {}
            self._steps: dict[tuple, object] = {}  # (group, skip) -> prepared decode op, ("prefill", ...) sgmv op
            self._build_descriptors(seg_lens)
        self._decisions: dict[int, LayerDecision] = {}  # layer -> the mode's decision, once per layer
        self._mode = mode
        self._sidecar = sidecar
        self._tickets: dict[tuple, object] = {}  # (layer, group) -> sidecar job posted in begin()
        self.armed = False  # the sidecar was armed for this step (disarmed after the forward)
        self.counters: collections.Counter = collections.Counter()  # this step's; see LoraRuntime.counters

    # ---- descriptors ---------------------------------------------------------------------

    def _build_descriptors(self, seg_lens) -> None:
        n = len(self.entries)
        self.a_rows, self.b_rows, self.ranks, self.any_rank, self.host_rows = {}, {}, {}, {}, {}
        for g in GROUPS:
            # a_rows / b_rows [N, S, R_g] pool units, ranks [N, S] (descriptors.py), built on the host
            self.host_rows[g] = group_rows(self.entries, g, self.ctx.num_slices(g), torch.device("cpu"))
            self.a_rows[g], self.b_rows[g], self.ranks[g] = (t.to(self.device) for t in self.host_rows[g])
            self.any_rank[g] = any(any(e.slice_ranks[g]) for e in self.entries if e is not None)
        # [N, S] ones: the store folds lora_alpha / r into B, so the kernels' multiplier is 1
        self.scales = {g: torch.ones(self.ranks[g].shape, dtype=torch.float32, device=self.device) for g in GROUPS}
        if self.is_prefill:
            starts = [0]
            for length in seg_lens:
                starts.append(starts[-1] + length)
            self.row_starts = starts
            # A chunked-prefill step puts its decode rows first (one token each): they take the
            # decode kernel, the prompt chunks after them sgmv (a loop over segments on the CPU).
            self.decode_rows = next((i for i, length in enumerate(seg_lens) if length != 1), n)
            k = self.decode_rows
            self.seg_starts = torch.tensor([t - k for t in starts[k:]], dtype=torch.int32,
                                           device=self.device)  # [N - k + 1], of the rows after the decode rows
        else:
            self.row_starts = list(range(n + 1))
            self.decode_rows = n

    def _same_decode_rows(self, previous: Optional["LoraBatch"]) -> bool:
        """Decode steps repeat one batch for many steps: when this step's rows are the previous
        decode step's, pool entries included (a re-placed adapter is a new entry), and nothing
        is loading, its descriptors and prepared ops are this step's too."""
        return (previous is not None and not self.is_prefill and not previous.is_prefill
                and not self._loading and not previous._loading
                and len(previous.entries) == len(self.entries)
                and all(a is b for a, b in zip(previous.entries, self.entries)))

    def _reuse(self, previous: "LoraBatch") -> None:
        for name in ("a_rows", "b_rows", "ranks", "any_rank", "host_rows", "scales", "row_starts", "decode_rows",
                     "_skip_cache", "_steps"):
            setattr(self, name, getattr(previous, name))

    # ---- residency ----------------------------------------------------------------------

    def start(self) -> None:
        """Carry out the mode's step decision (before the forward)."""
        decision: StepDecision = self._mode.step(self._loading)
        if decision.wait_full:
            start = time.monotonic()
            for entry in decision.wait_full:
                entry.residency.wait_all()
            self.counters["full_wait_s"] += time.monotonic() - start
            self._loading = [e for e in self._loading if e not in decision.wait_full]
        if decision.arm_sidecar and self._sidecar is not None:
            self._sidecar.arm()
            self.armed = True
            self.counters["cpu_assisted_steps"] += 1

    def finish(self) -> None:
        """After the forward (also a failed one): disarm the sidecar if this step armed it."""
        if self.armed:
            self._sidecar.disarm()
            self.armed = False

    def _decision(self, layer: int) -> LayerDecision:
        """The mode's decision for the adapters not resident at `layer` (asked once per layer,
        for all its groups, so every group of a layer takes the same path)."""
        if not self._loading:
            return LayerDecision()
        if layer not in self._decisions:
            pending = [e for e in self._loading if not e.residency.is_ready(layer)]
            self._decisions[layer] = self._mode.layer(pending) if pending else LayerDecision()
        return self._decisions[layer]

    def _wait(self, layer: int, entries: tuple) -> None:
        start = time.monotonic()
        for entry in entries:
            entry.residency.wait(layer)
        self.counters["layer_wait_s"] += time.monotonic() - start

    def row_segments(self, names) -> list:
        """(row_start, row_end, adapter) of every row/segment using one of `names`."""
        wanted = set(names)
        return [(self.row_starts[i], self.row_starts[i + 1], name)
                for i, name in enumerate(self.names) if name in wanted]

    # ---- compute ------------------------------------------------------------------------

    def begin(self, layer: int, group: str, x: torch.Tensor) -> None:
        """Called before the base projection: posts the rows the sidecar computes at `layer`
        (cpu-assist), so the CPU computes while the device runs the base matmul."""
        if not self.any_rank[group]:
            return
        decision = self._decision(layer)
        if decision.sidecar:
            segments = self.row_segments(e.name for e in decision.sidecar)
            self._tickets[(layer, group)] = self._sidecar.submit(layer, group, x, segments)

    def _resolve(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> tuple:
        """Carry out the layer's decision for `group`; returns the adapter names whose rows the
        device kernel must skip (their delta is already in `out`)."""
        decision = self._decision(layer)
        if decision.wait:
            self._wait(layer, decision.wait)
        if not decision.sidecar:
            return ()
        start = time.monotonic()
        ticket = self._tickets.pop((layer, group), None)
        if ticket is not None:
            ok = self._sidecar.collect(ticket, out)
        else:
            segments = self.row_segments(e.name for e in decision.sidecar)
            ok = self._sidecar.compute(layer, group, x, segments, out)
        self.counters["sidecar_s"] += time.monotonic() - start
        if ok:
            self.counters["sidecar_calls"] += 1
            return tuple(e.name for e in decision.sidecar)
        self.counters["sidecar_fallbacks"] += 1
        log.warning("sidecar missed layer %d %s; waiting for the device copy instead", layer, group)
        self._wait(layer, decision.sidecar)
        return ()

    @property
    def graphable(self) -> bool:
        """Can this step replay a CUDA graph? Only when nothing is loading: the per-layer waits
        and sidecar calls of a loading step are host work between launches."""
        return not self.is_prefill and not self._loading and not self.armed

    def add_delta(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor,
                  out_hi: Optional[torch.Tensor] = None) -> bool:
        """out += LoRA delta of `group` at `layer` for every row. Shape: x [T, IN], out [T, OUT].

        With `out_hi`, the group's output lives in two buffers (qkv: q, and k|v written into the
        KV staging rows): out [T, OUT_lo] holds the leading slices, out_hi [T, OUT - OUT_lo] the
        rest, split at a slice boundary. A decode step's expand then accumulates into both
        directly on the Triton path (`DecodeStep.split`: two launches); the CPU's fused path,
        prompt segments and loading steps go through one scratch [T, OUT] and two adds.

        Returns False when no row has an adapter targeting this group (outputs untouched).
        """
        if not self.any_rank[group]:
            return False
        if out_hi is not None and (self.decode_rows < len(self.entries) or self._loading):
            delta = torch.zeros((x.shape[0], out.shape[1] + out_hi.shape[1]), dtype=x.dtype, device=x.device)
            self.add_delta(layer, group, x, delta)
            out.add_(delta[:, : out.shape[1]])
            out_hi.add_(delta[:, out.shape[1]:])
            return True
        skip = self._resolve(layer, group, x, out) if self._loading else ()
        w = self.pool.layer_pool(layer)  # [U, UNIT]
        k = self.decode_rows
        if k and out_hi is not None:  # decode rows only: Triton's two launches (others: scratch + adds)
            self._decode_step(group, skip, w, x.shape[1]).split(x, w, out, out_hi)
            return True
        if k:  # decode rows: x[:k] and out[:k] are the leading rows (contiguous views)
            self._decode_step(group, skip, w, x.shape[1])(x[:k], w, out[:k])
        if k < len(self.entries):  # prompt segments (prefill, or the chunks of a mixed step)
            self._prefill_step(group, skip, w, x.shape[1])(x[k:], w, out[k:])
        return True

    def _prefill_step(self, group: str, skip: tuple, w: torch.Tensor, in_features: int):
        """The group's prepared sgmv op for the prompt segments (kernels.prepare_prefill), built
        at the step's first layer and reused by every other."""
        key = ("prefill", group, skip)
        step = self._steps.get(key)
        if step is None:
            k = self.decode_rows
            step = self._steps[key] = kernels.prepare_prefill(
                self.seg_starts, *(t[k:] for t in self._masked(group, skip)), self.scales[group][k:],
                self.ctx.slice_offsets[group], w, in_features, out_features=self.ctx.out_features(group),
                backend=self.ctx.kernel_backend)
        return step

    def _decode_step(self, group: str, skip: tuple, w: torch.Tensor, in_features: int):
        """The group's prepared decode op for the decode rows (kernels.prepare_decode): built at
        the step's first layer, reused by every other (the descriptors are the same for all
        layers); Punica's bgmv pads them to the max rank (kernels.pad_to_max_rank)."""
        key = (group, skip)
        step = self._steps.get(key)
        if step is None:
            k = self.decode_rows
            descriptors = tuple(t[:k] for t in self._masked(group, skip))
            if self.ctx.decode_kernel.pads_to_max_rank:
                descriptors = kernels.pad_to_max_rank(*descriptors, zero_unit=0)
            step = self._steps[key] = kernels.prepare_decode(
                *descriptors, self.scales[group][:k], self.ctx.slice_offsets[group], w, in_features,
                out_features=self.ctx.out_features(group), backend=self.ctx.kernel_backend)
        return step

    def _masked(self, group: str, skip: tuple):
        """(a_rows, b_rows, ranks) of `group` with the rows of `skip` adapters zeroed (already
        handled)."""
        key = (group, skip)
        if key not in self._skip_cache:
            rows = torch.tensor([name in skip for name in self.names], device=self.device) if skip else None
            self._skip_cache[key] = (self.a_rows[group], self.b_rows[group], mask_rows(self.ranks[group], rows))
        return self._skip_cache[key]
