"""A measured step-time table: what the simulator takes as the truth (`scripts/simulate.py --truth`).

The simulator's policies predict with a fitted PerfModel; with a truth table the simulated steps
are drawn from measurements instead, so a policy is no longer graded with its own answer key:

- prefill: measured ms per (tokens, rank), repeats kept; piecewise linear in tokens (linear
  extrapolation past the ends from the outer two lengths), linear in rank between measured ranks;
- decode: per kernel and measured batch size, a line through that batch's rank mixes in the
  kernel's feature (mbgmv: sum of ranks; bgmv: batch x max rank), interpolated between batch
  sizes (extrapolated past the largest from the outer two);
- noise: each drawn step is the interpolated mean times one of the measured repeats' ratios to
  their own mean (per kind), so the simulated spread is the measured one;
- cold loads: `fixed_ms + rank x bytes_per_rank / bytes_per_ms` of the measured link;
- the sidecar: ms per token x rank for one layer on one worker, and the host's workers, which
  concurrent cpu-assisted prefills of a host queue for (`SidecarHost`).

JSON: {"format": "caraserve-truth-table", "version": 1, "name", "device", "source",
"measured": [what was measured], "not_measured": [what was derived, and from what],
"prefill": [{"tokens", "rank", "ms": [...]}], "decode": [{"kernel", "batch", "feature", "ms": [...]}],
"load": {"fixed_ms", "bytes_per_rank", "bytes_per_ms"}, "sidecar": {"ms_per_token_rank", "workers"} | null,
"layers": int}.
"""
from __future__ import annotations

import bisect
import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "caraserve-truth-table"
VERSION = 1
KERNEL_FEATURE = {"mbgmv": "sum_ranks", "bgmv": "batch_x_max_rank"}


class TruthTableError(ValueError):
    """A truth table that cannot be used; the message names the field."""


