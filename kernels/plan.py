"""RowPlan: the CPU fast path's index tensors for one decode batch, built once per step.

The decode descriptors (`page_table`, `ranks`) are the same for every layer of a forward
step; the CPU path turns them into flat index tensors (which pool rows feed which element of
`y` / `out`). The engine builds one plan per module group per step and passes it to every
mbgmv / bgmv call of that group:

    plans = {g: plan_rows(page_table, ranks[g]) for g in GROUPS}         # once per step
    for layer in layers:
        mbgmv_shrink(x, pool.A[layer]["qkv"], page_table, ranks["qkv"], y, plan=plans["qkv"])
        ...

Construction is cheap (shape checks, one mask); the index tensors are built on first use by a
call and cached, so the first layer pays for them and the other layers reuse them. Without a
plan the CPU path builds a throw-away one per call (correct, slower). The Triton and
reference paths ignore plans.

Two ways a row's shrink is computed (chosen per row by the plan):
- rows that share an adapter with >= `dense_min_rows` rows of the batch form a *dense group*:
  one BLAS matmul `x[rows] @ A[pages]^T` (a view of the pool when the pages are contiguous);
- every other row is part of one sampled dense-dense matmul (torch.sparse.sampled_addmm):
  exactly the (row, page, slice) dot products that exist, read straight from the pool, no copy.
Expand is one `embedding_bag` over the pool's B viewed as rows of `width` columns.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ._checks import fail

# Adapters used by at least this many rows of a batch go through one matmul. Measured with cold
# caches (AMD EPYC, 1 thread, qkv 576 -> 576/192/192): the sampled matmul already finds a shared
# adapter's rows in L2 after its first row, so smaller groups only add ops (zipf batches of 32-64
# rows: groups of 4-8 rows cost up to +25 %); one adapter for 32-64 rows of rank 16-64 is ~1.8x
# faster as a matmul.
DENSE_MIN_ROWS = 16


@dataclass(frozen=True)
class DenseGroup:
    """Rows sharing one adapter: their shrink is one matmul."""
    rows: torch.Tensor            # int64 [n]: batch rows of this adapter
    first_page: int
    rank: int                     # pages read: the adapter's largest slice rank
    pages: torch.Tensor | None    # int64 [rank]; None when pages are first_page .. first_page+rank-1
    src: torch.Tensor             # int64 [n * live]: positions in the product [n, rank * S], flat
    dest: torch.Tensor            # int64 [n * live]: positions in y.view(-1)


@dataclass
class ShrinkIndex:
    """Where every live element of y comes from."""
    num_rows: int
    pages: torch.Tensor | None    # compact mode: the pool pages the batch reads (sorted, unique)
    crow: torch.Tensor            # int64 [N + 1]: CSR row pointers of the sampled part
    col: torch.Tensor             # int64 [nnz]: page * S + s (compact mode: index into `pages`)
    dest: torch.Tensor            # int64 [nnz + dense]: y.view(-1) positions, sampled part first
    groups: tuple[DenseGroup, ...]
    _patterns: dict = field(default_factory=dict)

    def pattern(self, num_cols: int, dtype: torch.dtype) -> torch.Tensor:
        """The CSR sparsity pattern [N, num_cols] for sampled_addmm (cached per pool size, dtype)."""
        key = (num_cols, dtype)
        csr = self._patterns.get(key)
        if csr is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta state"
                csr = torch.sparse_csr_tensor(self.crow, self.col, torch.zeros(len(self.col), dtype=dtype),
                                              size=(self.num_rows, num_cols), check_invariants=False)
            self._patterns[key] = csr
        return csr


@dataclass(frozen=True)
class ExpandIndex:
    """One embedding_bag: bag (row, chunk) sums y-weighted chunk rows of B.view(-1, width)."""
    width: int                    # columns per chunk: gcd of the slice offsets
    idx: torch.Tensor             # int64 [nnz]: page * chunks + chunk
    wpos: torch.Tensor            # int64 [nnz]: position in y.view(-1) weighting each
    bag_offsets: torch.Tensor     # int64 [bags]: start of each non-empty bag in idx
    bags: torch.Tensor | None     # int64 [bags]: row of out.view(-1, width); None: all, in order


class RowPlan:
    """Index tensors of one decode batch (page_table [N, R], ranks [N, S]) for the CPU path."""

    def __init__(self, page_table: torch.Tensor, ranks: torch.Tensor, dense_min_rows: int = DENSE_MIN_ROWS):
        if page_table.dim() != 2 or ranks.dim() != 2 or page_table.shape[0] != ranks.shape[0]:
            fail("plan_rows", f"page_table [N, R] and ranks [N, S] expected, got "
                              f"{list(page_table.shape)} and {list(ranks.shape)}")
        self.page_table = page_table.to("cpu", torch.int64)   # [N, R]
        self.ranks = ranks.to("cpu", torch.int64)             # [N, S]
        self.num_rows, self.max_rank = self.page_table.shape
        self.num_slices = self.ranks.shape[1]
        self.dense_min_rows = dense_min_rows
        # live[i, j, s]: rank row j of slice s of row i is read
        self.live = torch.arange(self.max_rank)[None, :, None] < self.ranks[:, None, :]
        if bool((self.ranks > self.max_rank).any()) or bool((self.ranks < 0).any()):
            fail("plan_rows", f"ranks must lie in 0..{self.max_rank} (page_table width)")
        live_pages = self.page_table[self.live.any(2)]
        if bool((live_pages < 0).any()):
            fail("plan_rows", "page_table has -1 below a row's rank")
        self.max_page = int(live_pages.max()) if live_pages.numel() else -1
        self._shrink: dict[bool, ShrinkIndex] = {}
        self._expand: dict[tuple[int, ...], ExpandIndex] = {}

    def check(self, op: str, rows: int, rank: int, slices: int, pool_pages: int) -> None:
        """The plan was built for a batch of this shape and its pages exist in the pool."""
        if (rows, rank, slices) != (self.num_rows, self.max_rank, self.num_slices):
            fail(op, f"plan is for N={self.num_rows}, R={self.max_rank}, S={self.num_slices}; "
                     f"the call has N={rows}, R={rank}, S={slices}")
        if self.max_page >= pool_pages:
            fail(op, f"page_table reads page {self.max_page} of a pool of {pool_pages} pages")

    def shrink_index(self, compact: bool) -> ShrinkIndex:
        """compact=False: read the pool in place; True: gather the batch's pages first (half dtypes)."""
        index = self._shrink.get(compact)
        if index is None:
            index = self._shrink[compact] = self._build_shrink(compact)
        return index

    def expand_index(self, slice_offsets: tuple[int, ...]) -> ExpandIndex:
        index = self._expand.get(slice_offsets)
        if index is None:
            index = self._expand[slice_offsets] = self._build_expand(slice_offsets)
        return index

    # -- construction ----------------------------------------------------------------------

    def _build_shrink(self, compact: bool) -> ShrinkIndex:
        n, r, s_count = self.num_rows, self.max_rank, self.num_slices
        groups = () if compact else self._dense_groups()
        sampled_rows = torch.ones(n, dtype=torch.bool)
        for g in groups:
            sampled_rows[g.rows] = False
        i, j, s = (self.live & sampled_rows[:, None, None]).nonzero(as_tuple=True)
        pages = self.page_table[i, j]
        gathered = None
        if compact:
            gathered, pages = torch.unique(pages, return_inverse=True)
        crow = torch.zeros(n + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(i, minlength=n).cumsum(0)
        dest = torch.cat([i * (s_count * r) + s * r + j] + [g.dest for g in groups])
        return ShrinkIndex(n, gathered, crow, pages * s_count + s, dest, groups)

    def _dense_groups(self) -> tuple[DenseGroup, ...]:
        if self.num_rows < self.dense_min_rows:
            return ()
        row_rank = self.ranks.max(1).values                                   # [N]
        masked = torch.where(torch.arange(self.max_rank) < row_rank[:, None], self.page_table, -1)
        key = torch.cat([masked, self.ranks], 1)                               # same key: same adapter
        _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
        big = (counts[inverse] >= self.dense_min_rows) & (row_rank > 0)
        groups = []
        for u in inverse[big].unique().tolist():
            rows = (inverse == u).nonzero().flatten()
            groups.append(self._group(rows, int(row_rank[rows[0]])))
        return tuple(groups)

    def _group(self, rows: torch.Tensor, rank: int) -> DenseGroup:
        s_count, r = self.num_slices, self.max_rank
        first = int(rows[0])
        pages = self.page_table[first, :rank]
        contiguous = bool((pages == pages[0] + torch.arange(rank)).all())
        j, s = self.live[first, :rank].nonzero(as_tuple=True)                 # live (j, s) of the adapter
        src = (torch.arange(len(rows))[:, None] * (rank * s_count) + (j * s_count + s)[None, :]).flatten()
        dest = (rows[:, None] * (s_count * r) + (s * r + j)[None, :]).flatten()
        return DenseGroup(rows, int(pages[0]), rank, None if contiguous else pages, src, dest)

    def _build_expand(self, offsets: tuple[int, ...]) -> ExpandIndex:
        n, r, s_count = self.num_rows, self.max_rank, self.num_slices
        width = max(math.gcd(*offsets), 1)
        chunks = offsets[-1] // width
        # chunk c holds columns c*width .. (c+1)*width-1, all of one slice
        chunk_slice = torch.bucketize(torch.arange(chunks) * width, torch.tensor(offsets[1:]), right=True)
        live = torch.arange(r)[None, None, :] < self.ranks[:, chunk_slice][:, :, None]   # [N, C, R]
        i, c, j = live.nonzero(as_tuple=True)                                  # bag order (i, c), then j
        bag_ids, sizes = torch.unique_consecutive(i * chunks + c, return_counts=True)
        bag_offsets = torch.zeros_like(sizes)
        bag_offsets[1:] = sizes.cumsum(0)[:-1]
        return ExpandIndex(
            width=width,
            idx=self.page_table[i, j] * chunks + c,
            wpos=i * (s_count * r) + chunk_slice[c] * r + j,
            bag_offsets=bag_offsets,
            bags=None if len(bag_ids) == n * chunks else bag_ids,
        )


def plan_rows(page_table: torch.Tensor, ranks: torch.Tensor, dense_min_rows: int = DENSE_MIN_ROWS) -> RowPlan:
    """Plan for mbgmv_shrink / mbgmv_expand of one decode batch (any device; read on the CPU)."""
    return RowPlan(page_table, ranks, dense_min_rows)


def plan_slots(slots: torch.Tensor, rank: int, slot_rank: int, num_slices: int,
               dense_min_rows: int = DENSE_MIN_ROWS) -> RowPlan:
    """Plan for bgmv_shrink / bgmv_expand: slot k's rank row j is page k * slot_rank + j of the
    stacked pool viewed as [NS * RS, ...]; every row with a slot uses all `rank` rows (padded)."""
    slots = slots.to("cpu", torch.int64)                                       # [N]
    has = slots >= 0
    page_table = torch.where(has[:, None], slots[:, None] * slot_rank + torch.arange(rank), -1)
    ranks = (has.long() * rank)[:, None].expand(len(slots), num_slices).contiguous()
    return RowPlan(page_table, ranks, dense_min_rows)
