"""PerfModel: predicted step latencies of one serving instance, fitted from a profile.

Three linear models (least squares, fitted once with numpy; predictions are plain float
arithmetic, about a microsecond each):

- prefill of a batch:   ``p0 + p_tok * tokens [+ p_rt * rank * tokens]``
  (the rank x tokens term is kept only when it cuts the residual sum of squares by at least
  ``RANK_TERM_MIN_GAIN``; see ``fit_prefill``). For a batch of prompts, ``tokens`` and
  ``rank * tokens`` are summed over the prompts and ``p0`` is paid once.
- decode step, per kernel:
  ``bgmv``:  ``d0 + d_b * batch + d_r * batch * max_rank`` (Punica pads to the batch's max rank)
  ``mbgmv``: ``d0 + d_b * batch + d_r * sum_of_ranks``      (S-LoRA, no padding)
  each optionally ``+ d_any * [any request has an adapter]`` (fixed cost of running LoRA
  kernels in a step at all) and ``+ d_multi * [batch > 1]`` (a CPU's matrix-vector ->
  matrix-matrix switch); each kept only when the fit needs it, see ``fit_decode``
- adapter cold load: ``load_fixed_ms + load_ms_per_rank * rank`` (host -> device copy; from a
  profile of loads, or from link bandwidth and bytes per rank unit).

Plus the CPU-assist overhead: the fraction added to a step that runs while an adapter it
uses is still loading (CPUs compute that adapter's LoRA term), used by the simulator and
the residency-aware policy.

JSON layout (``save``/``load``; every field validated on load, errors name the field)::

    {"format": "caraserve-perf-model", "version": 1,
     "metadata": {"source": "profiled" | "assumed, from paper figures", "machine": str,
                  "date": str, "device": str, "model": str,
                  "emulated": {"device": bool, "link": bool}, ...free-form extras},
     "prefill": {"features": ["const", "tokens"(, "rank_x_tokens")], "coef": [...],
                 "r2": float|null, "rmse_ms": float|null, "n": int},
     "decode": {"bgmv":  {"features": ["const", "batch", "batch_x_max_rank"(, "any_lora")(, "multi_row")], ...},
                "mbgmv": {"features": ["const", "batch", "sum_ranks"(, ...)], ...}},   # one or both
     "load": {"fixed_ms": float, "ms_per_rank": float, "r2": float|null, "n": int,
              "bandwidth_gbps": float|null, "bytes_per_rank": int|null},
     "cpu_assist": {"prefill_overhead_frac": float},
     "grid": {"prefill": [{"tokens", "rank", "ms"}], "decode": [{"kernel", "ranks", "ms"}],
              "load": [{"rank", "ms"}]}}

A *profile* (the input of ``PerfModel.fit``) has the same ``metadata`` and the three raw
point lists at its top level (``prefill``, ``decode``, ``load``); instead of ``load`` points
it may give ``link: {"bandwidth_gbps", "bytes_per_rank", "latency_ms"}``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from caraserve_router.contracts.names import DecodeKernel, values

FORMAT = "caraserve-perf-model"
VERSION = 1
KERNELS = tuple(DecodeKernel)  # members compare and hash equal to their JSON strings
PREFILL_FEATURES = ("const", "tokens", "rank_x_tokens")
DECODE_FEATURES = {
    DecodeKernel.BGMV: ("const", "batch", "batch_x_max_rank"),
    DecodeKernel.MBGMV: ("const", "batch", "sum_ranks"),
}
# Optional decode features (indicators), tried in this order and each kept only when it
# removes RANK_TERM_MIN_GAIN of the remaining residual (like rank x tokens):
# - any_lora: 1 when any request of the batch has an adapter. A step that runs LoRA kernels at
#   all pays a fixed cost (per-step plans, one kernel call per layer and projection group)
#   whatever the ranks; on a GPU it is small, on a CPU it dominates the rank term.
# - multi_row: 1 when the batch has more than one request. On a CPU a one-row step is a
#   matrix-vector product and two rows already switch the base projections to a matrix-matrix
#   kernel (measured here: +33-48 ms per step; R^2 0.79 -> 0.91); on a GPU it is not selected.
ANY_LORA = "any_lora"
MULTI_ROW = "multi_row"
# name -> the indicator's value for a batch with these ranks (dict order: the order tried)
OPTIONAL_DECODE_FEATURES: dict[str, Callable[[Sequence[int]], float]] = {
    ANY_LORA: lambda ranks: float(max(ranks) > 0),
    MULTI_ROW: lambda ranks: float(len(ranks) > 1),
}
# The rank x tokens prefill term is kept only if it removes at least this fraction of the
# residual sum of squares of the fit without it (a pure-noise regressor removes ~1/(n-p)).
RANK_TERM_MIN_GAIN = 0.10
DEFAULT_CPU_ASSIST_OVERHEAD = 0.06


class PerfModelError(ValueError):
    """A perf model or profile that cannot be used; the message names the bad field."""


@dataclass(frozen=True)
class LinearFit:
    """Coefficients of one linear model, in the order of ``features``, with its fit quality."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    r2: float | None = None
    rmse_ms: float | None = None
    n: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"features": list(self.features), "coef": list(self.coef), "r2": self.r2,
                "rmse_ms": self.rmse_ms, "n": self.n}


