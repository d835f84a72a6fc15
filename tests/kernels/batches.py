"""Random LoRA batches for the kernel tests: adapters, pools, descriptors, popularity mixes.

Pools are poisoned: every element the contract says is never read (pages of no adapter, rank
rows of a slice past that slice's rank) is NaN, so a kernel that reads one fails. In slot mode
(bgmv) rows past an adapter's rank are zero, as the pool guarantees, and rows past the batch's
max rank R are NaN (bgmv reads only R rows).
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
    A: torch.Tensor               # [P, S, IN]
    B: torch.Tensor               # [P, OUT_TOTAL]
    pages: list[list[int]]        # adapter -> its pages (rank row j -> page)


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

    def page_table(self, pool: Pool) -> torch.Tensor:                  # [N, R]
        table = torch.full((len(self.users), self.max_rank()), -1, dtype=I32)
        for i, a in enumerate(self.users):
            if a is not None:
                table[i, :self.adapters[a].rank] = torch.tensor(pool.pages[a], dtype=I32)
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


def make_pool(gen, batch: Batch, dtype: torch.dtype, contiguous: bool) -> Pool:
    """Paged pool: adapters' pages contiguous (in order, with gaps) or scattered at random."""
    ranks = [a.rank for a in batch.adapters]
    total = sum(ranks) + 3 + len(ranks)                                  # room for gaps / unused pages
    order = torch.arange(total) if contiguous else torch.randperm(total, generator=gen)
    pages, cursor = [], 1                                                # page 0 stays unused
    for r in ranks:
        pages.append(order[cursor:cursor + r].tolist())
        cursor += r + (1 if contiguous else 0)
    return fill_pool(gen, batch, dtype, pages, total)


def fill_pool(gen, batch: Batch, dtype: torch.dtype, pages: list[list[int]], total: int) -> Pool:
    """A pool of `total` pages holding the batch's adapters at `pages` (fresh values: another layer)."""
    live = torch.zeros(total, batch.geometry.slices, dtype=torch.bool)
    for adapter, adapter_pages in zip(batch.adapters, pages):
        live[torch.tensor(adapter_pages, dtype=torch.long)] = _live_rows(adapter)
    A, B = _materialise(gen, batch.geometry, live, torch.zeros_like(live), dtype)
    return Pool(A, B, pages)


def make_slot_pool(gen, batch: Batch, dtype: torch.dtype, slot_rank: int) -> tuple[Pool, list[int]]:
    """Slot-mode pool [NS * RS, ...] for the adapters rows use, plus one spare slot.
    Returns the pool and the adapter -> slot map (-1: adapter not used by any row)."""
    used = sorted({a for a in batch.users if a is not None})             # only these need a slot
    slot_count = len(used) + 1
    slot_of = [-1] * len(batch.adapters)
    for a, slot in zip(used, torch.randperm(slot_count, generator=gen).tolist()):
        slot_of[a] = slot
    live = torch.zeros(slot_count * slot_rank, batch.geometry.slices, dtype=torch.bool)
    zero = torch.zeros_like(live)
    rank = batch.max_rank()
    pages = [[] for _ in batch.adapters]
    for a in used:
        adapter, first = batch.adapters[a], slot_of[a] * slot_rank
        pages[a] = list(range(first, first + adapter.rank))
        zero[first:first + rank] = True                                  # zero past the adapter's rank
        live[first:first + adapter.rank] = _live_rows(adapter)
    A, B = _materialise(gen, batch.geometry, live, zero, dtype)
    return Pool(A, B, pages), slot_of


def _live_rows(adapter: Adapter) -> torch.Tensor:                      # [rank, S]: row j of slice s exists
    return torch.arange(adapter.rank)[:, None] < torch.tensor(adapter.slice_ranks)[None, :]


def _materialise(gen, g: Geometry, live, zero, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A [P, S, IN], B [P, OUT_TOTAL]: random where live, 0 where zero, NaN elsewhere."""
    def fill(values, live_, zero_):
        background = torch.where(zero_, 0.0, math.nan)
        return torch.where(live_, values, background).to(dtype)
    A = torch.randn(live.shape[0], g.slices, g.in_features, generator=gen) / math.sqrt(g.in_features)
    A = fill(A, live[:, :, None], zero[:, :, None])
    col_slice = torch.repeat_interleave(torch.arange(g.slices), torch.tensor(g.out_features))
    B = fill(0.1 * torch.randn(live.shape[0], g.out_total, generator=gen), live[:, col_slice], zero[:, col_slice])
    return A, B


def slots_of(batch: Batch, slot_of: list[int]) -> torch.Tensor:          # [N]
    return torch.tensor([-1 if a is None else slot_of[a] for a in batch.users], dtype=I32)


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
