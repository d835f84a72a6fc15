"""Random LoRA batches for the kernel tests: adapters, pools, descriptors, popularity mixes.

Pools are poisoned: every element the contract says is never read (units of no adapter's row,
the tail of a unit past a row's width) is NaN, so a kernel that reads one fails. The padded
bgmv descriptors read the pool's zero row, which is zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

I32 = torch.int32

# module groups: name -> (in_features, out_features per slice)
MODEL_GROUPS = {  # the default model (SmolLM2-135M): hidden 576, 9 x 64 q, 3 x 64 kv, MLP 1536
    "qkv": (576, (576, 192, 192)),
    "o": (576, (576,)),
    "gate_up": (576, (1536, 1536)),
    "down": (1536, (576,)),
}
SMALL_GROUPS = {  # interpreter shapes: no multiple of any block size
    "qkv": (40, (24, 9, 9)),
    "o": (33, (21,)),
    "gate_up": (17, (30, 30)),
}
NO_ADAPTER_P = 0.2   # share of rows without adapter in the uniform / zipf / distinct mixes
DECODE_ROWS = {"distinct": 16, "single": 32, "uniform": 32, "zipf": 32}  # CPU decode tests: rows per mix
CPU_DTYPES = [torch.float32, torch.float16]  # the CPU paths' data dtypes under test (bf16: one case)


@dataclass(frozen=True)
class Geometry:
    in_features: int
    out_features: tuple[int, ...]

    @property
    def slices(self) -> int:
        return len(self.out_features)

    @property
    def out_total(self) -> int:
        return sum(self.out_features)

    @property
    def offsets(self) -> list[int]:
        acc = [0]
        for n in self.out_features:
            acc.append(acc[-1] + n)
        return acc

    def slice_offsets(self) -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=I32)


@dataclass(frozen=True)
class Adapter:
    slice_ranks: tuple[int, ...]

    @property
    def rank(self) -> int:
        return max(self.slice_ranks)


@dataclass
class Pool:
    W: torch.Tensor               # [U, UNIT]: the pool of one layer
    a_units: list[list[list[int]]]  # adapter -> slice -> rank row j -> first unit of its lora_A row
    b_units: list[list[list[int]]]  # adapter -> slice -> rank row j -> first unit of its lora_B^T row
    zero_unit: int                # first unit of a zero row as wide as any row (padded bgmv rows)


@dataclass
class Batch:
    """Rows (decode) or segments (prefill) with their adapter (None: no adapter)."""
    geometry: Geometry
    adapters: list[Adapter]
    users: list[int | None]       # adapter index of row / segment i

    def max_rank(self) -> int:
        return max([self.adapters[a].rank for a in self.users if a is not None], default=0)

    def ranks(self) -> torch.Tensor:                                   # [N, S]
        zero = (0,) * self.geometry.slices
        return torch.tensor([self.adapters[a].slice_ranks if a is not None else zero for a in self.users],
                            dtype=I32).view(len(self.users), self.geometry.slices)

    def rows(self, pool: Pool, which: str) -> torch.Tensor:            # [N, S, R]
        units = pool.a_units if which == "A" else pool.b_units
        table = torch.full((len(self.users), self.geometry.slices, self.max_rank()), -1, dtype=I32)
        for i, a in enumerate(self.users):
            if a is not None:
                for s, r in enumerate(self.adapters[a].slice_ranks):
                    table[i, s, :r] = torch.tensor(units[a][s], dtype=I32)
        return table

    def scales(self, gen: torch.Generator) -> torch.Tensor:            # [N, S]
        return 0.5 + 1.5 * torch.rand(len(self.users), self.geometry.slices, generator=gen)


def draw_adapters(gen: torch.Generator, count: int, slices: int, max_rank: int) -> list[Adapter]:
    """Ranks 1..max_rank (any value, not powers of two); half the adapters get a PEFT
    rank_pattern (per-slice ranks differ, some slices untargeted: rank 0)."""
    adapters = []
    for _ in range(count):
        rank = _randint(gen, 1, max_rank)
        ranks = [rank] * slices
        if slices > 1 and _coin(gen, 0.5):
            ranks = [_randint(gen, 0, rank) for _ in range(slices)]
            ranks[_randint(gen, 0, slices - 1)] = rank
        adapters.append(Adapter(tuple(ranks)))
    return adapters


def _single(gen, rows):
    return 1, [0] * rows


def _distinct(gen, rows):
    return rows, list(range(rows))


def _uniform(gen, rows):
    count = max(1, rows // 4)
    return count, torch.randint(0, count, (rows,), generator=gen).tolist()


def _zipf(gen, rows):
    count = max(1, rows // 2)
    weights = torch.tensor([1.0 / (k + 1) ** 1.2 for k in range(count)])
    return count, torch.multinomial(weights, rows, replacement=True, generator=gen).tolist()


# mix -> (draw (adapter count, adapter per row), rows without adapter mixed in)
MIXES = {
    "distinct": (_distinct, True),     # every row its own adapter
    "single": (_single, False),        # all rows one adapter
    "uniform": (_uniform, True),       # rows / 4 adapters, equally popular
    "zipf": (_zipf, True),             # rows / 2 adapters, zipf(1.2)-skewed popularity
}


def draw_users(gen: torch.Generator, mix: str, rows: int) -> tuple[int, list[int | None]]:
    """(number of adapters, adapter of each row or None) for a popularity mix."""
    draw, with_none = MIXES[mix]
    count, users = draw(gen, rows)
    return count, [None if with_none and _coin(gen, NO_ADAPTER_P) else u for u in users]


def make_batch(gen, geometry: Geometry, mix: str, rows: int, max_rank: int) -> Batch:
    count, users = draw_users(gen, mix, rows)
    return Batch(geometry, draw_adapters(gen, count, geometry.slices, max_rank), users)


def pool_unit(geometry: Geometry) -> int:
    return math.gcd(geometry.in_features, *geometry.out_features)


def make_pool(gen, batch: Batch, dtype: torch.dtype, contiguous: bool) -> Pool:
    """The batch's adapters in a pool of units (gcd of the row widths): every targeted slice's
    rank rows only, each lora_A / lora_B^T row at a unit boundary. contiguous: rows in order,
    aligned to their own width (the CPU path reads the pool in place), with gaps; scattered:
    rows in random order with random gaps, aligned or not (the CPU path gathers them).
    Unit 0.. holds a zero row; everything else not live is NaN."""
    g = batch.geometry
    unit = pool_unit(g)
    widest = max(g.in_features, *g.out_features)
    zero_units = -(-widest // unit)
    rows = []                                                            # (adapter, slice, j, which, width)
    for a, adapter in enumerate(batch.adapters):
        for s, r in enumerate(adapter.slice_ranks):
            for j in range(r):
                rows.append((a, s, j, "A", g.in_features))
                rows.append((a, s, j, "B", g.out_features[s]))
    aligned = contiguous or _coin(gen, 0.5)
    order = range(len(rows)) if contiguous else torch.randperm(len(rows), generator=gen).tolist()
    cursor = zero_units
    place = {}
    for k in order:
        width = rows[k][4]
        if aligned and width % unit == 0:
            step = width // unit
            cursor = -(-cursor // step) * step                           # aligned to its own width
        place[k] = cursor
        cursor += -(-width // unit) + (_randint(gen, 0, 2) if not contiguous else int(k % 7 == 0))
    total = cursor + 2
    a_units = [[[0] * r for r in ad.slice_ranks] for ad in batch.adapters]
    b_units = [[[0] * r for r in ad.slice_ranks] for ad in batch.adapters]
    for k, (a, s, j, which, _) in enumerate(rows):
        (a_units if which == "A" else b_units)[a][s][j] = place[k]
    pool = Pool(torch.empty(total, unit, dtype=dtype), a_units, b_units, 0)
    return fill_pool(gen, batch, pool)


def fill_pool(gen, batch: Batch, pool: Pool) -> Pool:
    """Fresh random values at the pool's live rows (another layer), NaN elsewhere, the zero row."""
    g = batch.geometry
    flat = torch.full((pool.W.numel(),), math.nan)
    widest = max(g.in_features, *g.out_features)
    flat[pool.zero_unit * pool.W.shape[1] : pool.zero_unit * pool.W.shape[1] + widest] = 0.0
    for a, adapter in enumerate(batch.adapters):
        for s, r in enumerate(adapter.slice_ranks):
            for j in range(r):
                start = pool.a_units[a][s][j] * pool.W.shape[1]
                flat[start : start + g.in_features] = torch.randn(g.in_features, generator=gen) / math.sqrt(g.in_features)
                start = pool.b_units[a][s][j] * pool.W.shape[1]
                n = g.out_features[s]
                flat[start : start + n] = 0.1 * torch.randn(n, generator=gen)
    return Pool(flat.to(pool.W.dtype).view(pool.W.shape), pool.a_units, pool.b_units, pool.zero_unit)


