"""Measurements of a running sidecar: `c` (tokens one core handles per layer within a budget)
and the synchronisation round trip. A mixin of `CpuLoraSidecar`, kept apart from the call path."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch

from caraserve_router.contracts import host_segments
from caraserve_router.lora.adapter_store import AdapterSpec, HostAdapter, HostLayout
from caraserve_router.lora.shapes import GROUPS, ModelShapes
from caraserve_router.lora.sidecar.jobs import Job
from caraserve_router.lora.sidecar.shm import H_ARM_SEQ, H_ARMED

log = logging.getLogger("caraserve.sidecar")

PROFILE_RANK = 16
PROFILE_LAYER_BUDGET_MS = 1.0  # per layer (all four groups) per core; see profile_tokens_per_core
PROFILE_SIZES = (16, 128)
PROFILE_REPEATS = 15


class SidecarMeasurement:
    """Measurement methods of `CpuLoraSidecar` (they use its call path with one worker, armed)."""

    @contextlib.contextmanager
    def _armed_for_measurement(self):
        """Armed for the block, then back to the caller's state."""
        was_armed = self._ctl.words[H_ARMED]
        self._ctl.words[H_ARMED] = 1
        self._ctl.words[H_ARM_SEQ] += 1
        try:
            yield
        finally:
            self._ctl.words[H_ARMED] = was_armed

    def sync_roundtrip_us(self, n: int = 1000, workers: Optional[int] = None) -> dict:
        """Round trip of the synchronisation alone: job words written -> every done word seen,
        with no rows. Uses the first `workers` ready workers (default: all), armed."""
        with self._lock:
            self._require_started()
            samples = []
            with self._armed_for_measurement():
                for _ in range(n):
                    start = time.perf_counter()
                    if not self._run(Job(0, GROUPS[0], [], 0), None, None, max_workers=workers):
                        raise RuntimeError("sidecar round trip failed (see the log)")
                    samples.append((time.perf_counter() - start) * 1e6)
        samples.sort()
        return {"workers": len([w for w in self._workers if w.ready(self._ctl)]) if workers is None else workers,
                "samples": n, "median_us": samples[n // 2], "p99_us": samples[min(n - 1, int(0.99 * n))],
                "mean_us": sum(samples) / n}

    def profile_tokens_per_core(self, budget_ms: float = PROFILE_LAYER_BUDGET_MS, rank: int = PROFILE_RANK) -> int:
        """Measure c: the tokens one worker computes for one layer (all four groups) within
        `budget_ms`, at `rank`, with one worker, armed. Fits t(T) = a + b * T per layer from two
        sizes; c = floor((budget - a) / b), in [1, max_tokens]. Sets and returns c."""
        with self._lock:
            self._require_started()
            adapter = ProfileAdapter(self.shapes, self.dtype, f"{self.shm_prefix}_scprof", rank)
            name = adapter.host.spec.name
            try:
                self.register_adapter(adapter.host)
                sizes = [min(s, self.max_tokens) for s in PROFILE_SIZES]
                with self._armed_for_measurement():
                    times = [self._time_layer(name, t) for t in sizes]
            finally:
                self.unregister_adapter(name)
                adapter.close()
            c, fixed, per_token = fit_tokens_per_core(sizes, times, budget_ms / 1e3, self.max_tokens)
            self.tokens_per_core = c
            self.profile = {"budget_ms": budget_ms, "rank": rank, "sizes": sizes,
                            "layer_ms": [1e3 * t for t in times], "fixed_us": 1e6 * fixed,
                            "per_token_us": 1e6 * per_token,
                            "tokens_per_ms": 1e-3 / per_token, "tokens_per_core": c}
            log.info("sidecar profile: %s", self.profile)
            return c

    def _time_layer(self, name: str, tokens: int) -> float:
        """Seconds of one layer's four group calls for `tokens` rows on one worker: per group the
        fastest of a few calls after a warm-up one (the least disturbed by other processes)."""
        total = 0.0
        for group in GROUPS:
            shape = self.shapes.group(group)
            x = torch.randn(tokens, shape.in_features).to(self.dtype)
            out = torch.zeros(tokens, shape.out_total, dtype=self.dtype)
            job = self._pack(0, group, [(0, tokens, name)], tokens)
            samples = []
            for _ in range(PROFILE_REPEATS + 1):
                start = time.perf_counter()
                if not self._run(job, x, out, max_workers=1):
                    raise RuntimeError("sidecar profiling call failed (see the log)")
                samples.append(time.perf_counter() - start)
            total += min(samples[1:])
        return total


def fit_tokens_per_core(sizes: list, times: list, budget: float, max_tokens: int) -> tuple[int, float, float]:
    """(c, fixed s, s per token) from layer times at two sizes: t(T) = fixed + per_token * T.
    A noisy, non-increasing pair falls back to no fixed part. When the fixed part alone
    exceeds the budget no split meets it, and c = 1 spreads every call over all workers."""
    per_token = (times[1] - times[0]) / max(1, sizes[1] - sizes[0])
    fixed = times[0] - per_token * sizes[0]
    if per_token <= 0 or fixed < 0:
        per_token, fixed = times[1] / sizes[1], 0.0
    c = int((budget - fixed) // per_token) if budget > fixed else 1
    return max(1, min(max_tokens, c)), fixed, per_token


class ProfileAdapter:
    """A random adapter of one rank, in its own segment, for profiling only."""

    def __init__(self, shapes: ModelShapes, dtype: torch.dtype, shm_name: str, rank: int,
                 name: str = "__sidecar_profile__"):
        layout = HostLayout(shapes, rank)
        nbytes = layout.total_floats() * torch.empty((), dtype=dtype).element_size()
        # a name of its own: nobody else maps it before it is filled below; closing unlinks it
        shm = host_segments.attach_or_make(shm_name, nbytes, lambda segment: None)
        spec = AdapterSpec(name=name, path="", rank=rank,
                           slice_ranks={g: (rank,) * shapes.group(g).num_slices for g in GROUPS},
                           target_modules=(), layers=(), use_rslora=False)
        self.host = HostAdapter(spec, layout, dtype, shm)
        generator = torch.Generator().manual_seed(0)
        self.host.flat.copy_(torch.randn(self.host.flat.numel(), generator=generator).to(dtype) * 0.01)

    def close(self) -> None:
        self.host.close()