@dataclass
class PerfModel:
    """Latency predictions of one instance. Build with ``fit``, ``from_coefficients`` or ``load``."""

    prefill: LinearFit
    decode: dict[DecodeKernel, LinearFit]
    load_fixed_ms: float = 0.0
    load_ms_per_rank: float = 0.0
    load_r2: float | None = None
    load_n: int = 0
    bandwidth_gbps: float | None = None
    bytes_per_rank: int | None = None
    cpu_assist_overhead: float = DEFAULT_CPU_ASSIST_OVERHEAD
    # Profiled cold-start inputs (scheduling/cold_costs.py): one sidecar worker's ms per token x
    # rank for one layer (None: not profiled), its workers, the model's layers, and the cost of
    # one layer waited on / handed to the sidecar.
    sidecar_ms_per_token_rank: float | None = None
    sidecar_workers: int = 1
    layers: int = 0
    layer_sync_ms: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=lambda: {"prefill": [], "decode": [], "load": []})

    def __post_init__(self) -> None:
        _validate_fit("prefill", self.prefill, allowed=(PREFILL_FEATURES[:2], PREFILL_FEATURES))
        unknown = sorted(set(self.decode) - set(KERNELS))
        if unknown or not self.decode:
            raise PerfModelError(f"perf model: decode must hold fits for one or more of {list(values(DecodeKernel))}, "
                                 f"got {sorted(self.decode)}")
        self.decode = {DecodeKernel(k): fit for k, fit in self.decode.items()}
        for kernel, fit in self.decode.items():
            _validate_fit(f"decode.{kernel}", fit, allowed=decode_feature_sets(kernel))
        for name in ("load_fixed_ms", "load_ms_per_rank", "cpu_assist_overhead"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise PerfModelError(f"perf model: {name} must be a number >= 0, got {value!r}")
        coef = self.prefill.coef
        self._p0 = float(coef[0])
        self._p_tok = float(coef[1])
        self._p_rt = float(coef[2]) if len(coef) == 3 else 0.0
        # per kernel: (d0, d_b, d_r, d_any, d_multi), absent optional terms 0
        self._dec = {k: tuple(float(c) for c in fit.coef[:3])
                     + tuple(dict(zip(fit.features, fit.coef)).get(f, 0.0) for f in OPTIONAL_DECODE_FEATURES)
                     for k, fit in self.decode.items()}

    # ------------------------------------------------------------------ predictions
    def predict_prefill_ms(self, tokens: int, rank: int = 0) -> float:
        """Prefill step of one prompt of ``tokens`` tokens with an adapter of ``rank`` (0: none)."""
        return self._p0 + self._p_tok * tokens + self._p_rt * rank * tokens

    def prefill_marginal_ms(self, tokens: int, rank: int = 0) -> float:
        """What one more prompt adds to a prefill batch that runs anyway."""
        return self._p_tok * tokens + self._p_rt * rank * tokens

    def prefill_batch_ms(self, total_tokens: int, total_rank_tokens: int) -> float:
        """Prefill step of a batch: sums of tokens and of rank x tokens over its prompts."""
        if total_tokens <= 0:
            return 0.0
        return self._p0 + self._p_tok * total_tokens + self._p_rt * total_rank_tokens

    def predict_decode_step_ms(self, ranks: Sequence[int], kernel: DecodeKernel | str) -> float:
        """One decode step of a batch whose requests use adapters of these ranks (0: none)."""
        if not ranks:
            return 0.0
        return self.decode_step_ms(len(ranks), sum(ranks), max(ranks), kernel)

    def decode_step_ms(self, batch: int, sum_ranks: int, max_rank: int, kernel: DecodeKernel | str) -> float:
        """Same as ``predict_decode_step_ms`` from the batch's size, sum and max of ranks."""
        if batch <= 0:
            return 0.0
        try:
            d0, d_b, d_r, d_any, d_multi = self._dec[kernel]
        except KeyError:
            if kernel not in KERNELS:
                raise PerfModelError(f"unknown decode kernel {kernel!r}; expected one of "
                                     f"{values(DecodeKernel)}") from None
            raise PerfModelError(f"this perf model has no decode fit for kernel {str(kernel)!r} "
                                 f"(profiled: {sorted(k.value for k in self._dec)})") from None
        feature = batch * max_rank if DecodeKernel(kernel).pads_to_max_rank else sum_ranks
        return (d0 + d_b * batch + d_r * feature + (d_any if max_rank > 0 else 0.0)
                + (d_multi if batch > 1 else 0.0))

    def predict_load_ms(self, rank: int) -> float:
        """Host -> device copy of an adapter of this rank (0 for no adapter)."""
        if rank <= 0:
            return 0.0
        return self.load_fixed_ms + self.load_ms_per_rank * rank

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_coefficients(cls, prefill: Sequence[float], bgmv: Sequence[float], mbgmv: Sequence[float],
                          load_fixed_ms: float = 0.0, load_ms_per_rank: float = 0.0,
                          cpu_assist_overhead: float = DEFAULT_CPU_ASSIST_OVERHEAD,
                          metadata: Mapping[str, Any] | None = None) -> "PerfModel":
        """A model from known coefficients (tests, assumed reference models)."""
        prefill = tuple(float(c) for c in prefill)
        features = PREFILL_FEATURES[: len(prefill)]
        return cls(
            prefill=LinearFit(features, prefill),
            decode={DecodeKernel.BGMV: LinearFit(DECODE_FEATURES[DecodeKernel.BGMV], tuple(map(float, bgmv))),
                    DecodeKernel.MBGMV: LinearFit(DECODE_FEATURES[DecodeKernel.MBGMV], tuple(map(float, mbgmv)))},
            load_fixed_ms=float(load_fixed_ms), load_ms_per_rank=float(load_ms_per_rank),
            cpu_assist_overhead=float(cpu_assist_overhead), metadata=dict(metadata or {}),
        )

    @classmethod
    def fit(cls, profile: Mapping[str, Any]) -> "PerfModel":
        """Fit every model from a profile (see the module docstring for its layout)."""
        if not isinstance(profile, Mapping):
            raise PerfModelError(f"profile must be a JSON object, got {type(profile).__name__}")
        prefill_pts = _prefill_points(profile.get("prefill"))
        decode_pts = _decode_points(profile.get("decode"))
        load_pts = _load_points(profile.get("load", []))
        prefill = fit_prefill(prefill_pts)
        decode = {k: fit_decode([p for p in decode_pts if p["kernel"] == k], k)
                  for k in KERNELS if any(p["kernel"] == k for p in decode_pts)}
        load_kwargs = _fit_load(load_pts, profile.get("link"))
        cpu = profile.get("cpu_assist", {}) or {}
        return cls(prefill=prefill, decode=decode,
                   cpu_assist_overhead=float(cpu.get("prefill_overhead_frac", DEFAULT_CPU_ASSIST_OVERHEAD)),
                   **_cold_inputs(cpu),
                   metadata=dict(profile.get("metadata", {}) or {}),
                   grid={"prefill": prefill_pts, "decode": decode_pts, "load": load_pts}, **load_kwargs)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "metadata": self.metadata,
            "prefill": self.prefill.to_json(),
            "decode": {k.value: self.decode[k].to_json() for k in KERNELS if k in self.decode},
            "load": {"fixed_ms": self.load_fixed_ms, "ms_per_rank": self.load_ms_per_rank,
                     "r2": self.load_r2, "n": self.load_n, "bandwidth_gbps": self.bandwidth_gbps,
                     "bytes_per_rank": self.bytes_per_rank},
            "cpu_assist": {"prefill_overhead_frac": self.cpu_assist_overhead,
                           "sidecar_ms_per_token_rank": self.sidecar_ms_per_token_rank,
                           "sidecar_workers": self.sidecar_workers, "layers": self.layers,
                           "layer_sync_ms": self.layer_sync_ms},
            "grid": self.grid,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, data: Any, source: str = "perf model") -> "PerfModel":
        if not isinstance(data, Mapping):
            raise PerfModelError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise PerfModelError(f"{source}: 'format' must be {FORMAT!r}, got {data.get('format')!r} "
                                 "(a raw profile? fit it with PerfModel.fit first)")
        if data.get("version") != VERSION:
            raise PerfModelError(f"{source}: unsupported version {data.get('version')!r} (expected {VERSION})")
        load = _require(data, "load", Mapping, source)
        cpu = data.get("cpu_assist") or {}
        grid = data.get("grid") or {"prefill": [], "decode": [], "load": []}
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise PerfModelError(f"{source}: metadata must be an object")
        decode = _require(data, "decode", Mapping, source)
        bad = sorted(set(decode) - set(KERNELS))
        if bad or not decode:
            raise PerfModelError(f"{source}: decode must hold fits for one or more of {list(values(DecodeKernel))}, "
                                 f"got {sorted(decode)}")
        return cls(
            prefill=_fit_from_json(_require(data, "prefill", Mapping, source), f"{source}: prefill"),
            decode={k: _fit_from_json(_require(decode, k, Mapping, f"{source}: decode"), f"{source}: decode.{k}")
                    for k in KERNELS if k in decode},
            load_fixed_ms=_number(load, "fixed_ms", f"{source}: load"),
            load_ms_per_rank=_number(load, "ms_per_rank", f"{source}: load"),
            load_r2=load.get("r2"), load_n=int(load.get("n", 0) or 0),
            bandwidth_gbps=load.get("bandwidth_gbps"), bytes_per_rank=load.get("bytes_per_rank"),
            cpu_assist_overhead=_number(cpu, "prefill_overhead_frac", f"{source}: cpu_assist",
                                        default=DEFAULT_CPU_ASSIST_OVERHEAD),
            **_cold_inputs(cpu, source), metadata=dict(metadata), grid=dict(grid),
        )

    @classmethod
    def load(cls, path: str | Path) -> "PerfModel":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PerfModelError(f"cannot read perf model {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PerfModelError(f"perf model {path} is not valid JSON: {exc}") from exc
        return cls.from_json(data, source=f"perf model {path}")

    def describe(self) -> str:
        """One line per model, for logs and reports."""
        src = self.metadata.get("source", "?")
        lines = [f"PerfModel ({src}; device {self.metadata.get('device', '?')})",
                 f"  prefill ms = {_formula(self.prefill)}  (R^2 {_fmt_r2(self.prefill.r2)})"]
        for k in KERNELS:
            if k in self.decode:
                lines.append(f"  decode {k} ms = {_formula(self.decode[k])}  (R^2 {_fmt_r2(self.decode[k].r2)})")
        lines.append(f"  load ms = {self.load_fixed_ms:.4g} + {self.load_ms_per_rank:.4g} * rank"
                     f"  (R^2 {_fmt_r2(self.load_r2)})")
        if self.sidecar_ms_per_token_rank is not None:
            lines.append(f"  cpu-assist: sidecar {1e3 * self.sidecar_ms_per_token_rank:.4g} us per token x rank x layer, "
                         f"{self.sidecar_workers} worker(s), {self.layers} layers, "
                         f"{1e3 * self.layer_sync_ms:.3g} us sync per layer (profiled)")
        else:
            lines.append(f"  cpu-assist prefill overhead = {self.cpu_assist_overhead:.3g} x prefill (assumed)")
        return "\n".join(lines)


# ---------------------------------------------------------------------- fitting
def least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float],
                  features: Sequence[str]) -> LinearFit:
    """Least squares with R^2 and RMSE (numpy; used only while fitting). Terms constant over the
    points are not fitted (coefficient 0). Every coefficient but
    the constant is kept >= 0, since more batch, rank or tokens never make a step faster (a
    noisy small profile can fit a negative rank slope, which would make a policy prefer high
    ranks): the most negative one is fixed at 0 and the rest refitted, until none is negative."""
    import numpy as np

    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise PerfModelError(f"need at least {len(features) + 1} points to fit {list(features)}, got {len(y)}")
    # Fit only the terms the points can support: a term that never varies over them (the rank
    # term of a profile taken without adapters) cannot be told from the constant; it stays 0.
    free = [j for j in range(x.shape[1]) if features[j] == "const" or np.ptp(x[:, j]) > 0]
    if x.shape[0] < len(free) + 1:
        names = [features[j] for j in free]
        raise PerfModelError(f"need at least {len(free) + 1} points to fit {names}, got {len(y)}")
    while True:
        sub, *_ = np.linalg.lstsq(x[:, free], y, rcond=None)
        coef = np.zeros(x.shape[1])
        coef[free] = sub
        negative = [j for j in free if features[j] != "const" and coef[j] < 0]
        if not negative:
            break
        free.remove(min(negative, key=lambda j: coef[j]))
    resid = y - x @ coef
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return LinearFit(tuple(features), tuple(float(c) for c in coef), r2, math.sqrt(ss_res / len(y)), len(y))


