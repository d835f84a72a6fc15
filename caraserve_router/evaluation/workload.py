"""Request workloads shared by the trace replay client and the simulator.

A workload is a list of ``Request`` (arrival time, adapter, rank, prompt and output lengths),
fully determined by a ``WorkloadConfig`` (same config and seed -> same workload):

- arrivals: ``trace`` (the Azure LLM inference trace's timestamps, rescaled to ``rate`` if
  given; when the trace runs out before ``duration_s`` it is replayed again after one mean
  gap), ``poisson`` (exponential gaps) or ``gamma`` (gamma gaps with coefficient of variation
  ``cv``; ``cv`` = 1 is Poisson);
- lengths: ``sharegpt`` (rows of the ShareGPT first-turn length file, sampled uniformly),
  ``trace`` (the Azure trace's ContextTokens / GeneratedTokens; row i goes with arrival i when
  arrivals come from the trace too, else rows are sampled), or ``fixed``; then scaled by
  ``prompt_scale`` / ``output_scale`` (rounded) and clipped to [min, max]: every change is
  listed in ``Workload.notes`` (print them);
- adapters: index drawn by S-LoRA's power law ``int(power(alpha) * num_adapters)``
  (alpha < 1 favours low indices), by a bounded zipf (P(k) ~ 1 / (k + 1) ** zipf_s) or
  uniformly; rank of adapter k = ``ranks[k % len(ranks)]`` (round robin over the list);
  name ``f"{adapter_prefix}{k}"``.

Default data files live outside the repository, in ``../shared/traces/`` relative to the repo
root (see ``DEFAULT_TRACE`` / ``DEFAULT_LENGTHS``); any path can be given instead.
"""
from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
DEFAULT_LENGTHS = REPO_ROOT.parent / "shared" / "traces" / "sharegpt_v3_firstturn_lengths_cl100k.csv"
ARRIVALS = ("trace", "poisson", "gamma")
LENGTHS = ("sharegpt", "trace", "fixed")
POPULARITY = ("power", "zipf", "uniform")


class WorkloadError(ValueError):
    """Bad workload configuration or unreadable data file."""


@dataclass(frozen=True)
class WorkloadConfig:
    """What to generate. See the module docstring for the meaning of each source.

    arrival: "trace" | "poisson" | "gamma".
    rate: requests per second (required for poisson/gamma; with "trace", None keeps the
        trace's own rate, about 5.5 req/s).
    cv: coefficient of variation of the gaps for "gamma".
    duration_s: arrivals in [0, duration_s); None: only num_requests bounds it.
    num_requests: at most this many requests (None: no cap). One of the two is required.
    lengths: "sharegpt" | "trace" | "fixed" (then prompt_len / output_len).
    trace_path / lengths_path: data files (None: the defaults under ../shared/traces/).
    prompt_scale / output_scale: multiply raw lengths (then round) before clipping.
    min_/max_prompt_tokens, min_/max_output_tokens: clipping bounds (max None: no bound).
    num_adapters, popularity ("power" | "zipf" | "uniform"), alpha (power law exponent),
    zipf_s (zipf exponent), ranks (assigned round robin by adapter index), adapter_prefix.
    seed: every random draw derives from it.
    """

    arrival: str = "poisson"
    rate: float | None = 5.0
    cv: float = 1.0
    duration_s: float | None = 60.0
    num_requests: int | None = None
    lengths: str = "sharegpt"
    trace_path: str | None = None
    lengths_path: str | None = None
    prompt_len: int = 128
    output_len: int = 128
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    min_prompt_tokens: int = 1
    max_prompt_tokens: int | None = None
    min_output_tokens: int = 1
    max_output_tokens: int | None = None
    num_adapters: int = 128
    popularity: str = "power"
    alpha: float = 0.5
    zipf_s: float = 1.0
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    adapter_prefix: str = "lora-"
    seed: int = 0

    def __post_init__(self) -> None:
        _choice(self.arrival, ARRIVALS, "arrival")
        _choice(self.lengths, LENGTHS, "lengths")
        _choice(self.popularity, POPULARITY, "popularity")
        if self.arrival != "trace" and self.rate is None:
            raise WorkloadError(f"arrival {self.arrival!r} needs a rate (requests/s)")
        if self.rate is not None:
            _positive(self.rate, "rate")
        if self.duration_s is None and self.num_requests is None:
            raise WorkloadError("give duration_s or num_requests (or both) to bound the workload")
        if self.duration_s is not None:
            _positive(self.duration_s, "duration_s")
        if self.num_requests is not None and (not isinstance(self.num_requests, int) or self.num_requests < 1):
            raise WorkloadError(f"num_requests must be an integer >= 1, got {self.num_requests!r}")
        for name in ("cv", "prompt_scale", "output_scale", "alpha", "zipf_s"):
            _positive(getattr(self, name), name)
        for name in ("prompt_len", "output_len", "min_prompt_tokens", "min_output_tokens", "num_adapters"):
            _int_at_least(getattr(self, name), name, 1)
        for lo, hi in (("min_prompt_tokens", "max_prompt_tokens"), ("min_output_tokens", "max_output_tokens")):
            if getattr(self, hi) is not None:
                _int_at_least(getattr(self, hi), hi, getattr(self, lo))
        if not self.ranks or not all(isinstance(r, int) and r >= 1 for r in self.ranks):
            raise WorkloadError(f"ranks must be a non-empty list of integers >= 1, got {self.ranks!r}")


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float
    adapter_index: int
    adapter: str
    rank: int
    prompt_tokens: int
    output_tokens: int