def segment_starts(gen, segments: int, max_len: int) -> torch.Tensor:   # [N + 1]
    """Random segment lengths 0..max_len (empty segments included now and then)."""
    lengths = torch.randint(0, max_len + 1, (segments,), generator=gen)
    lengths[_randint(gen, 0, segments - 1)] = max(1, int(lengths.max()))  # at least one token
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(I32)


def inputs(gen, rows: int, features: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(rows, features, generator=gen).to(dtype)


def out_before(gen, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Random output with some -0.0 entries: `+= 0` on an untouched element would flip them."""
    out = torch.randn(rows, cols, generator=gen).to(dtype)
    out[torch.rand(rows, cols, generator=gen) < 0.1] = -0.0
    return out


def live_mask(ranks: torch.Tensor, rank: int) -> torch.Tensor:         # [N, S, R] bool
    return torch.arange(rank)[None, None, :] < ranks[:, :, None].long()


def touched_columns(ranks: torch.Tensor, geometry: Geometry) -> torch.Tensor:  # [N, OUT_TOTAL] bool
    cols = torch.zeros(ranks.shape[0], geometry.out_total, dtype=torch.bool)
    offsets = geometry.offsets
    for s in range(geometry.slices):
        cols[:, offsets[s]:offsets[s + 1]] = (ranks[:, s] > 0)[:, None]
    return cols


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (compares -0.0 != 0.0 and NaN payloads exactly)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _randint(gen, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _coin(gen, p: float) -> bool:
    return bool(torch.rand(1, generator=gen) < p)