def fit_prefill(points: Sequence[Mapping[str, Any]]) -> LinearFit:
    """Prefill ms vs tokens; adds rank x tokens when that removes >= RANK_TERM_MIN_GAIN of the residual."""
    y = [p["ms"] for p in points]
    base = least_squares([(1.0, p["tokens"]) for p in points], y, PREFILL_FEATURES[:2])
    if len({p["rank"] for p in points}) < 2 or len(points) < 4:
        return base
    full = least_squares([(1.0, p["tokens"], p["rank"] * p["tokens"]) for p in points], y, PREFILL_FEATURES)
    ss_base = (base.rmse_ms or 0.0) ** 2 * base.n
    ss_full = (full.rmse_ms or 0.0) ** 2 * full.n
    if ss_base > 0 and (ss_base - ss_full) / ss_base >= RANK_TERM_MIN_GAIN:
        return full
    return base


def decode_features(ranks: Sequence[int], kernel: DecodeKernel | str) -> tuple[float, float, float]:
    batch = len(ranks)
    if DecodeKernel(kernel).pads_to_max_rank:
        return (1.0, float(batch), float(batch * max(ranks)))
    return (1.0, float(batch), float(sum(ranks)))


def decode_feature_sets(kernel: str) -> list[tuple[str, ...]]:
    """The feature lists a decode fit may have: the base three plus any optional ones, in order."""
    sets = [DECODE_FEATURES[kernel]]
    for name in OPTIONAL_DECODE_FEATURES:
        sets += [s + (name,) for s in sets]
    return sets