@dataclass
class Workload:
    config: WorkloadConfig
    requests: list[Request]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    def summary(self) -> dict[str, Any]:
        reqs = self.requests
        if not reqs:
            return {"requests": 0}
        t = np.array([r.arrival_s for r in reqs])
        gaps = np.diff(t)
        span = float(t[-1] - t[0]) if len(t) > 1 else 0.0
        return {
            "requests": len(reqs),
            "span_s": span,
            "rate": (len(reqs) - 1) / span if span > 0 else None,
            "gap_cv": float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else None,
            "prompt_mean": float(np.mean([r.prompt_tokens for r in reqs])),
            "output_mean": float(np.mean([r.output_tokens for r in reqs])),
            "adapters_used": len({r.adapter_index for r in reqs}),
        }

    def describe(self) -> str:
        s = self.summary()
        head = (f"workload: {s['requests']} requests over {s.get('span_s', 0):.1f} s "
                f"(rate {s.get('rate') or 0:.2f} req/s, gap CV {s.get('gap_cv') or 0:.2f}), "
                f"prompt mean {s.get('prompt_mean', 0):.1f}, output mean {s.get('output_mean', 0):.1f} tokens, "
                f"{s.get('adapters_used', 0)} adapters used")
        return "\n".join([head] + [f"  {n}" for n in self.notes])


# ---------------------------------------------------------------------- data files
def resolve_path(path: str | Path | None, default: Path) -> Path:
    """A given path as is (relative to the working directory, else to the repo root); None: the default."""
    if path is None:
        return default
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