def _interp(xs: list, ys: list, x: float) -> float:
    """Piecewise linear through (xs, ys) (xs sorted, distinct); linear past the ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0] if xs[0] else ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _line(points: list) -> tuple[float, float]:
    """Least squares a + b x over (x, y) points; b >= 0 (more rank never makes a step faster)."""
    if len({x for x, _ in points}) < 2:
        return statistics.mean(y for _, y in points), 0.0
    mx = statistics.mean(x for x, _ in points)
    my = statistics.mean(y for _, y in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    b = max(0.0, b)
    return my - b * mx, b


@dataclass
class TruthTable:
    name: str
    device: str
    prefill: list            # [{"tokens", "rank", "ms": [..]}]
    decode: list             # [{"kernel", "batch", "feature", "ms": [..]}]
    load: dict               # {"fixed_ms", "bytes_per_rank", "bytes_per_ms"}
    layers: int
    sidecar: dict | None = None
    measured: list = field(default_factory=list)
    not_measured: list = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise TruthTableError(f"truth table {self.name!r}: prefill and decode must be non-empty")
        for where, rows in (("prefill", self.prefill), ("decode", self.decode)):
            for i, row in enumerate(rows):
                ms = row.get("ms")
                if not isinstance(ms, list) or not ms or not all(isinstance(v, (int, float)) and v > 0 for v in ms):
                    raise TruthTableError(f"truth table {self.name!r}: {where}[{i}].ms must be a non-empty "
                                          f"list of times > 0, got {ms!r}")
        for key in ("fixed_ms", "bytes_per_rank", "bytes_per_ms"):
            if not isinstance(self.load.get(key), (int, float)) or self.load[key] < 0:
                raise TruthTableError(f"truth table {self.name!r}: load.{key} must be a number >= 0")
        if self.load["bytes_per_ms"] <= 0:
            raise TruthTableError(f"truth table {self.name!r}: load.bytes_per_ms must be > 0")
        # prefill: rank -> (sorted tokens, mean ms)
        by_rank: dict = {}
        for row in self.prefill:
            by_rank.setdefault(int(row["rank"]), {}).setdefault(int(row["tokens"]), []).extend(row["ms"])
        self._prefill = {r: (sorted(d), [statistics.mean(d[t]) for t in sorted(d)]) for r, d in by_rank.items()}
        self._prefill_ranks = sorted(self._prefill)
        # decode: kernel -> (sorted batches, [(a, b)] lines in the kernel's feature)
        lines: dict = {}
        for row in self.decode:
            for v in row["ms"]:
                lines.setdefault(row["kernel"], {}).setdefault(int(row["batch"]), []).append((row["feature"], v))
        self._decode = {k: (sorted(d), [_line(d[b]) for b in sorted(d)]) for k, d in lines.items()}
        self._noise = {kind: self._ratios(rows) for kind, rows in (("prefill", self.prefill), ("decode", self.decode))}

    @staticmethod
    def _ratios(rows: list) -> list:
        """Each repeat over its point's mean: the measured relative spread (1.0 if one repeat each)."""
        out = [v / statistics.mean(r["ms"]) for r in rows if len(r["ms"]) > 1 for v in r["ms"]]
        return out or [1.0]

    # ------------------------------------------------------------------ draws
    def noise(self, kind: str, rng: random.Random | None) -> float:
        return rng.choice(self._noise[kind]) if rng is not None else 1.0

    def prefill_ms(self, tokens: int, rank: int = 0, rng: random.Random | None = None) -> float:
        ranks = self._prefill_ranks
        if rank <= ranks[0] or len(ranks) == 1:
            mean = _interp(*self._prefill[ranks[0] if rank <= ranks[0] else ranks[-1]], tokens)
        else:
            i = min(bisect.bisect_left(ranks, rank), len(ranks) - 1)
            r0, r1 = ranks[i - 1], ranks[i]
            y0, y1 = _interp(*self._prefill[r0], tokens), _interp(*self._prefill[r1], tokens)
            mean = max(0.0, y0 + (y1 - y0) * (rank - r0) / (r1 - r0))
        return mean * self.noise("prefill", rng)

    def prefill_batch_ms(self, prompts: list, rng: random.Random | None = None) -> float:
        """A prefill batch of (tokens, rank) prompts: the table's step at the batch's tokens and
        its token-weighted mean rank (measured points are single prompts)."""
        tokens = sum(t for t, _ in prompts)
        if tokens <= 0:
            return 0.0
        rank = sum(t * r for t, r in prompts) / tokens
        return self.prefill_ms(tokens, rank, rng)

    def decode_ms(self, batch: int, sum_ranks: int, max_rank: int, kernel: str,
                  rng: random.Random | None = None) -> float:
        if batch <= 0:
            return 0.0
        try:
            batches, lines = self._decode[str(kernel)]
        except KeyError:
            raise TruthTableError(f"truth table {self.name!r} has no decode steps for kernel {kernel!r} "
                                  f"(measured: {sorted(self._decode)})") from None
        feature = sum_ranks if KERNEL_FEATURE.get(str(kernel)) == "sum_ranks" else batch * max_rank
        at = [a + b * feature for a, b in lines]
        return _interp(batches, at, batch) * self.noise("decode", rng)

    def load_ms(self, rank: int) -> float:
        if rank <= 0:
            return 0.0
        return self.load["fixed_ms"] + rank * self.load["bytes_per_rank"] / self.load["bytes_per_ms"]

    def sidecar_ms(self, tokens: int, rank: int, layers: int) -> float | None:
        """One worker's time for `layers` layers of a prompt's LoRA term (None: no sidecar measured)."""
        if not self.sidecar:
            return None
        return tokens * rank * layers * self.sidecar["ms_per_token_rank"]

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "device": self.device,
                "source": self.source, "measured": self.measured, "not_measured": self.not_measured,
                "layers": self.layers, "load": self.load, "sidecar": self.sidecar,
                "prefill": self.prefill, "decode": self.decode}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, data: Any, where: str = "truth table") -> "TruthTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TruthTableError(f"{where}: 'format' must be {FORMAT!r}")
        if data.get("version") != VERSION:
            raise TruthTableError(f"{where}: unsupported version {data.get('version')!r}")
        try:
            return cls(name=str(data["name"]), device=str(data["device"]), prefill=list(data["prefill"]),
                       decode=list(data["decode"]), load=dict(data["load"]), layers=int(data["layers"]),
                       sidecar=data.get("sidecar"), measured=list(data.get("measured", [])),
                       not_measured=list(data.get("not_measured", [])), source=str(data.get("source", "")))
        except KeyError as e:
            raise TruthTableError(f"{where}: missing field {e.args[0]!r}") from None

    @classmethod
    def load_file(cls, path: str | Path) -> "TruthTable":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TruthTableError(f"cannot read truth table {path}: {e}") from e
        return cls.from_json(data, f"truth table {path}")


class SidecarHost:
    """The sidecar workers of one host, shared by its instances, as one FIFO server as fast as
    all of them (a job's layers are split over the workers, as the sidecar splits rows): a
    cpu-assisted prefill's LoRA work starts when the jobs before it are done."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.free_at = 0.0   # when the jobs queued so far are done (s)
        self.queued_s = 0.0  # total time jobs waited behind others
        self.jobs = 0

    def run(self, t: float, work_ms: float) -> float:
        """Queue `work_ms` of one worker's work at time `t` (s); returns when it is done (s)."""
        start = max(t, self.free_at)
        self.queued_s += start - t
        self.jobs += 1
        self.free_at = start + work_ms / 1000.0 / self.workers
        return self.free_at