def fit_decode(points: Sequence[Mapping[str, Any]], kernel: str) -> LinearFit:
    """Least squares over the base features; each optional indicator is added (in order) when
    it removes >= RANK_TERM_MIN_GAIN of the residual sum of squares of the fit so far."""
    if not points:
        raise PerfModelError(f"profile has no decode points for kernel {kernel!r}")
    y = [p["ms"] for p in points]
    rows = [decode_features(p["ranks"], kernel) for p in points]
    features = DECODE_FEATURES[kernel]
    best = least_squares(rows, y, features)
    # A fit already exact to rounding has nothing left for a term to explain: what a further
    # term "removes" then is floating-point noise (it differs between BLAS builds).
    exact_ss = (1e-9 * max(abs(v) for v in y)) ** 2 * len(y)
    for name, indicator in OPTIONAL_DECODE_FEATURES.items():
        flags = [indicator(p["ranks"]) for p in points]
        if len(set(flags)) < 2 or len(points) < len(features) + 2:
            continue
        trial = least_squares([r + (f,) for r, f in zip(rows, flags)], y, features + (name,))
        ss_best = (best.rmse_ms or 0.0) ** 2 * best.n
        ss_trial = (trial.rmse_ms or 0.0) ** 2 * trial.n
        if ss_best > exact_ss and (ss_best - ss_trial) / ss_best >= RANK_TERM_MIN_GAIN:
            best, features = trial, features + (name,)
            rows = [r + (f,) for r, f in zip(rows, flags)]
    return best