@functools.lru_cache(maxsize=8)
def _read_csv(path: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = tuple(next(reader))
            rows = tuple(tuple(r) for r in reader if r)
    except FileNotFoundError:
        raise WorkloadError(f"data file {path} not found (pass its path explicitly)") from None
    except (OSError, StopIteration, csv.Error) as exc:
        raise WorkloadError(f"cannot read CSV {path}: {exc}") from exc
    return header, rows


def _columns(path: Path, wanted: tuple[str, ...]) -> list[tuple[str, ...]]:
    header, rows = _read_csv(str(path))
    missing = [c for c in wanted if c not in header]
    if missing:
        raise WorkloadError(f"{path} lacks column(s) {missing} (has {list(header)})")
    idx = [header.index(c) for c in wanted]
    if not rows:
        raise WorkloadError(f"{path} has no data rows")
    return [tuple(row[i] for i in idx) for row in rows]


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch of 'YYYY-MM-DD HH:MM:SS[.fffffff]' (any number of fractional digits)."""
    text = text.strip()
    whole, _, frac = text.partition(".")
    try:
        base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        return base.timestamp() + (float("0." + frac) if frac else 0.0)
    except ValueError as exc:
        raise WorkloadError(f"bad TIMESTAMP {text!r}: {exc}") from None


def load_azure_trace(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival seconds from the first request, context tokens, generated tokens) of the trace."""
    return _load_azure_trace(str(resolve_path(path, DEFAULT_TRACE)))


@functools.lru_cache(maxsize=4)
def _load_azure_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = Path(path)
    rows = _columns(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    try:
        t = np.array([parse_timestamp(r[0]) for r in rows])
        ctx = np.array([int(r[1]) for r in rows], dtype=np.int64)
        gen = np.array([int(r[2]) for r in rows], dtype=np.int64)
    except ValueError as exc:
        raise WorkloadError(f"{path}: bad value: {exc}") from None
    order = np.argsort(t, kind="stable")
    t = t[order]
    return t - t[0], ctx[order], gen[order]


def load_sharegpt_lengths(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    path = resolve_path(path, DEFAULT_LENGTHS)
    rows = _columns(path, ("prompt_tokens", "output_tokens"))
    try:
        return (np.array([int(r[0]) for r in rows], dtype=np.int64),
                np.array([int(r[1]) for r in rows], dtype=np.int64))
    except ValueError as exc:
        raise WorkloadError(f"{path}: bad value: {exc}") from None


# ---------------------------------------------------------------------- generation
def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _gamma_times(cfg: WorkloadConfig, n_max: int) -> np.ndarray:
    rng = _rng(cfg.seed, 1)
    shape = 1.0 / (cfg.cv ** 2)
    out: list[np.ndarray] = []
    total, last = 0, 0.0
    while True:
        chunk = rng.gamma(shape, 1.0 / (cfg.rate * shape), size=4096)
        times = last + np.cumsum(chunk)
        out.append(times)
        total += len(times)
        last = float(times[-1])
        if total >= n_max or (cfg.duration_s is not None and last >= cfg.duration_s):
            break
    return np.concatenate(out)


def _trace_times(cfg: WorkloadConfig, n_max: int, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times and the trace row of each arrival (for trace-aligned lengths)."""
    t, _, _ = load_azure_trace(cfg.trace_path)
    span = float(t[-1])
    native = (len(t) - 1) / span if span > 0 else 1.0
    factor = native / cfg.rate if cfg.rate else 1.0
    period = (span + span / max(1, len(t) - 1)) * factor       # trace length plus one mean gap
    notes.append(f"arrivals: Azure trace timestamps ({len(t)} rows, native {native:.2f} req/s)"
                 + (f", time-scaled x{factor:.4g} to {cfg.rate:g} req/s" if cfg.rate else ""))
    bounds = []
    if cfg.duration_s is not None:
        bounds.append(math.ceil(cfg.duration_s / period))
    if n_max < math.inf:
        bounds.append(math.ceil(n_max / len(t)))
    reps = max(1, min(bounds))
    times = np.concatenate([t * factor + k * period for k in range(reps)])
    rows = np.tile(np.arange(len(t)), reps)
    if reps > 1:
        notes.append(f"arrivals: trace replayed {reps} times back to back (period {period:.1f} s)")
    return times, rows


def _arrivals(cfg: WorkloadConfig, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    n_max = cfg.num_requests if cfg.num_requests is not None else math.inf
    if cfg.arrival == "trace":
        times, rows = _trace_times(cfg, n_max, notes)
    else:
        bound = n_max if n_max < math.inf else int(cfg.rate * cfg.duration_s * 1.5 + 100)
        times, rows = _gamma_times(cfg, bound), None
        notes.append(f"arrivals: {cfg.arrival}, {cfg.rate:g} req/s"
                     + (f", gap CV {cfg.cv:g}" if cfg.arrival == "gamma" else ""))
    keep = times < cfg.duration_s if cfg.duration_s is not None else np.ones(len(times), bool)
    times = times[keep]
    rows = rows[keep] if rows is not None else None
    if n_max < math.inf:
        times = times[: int(n_max)]
        rows = rows[: int(n_max)] if rows is not None else None
    return times, rows


def _raw_lengths(cfg: WorkloadConfig, n: int, rows: np.ndarray | None, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if cfg.lengths == "fixed":
        notes.append(f"lengths: fixed, prompt {cfg.prompt_len}, output {cfg.output_len}")
        return np.full(n, cfg.prompt_len), np.full(n, cfg.output_len)
    if cfg.lengths == "trace":
        _, p, o = load_azure_trace(cfg.trace_path)
        src = "Azure trace ContextTokens / GeneratedTokens"
    else:
        p, o = load_sharegpt_lengths(cfg.lengths_path)
        src = "ShareGPT first-turn prompt_tokens / output_tokens"
    if rows is not None and cfg.lengths == "trace":
        pick = rows
        notes.append(f"lengths: {src}, row of each trace arrival")
    else:
        pick = _rng(cfg.seed, 2).integers(0, len(p), size=n)
        notes.append(f"lengths: {src}, {len(p)} rows sampled uniformly with replacement")
    return p[pick], o[pick]


def _shape(raw: np.ndarray, scale: float, lo: int, hi: int | None, what: str, notes: list[str]) -> np.ndarray:
    vals = np.rint(raw * scale).astype(np.int64) if scale != 1.0 else raw.astype(np.int64)
    n_lo = int((vals < lo).sum())
    n_hi = int((vals > hi).sum()) if hi is not None else 0
    out = np.clip(vals, lo, hi if hi is not None else None)
    desc = f"{what}: raw mean {raw.mean():.1f} max {raw.max()}"
    if scale != 1.0:
        desc += f", scaled x{scale:g}"
    desc += f", clipped to [{lo}, {hi if hi is not None else 'inf'}]: {n_hi} cut to the max, {n_lo} raised to the min"
    notes.append(desc + f"; final mean {out.mean():.1f} max {out.max()}" if len(out) else desc)
    return out


def _adapters(cfg: WorkloadConfig, n: int, notes: list[str]) -> np.ndarray:
    rng = _rng(cfg.seed, 3)
    k = cfg.num_adapters
    if cfg.popularity == "power":
        idx = np.minimum((rng.power(cfg.alpha, size=n) * k).astype(np.int64), k - 1)
        notes.append(f"adapters: {k}, power law alpha {cfg.alpha:g} (S-LoRA: int(power(alpha) * n))")
    elif cfg.popularity == "zipf":
        w = 1.0 / np.arange(1, k + 1) ** cfg.zipf_s
        idx = rng.choice(k, size=n, p=w / w.sum())
        notes.append(f"adapters: {k}, zipf s {cfg.zipf_s:g}")
    else:
        idx = rng.integers(0, k, size=n)
        notes.append(f"adapters: {k}, uniform")
    notes.append(f"ranks: round robin by adapter index over {list(cfg.ranks)}")
    return idx


def generate(cfg: WorkloadConfig) -> Workload:
    """Build the workload of ``cfg`` (deterministic in ``cfg``)."""
    notes: list[str] = []
    times, rows = _arrivals(cfg, notes)
    n = len(times)
    raw_p, raw_o = _raw_lengths(cfg, n, rows, notes)
    prompts = _shape(raw_p, cfg.prompt_scale, cfg.min_prompt_tokens, cfg.max_prompt_tokens, "prompt tokens", notes)
    outputs = _shape(raw_o, cfg.output_scale, cfg.min_output_tokens, cfg.max_output_tokens, "output tokens", notes)
    adapters = _adapters(cfg, n, notes)
    ranks = cfg.ranks
    reqs = [Request(i, float(times[i]), int(a), f"{cfg.adapter_prefix}{int(a)}", ranks[int(a) % len(ranks)],
                    int(prompts[i]), int(outputs[i])) for i, a in enumerate(adapters)]
    return Workload(cfg, reqs, notes)


# ---------------------------------------------------------------------- validation helpers
def _choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise WorkloadError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise WorkloadError(f"{name} must be a finite number > 0, got {value!r}")


def _int_at_least(value: Any, name: str, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise WorkloadError(f"{name} must be an integer >= {lo}, got {value!r}")