def load_cost_from_link(bandwidth_gbps: float, bytes_per_rank: int, latency_ms: float = 0.0) -> tuple[float, float]:
    """(fixed_ms, ms_per_rank) of copying an adapter over a link of this bandwidth (GB/s = 1e9 B/s)."""
    if not (_is_number(bandwidth_gbps) and bandwidth_gbps > 0):
        raise PerfModelError(f"link.bandwidth_gbps must be > 0, got {bandwidth_gbps!r}")
    if not (_is_number(bytes_per_rank) and bytes_per_rank > 0):
        raise PerfModelError(f"link.bytes_per_rank must be > 0, got {bytes_per_rank!r}")
    return float(latency_ms), bytes_per_rank / (bandwidth_gbps * 1e9) * 1e3


def adapter_bytes_per_rank(num_layers: int, in_out_per_layer: Iterable[tuple[int, int]], dtype_bytes: int = 2) -> int:
    """Bytes of one rank unit of an adapter: (in + out) of every targeted projection, per layer."""
    return num_layers * sum(i + o for i, o in in_out_per_layer) * dtype_bytes


def _fit_load(points: list[dict], link: Any) -> dict[str, Any]:
    if points:
        if len(points) >= 3 and len({p["rank"] for p in points}) >= 2:
            fit = least_squares([(1.0, p["rank"]) for p in points], [p["ms"] for p in points], ("const", "rank"))
            fixed, per_rank = max(fit.coef[0], 0.0), max(fit.coef[1], 0.0)
            return {"load_fixed_ms": fixed, "load_ms_per_rank": per_rank, "load_r2": fit.r2, "load_n": fit.n}
        per_rank = sum(p["ms"] for p in points) / max(1, sum(p["rank"] for p in points))
        return {"load_fixed_ms": 0.0, "load_ms_per_rank": per_rank, "load_n": len(points)}
    if link is None:
        return {}
    if not isinstance(link, Mapping):
        raise PerfModelError("profile: link must be an object")
    fixed, per_rank = load_cost_from_link(link.get("bandwidth_gbps"), link.get("bytes_per_rank"),
                                          link.get("latency_ms", 0.0))
    return {"load_fixed_ms": fixed, "load_ms_per_rank": per_rank,
            "bandwidth_gbps": float(link["bandwidth_gbps"]), "bytes_per_rank": int(link["bytes_per_rank"])}


def _cold_inputs(cpu: Mapping, source: str = "profile") -> dict[str, Any]:
    """The profiled cold-start inputs of a `cpu_assist` object (absent: not profiled)."""
    side = cpu.get("sidecar_ms_per_token_rank")
    if side is not None and not (_is_number(side) and side > 0):
        raise PerfModelError(f"{source}: cpu_assist.sidecar_ms_per_token_rank must be > 0 or null, got {side!r}")
    out = {"sidecar_ms_per_token_rank": float(side) if side is not None else None,
           "sidecar_workers": int(cpu.get("sidecar_workers") or 1), "layers": int(cpu.get("layers") or 0),
           "layer_sync_ms": float(cpu.get("layer_sync_ms") or 0.0)}
    if out["sidecar_workers"] < 1 or out["layers"] < 0 or out["layer_sync_ms"] < 0:
        raise PerfModelError(f"{source}: cpu_assist workers must be >= 1, layers and layer_sync_ms >= 0")
    return out


# ---------------------------------------------------------------------- validation helpers
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(obj: Mapping, key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise PerfModelError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise PerfModelError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _number(obj: Mapping, key: str, where: str, default: float | None = None) -> float:
    if key not in obj and default is not None:
        return default
    value = obj.get(key)
    if not _is_number(value):
        raise PerfModelError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _fit_from_json(obj: Mapping, where: str) -> LinearFit:
    features = _require(obj, "features", list, where)
    coef = _require(obj, "coef", list, where)
    if len(features) != len(coef) or not all(_is_number(c) for c in coef):
        raise PerfModelError(f"{where}: 'coef' must be {len(features)} finite numbers (one per feature), got {coef!r}")
    r2 = obj.get("r2")
    if r2 is not None and not _is_number(r2):
        raise PerfModelError(f"{where}: 'r2' must be a number or null, got {r2!r}")
    return LinearFit(tuple(str(f) for f in features), tuple(float(c) for c in coef), r2,
                     obj.get("rmse_ms"), int(obj.get("n", 0) or 0))


def _validate_fit(where: str, fit: LinearFit, allowed: Sequence[Sequence[str]]) -> None:
    if tuple(fit.features) not in [tuple(a) for a in allowed]:
        raise PerfModelError(f"perf model: {where}.features must be one of {[list(a) for a in allowed]}, "
                             f"got {list(fit.features)}")
    if len(fit.coef) != len(fit.features) or not all(_is_number(c) for c in fit.coef):
        raise PerfModelError(f"perf model: {where}.coef must be {len(fit.features)} finite numbers, got {fit.coef!r}")


def _point_list(raw: Any, name: str) -> list:
    if not isinstance(raw, list) or not raw:
        raise PerfModelError(f"profile: {name!r} must be a non-empty list of points")
    return raw


def _int_field(p: Any, key: str, where: str, minimum: int = 0) -> int:
    if not isinstance(p, Mapping):
        raise PerfModelError(f"{where}: each point must be an object, got {p!r}")
    v = p.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise PerfModelError(f"{where}: {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _ms_field(p: Mapping, where: str) -> float:
    v = p.get("ms")
    if not _is_number(v) or v < 0:
        raise PerfModelError(f"{where}: 'ms' must be a number >= 0, got {v!r}")
    return float(v)


def _prefill_points(raw: Any) -> list[dict]:
    out = []
    for i, p in enumerate(_point_list(raw, "prefill")):
        w = f"profile: prefill[{i}]"
        out.append({"tokens": _int_field(p, "tokens", w, 1), "rank": _int_field(p, "rank", w), "ms": _ms_field(p, w)})
    return out


def _decode_points(raw: Any) -> list[dict]:
    out = []
    for i, p in enumerate(_point_list(raw, "decode")):
        w = f"profile: decode[{i}]"
        if not isinstance(p, Mapping):
            raise PerfModelError(f"{w}: each point must be an object, got {p!r}")
        if p.get("kernel") not in values(DecodeKernel):
            raise PerfModelError(f"{w}: 'kernel' must be one of {values(DecodeKernel)}, got {p.get('kernel')!r}")
        ranks = p.get("ranks")
        if not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) and r >= 0 for r in ranks):
            raise PerfModelError(f"{w}: 'ranks' must be a non-empty list of integers >= 0, got {ranks!r}")
        out.append({"kernel": p["kernel"], "ranks": list(ranks), "ms": _ms_field(p, w)})
    return out


def _load_points(raw: Any) -> list[dict]:
    if raw in (None, []):
        return []
    out = []
    for i, p in enumerate(_point_list(raw, "load")):
        w = f"profile: load[{i}]"
        out.append({"rank": _int_field(p, "rank", w, 1), "ms": _ms_field(p, w)})
    return out


def _formula(fit: LinearFit) -> str:
    return " + ".join(f"{c:.4g}" + ("" if f == "const" else f"*{f}") for f, c in zip(fit.features, fit.coef))


def _fmt_r2(r2: float | None) -> str:
    return "n/a (not fitted)" if r2 is None else f"{r2:.4f}"
