"""RowPlan: the CPU fast path's index tensors for one decode batch, built once per step.

The decode descriptors (`a_rows`, `b_rows`, `ranks`) are the same for every layer of a forward
step; the CPU path turns them into flat index tensors (which pool rows feed which element of
`y` / `out`). The engine builds one plan per module group per step and passes it to every
mbgmv call of that group:

    plans = {g: plan_rows(a_rows[g], b_rows[g], ranks[g]) for g in GROUPS}   # once per step
    for layer in layers:
        mbgmv_shrink(x, pool.W[layer], a_rows["qkv"], ranks["qkv"], y, plan=plans["qkv"])
        ...

Construction is cheap (shape checks, one mask); the index tensors are built on first use by a
call and cached, so the first layer pays for them and the other layers reuse them. Without a
plan the CPU path builds a throw-away one per call (correct, slower). The Triton and
reference paths ignore plans.

Two ways a row's shrink is computed (chosen per row by the plan):
- rows that share an adapter with >= `dense_min_rows` rows of the batch form a *dense group*:
  one BLAS matmul `x[rows] @ A_rows^T` over the adapter's gathered lora_A rows;
- every other row is part of one sampled dense-dense matmul (torch.sparse.sampled_addmm):
  exactly the (row, lora_A row) dot products that exist. The pool is read in place, viewed as
  rows of IN elements, when every lora_A row starts at a multiple of IN elements (the pool
  aligns them so); otherwise the batch's rows are gathered first ("compact").
Expand is one `embedding_bag` over the pool viewed as rows of `width` elements (the gcd of the
slice offsets and the unit).
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
    """Rows sharing one adapter: their shrink is one matmul over the adapter's lora_A rows."""
    rows: torch.Tensor            # int64 [n]: batch rows of this adapter
    units: torch.Tensor           # int64 [m]: first unit of each live lora_A row (live (s, j) order)
    dest: torch.Tensor            # int64 [n * m]: positions in y.view(-1) of the product [n, m]
    first: int = -1               # >= 0: the m rows are rows first.. of the pool viewed as [*, IN]
                                  # (one run: read as a view, no gather)


@dataclass
class ShrinkIndex:
    """Where every live element of y comes from."""
    num_rows: int
    gathered: torch.Tensor | None  # compact: first units of the rows to gather (unique); None: in place
    crow: torch.Tensor            # int64 [N + 1]: CSR row pointers of the sampled part
    col: torch.Tensor             # int64 [nnz]: row of the pool viewed as [*, IN] (compact: of `gathered`)
    dest: torch.Tensor            # int64 [nnz + dense]: y.view(-1) positions, sampled part first
    groups: tuple[DenseGroup, ...]
    repeat: torch.Tensor | None = None  # int64: sampled value of each live element when rows repeat
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
    """One embedding_bag: bag (row, chunk) sums y-weighted chunk rows of W.view(-1, width)."""
    width: int                    # elements per chunk: gcd of the slice offsets and the unit
    idx: torch.Tensor             # int64 [nnz]: chunk row of W.view(-1, width)
    wpos: torch.Tensor            # int64 [nnz]: position in y.view(-1) weighting each
    bag_offsets: torch.Tensor     # int64 [bags]: start of each non-empty bag in idx
    bags: torch.Tensor | None     # int64 [bags]: row of out.view(-1, width); None: all, in order


class PoolRows:
    """Rows of `width` elements of a layer's pool W [U, UNIT] starting at `units` (int64 [m]), read
    the same way from every layer: decided once, a view (one aligned run: the pool lays an adapter's
    rows of a slice out so), a row gather of W.view(-1, width) (aligned to `width`) or an element
    gather. `read` returns [m, width], read only (may be a view of W)."""

    def __init__(self, W: torch.Tensor, units: torch.Tensor, width: int):
        starts = units * W.shape[1]
        self.width, self.count, self.first = width, len(units), -1
        self.rows = self.index = None
        if width and bool((starts % width == 0).all()):
            rows = starts // width
            if len(rows) and bool((rows == rows[0] + torch.arange(len(rows))).all()):
                self.first = int(rows[0])
            else:
                self.rows = rows
        else:
            self.index = (starts[:, None] + torch.arange(width)).view(-1)

    def read(self, W: torch.Tensor) -> torch.Tensor:
        if self.first >= 0:
            return _row_view(W, self.width).narrow(0, self.first, self.count)
        if self.rows is not None:
            return _row_view(W, self.width).index_select(0, self.rows)
        return W.view(-1).index_select(0, self.index).view(self.count, self.width)


def gather_rows(W: torch.Tensor, units: torch.Tensor, width: int) -> torch.Tensor:
    """PoolRows(W, units, width).read(W): for a single read (the per-call ops)."""
    return PoolRows(W, units, width).read(W)


def _row_view(W: torch.Tensor, width: int) -> torch.Tensor:
    """W as rows of `width` elements (a view; a tail shorter than a row is left out)."""
    flat = W.view(-1)
    return flat[: flat.numel() // width * width].view(-1, width)


class RowPlan:
    """Index tensors of one decode batch (a_rows / b_rows [N, S, R], ranks [N, S]) for the CPU path."""

    def __init__(self, a_rows: torch.Tensor, b_rows: torch.Tensor, ranks: torch.Tensor,
                 dense_min_rows: int = DENSE_MIN_ROWS):
        if (a_rows.dim() != 3 or b_rows.shape != a_rows.shape or ranks.dim() != 2
                or tuple(ranks.shape) != tuple(a_rows.shape[:2])):
            fail("plan_rows", f"a_rows / b_rows [N, S, R] and ranks [N, S] expected, got "
                              f"{list(a_rows.shape)}, {list(b_rows.shape)} and {list(ranks.shape)}")
        self.a_rows = a_rows.to("cpu", torch.int64)             # [N, S, R]
        self.b_rows = b_rows.to("cpu", torch.int64)             # [N, S, R]
        self.ranks = ranks.to("cpu", torch.int64)               # [N, S]
        self.num_rows, self.num_slices, self.max_rank = self.a_rows.shape
        self.dense_min_rows = dense_min_rows
        if bool((self.ranks > self.max_rank).any()) or bool((self.ranks < 0).any()):
            fail("plan_rows", f"ranks must lie in 0..{self.max_rank} (row table width)")
        # live[i, s, j]: rank row j of slice s of row i is read
        self.live = torch.arange(self.max_rank)[None, None, :] < self.ranks[:, :, None]
        live_a, live_b = self.a_rows[self.live], self.b_rows[self.live]
        if bool((live_a < 0).any()) or bool((live_b < 0).any()):
            fail("plan_rows", "a row table has -1 below a row's rank")
        self.max_a_unit = int(live_a.max()) if live_a.numel() else -1
        self.max_b_units = [int(self.b_rows[:, s][self.live[:, s]].max()) if bool(self.live[:, s].any()) else -1
                            for s in range(self.num_slices)]                       # per slice
        self._shrink: dict[tuple, ShrinkIndex] = {}
        self._expand: dict[tuple, ExpandIndex] = {}

    def check(self, op: str, rows: int, slices: int, rank: int) -> None:
        """The plan was built for a batch of this shape."""
        if (rows, slices, rank) != (self.num_rows, self.num_slices, self.max_rank):
            fail(op, f"plan is for N={self.num_rows}, S={self.num_slices}, R={self.max_rank}; "
                     f"the call has N={rows}, S={slices}, R={rank}")

    def check_rows(self, op: str, W: torch.Tensor, max_unit: int, width: int) -> None:
        if max_unit >= 0 and max_unit * W.shape[1] + width > W.numel():
            fail(op, f"a row at unit {max_unit} ({width} elements) runs past the pool of {W.shape[0]} units")

    def shrink_index(self, unit: int, in_features: int, compact: bool) -> ShrinkIndex:
        """compact=False: read the pool in place when aligned; True: gather the batch's rows first."""
        key = (unit, in_features, compact)
        index = self._shrink.get(key)
        if index is None:
            index = self._shrink[key] = self._build_shrink(unit, in_features, compact)
        return index

    def expand_index(self, unit: int, slice_offsets: tuple[int, ...]) -> ExpandIndex:
        key = (unit, slice_offsets)
        index = self._expand.get(key)
        if index is None:
            index = self._expand[key] = self._build_expand(unit, slice_offsets)
        return index

    # -- construction ----------------------------------------------------------------------

    def _build_shrink(self, unit: int, in_features: int, compact: bool) -> ShrinkIndex:
        n, s_count, r = self.num_rows, self.num_slices, self.max_rank
        starts = self.a_rows * unit
        if not compact and not bool((starts[self.live] % in_features == 0).all()):
            compact = True                                       # rows not aligned: no in-place view
        groups = () if compact else self._dense_groups(unit, in_features)
        sampled_rows = torch.ones(n, dtype=torch.bool)
        for g in groups:
            sampled_rows[g.rows] = False
        i, s, j = (self.live & sampled_rows[:, None, None]).nonzero(as_tuple=True)
        units = self.a_rows[i, s, j]
        gathered = None
        if compact:
            gathered, col = torch.unique(units, return_inverse=True)
        else:
            col = units * unit // in_features
        dest = torch.cat([i * (s_count * r) + s * r + j] + [g.dest for g in groups])
        # A CSR row may not name a column twice; padded descriptors (bgmv) read the zero row for
        # many (s, j) of one row: sample each (row, column) once and repeat its value.
        pairs = i * (int(col.max()) + 1 if col.numel() else 1) + col
        repeat = None
        unique_pairs, inverse = torch.unique(pairs, return_inverse=True)
        if len(unique_pairs) < len(pairs):
            width = int(col.max()) + 1
            i, col, repeat = unique_pairs // width, unique_pairs % width, inverse
        crow = torch.zeros(n + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(i, minlength=n).cumsum(0)
        return ShrinkIndex(n, gathered, crow, col, dest, groups, repeat)

    def _dense_groups(self, unit: int, in_features: int) -> tuple[DenseGroup, ...]:
        """Adapters used by >= dense_min_rows rows, or the batch's only adapter (then one matmul
        replaces the sampled matmul and its sparse set-up whatever the row count)."""
        s_count, r = self.num_slices, self.max_rank
        masked = torch.where(self.live, self.a_rows, -1).view(self.num_rows, -1)
        key = torch.cat([masked, self.ranks], 1)                               # same key: same adapter
        _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
        has = self.ranks.max(1).values > 0
        single = len(inverse[has].unique()) == 1
        big = ((counts[inverse] >= self.dense_min_rows) | single) & has
        groups = []
        for u in inverse[big].unique().tolist():
            rows = (inverse == u).nonzero().flatten()
            s, j = self.live[rows[0]].nonzero(as_tuple=True)                  # live (s, j) of the adapter
            dest = (rows[:, None] * (s_count * r) + (s * r + j)[None, :]).flatten()
            units = self.a_rows[rows[0], s, j]
            view_rows = units * unit // in_features                            # aligned (checked by caller)
            one_run = bool((view_rows == view_rows[0] + torch.arange(len(units))).all())
            groups.append(DenseGroup(rows, units, dest, int(view_rows[0]) if one_run else -1))
        return tuple(groups)

    def _build_expand(self, unit: int, offsets: tuple[int, ...]) -> ExpandIndex:
        n, s_count, r = self.num_rows, self.num_slices, self.max_rank
        width = max(math.gcd(*offsets, unit), 1)
        chunks = offsets[-1] // width
        # chunk c holds columns c*width .. (c+1)*width-1, all of one slice
        chunk_slice = torch.bucketize(torch.arange(chunks) * width, torch.tensor(offsets[1:]), right=True)
        first_chunk = torch.tensor(offsets[:-1]) // width                      # [S]
        live = torch.arange(r)[None, None, :] < self.ranks[:, chunk_slice][:, :, None]   # [N, C, R]
        i, c, j = live.nonzero(as_tuple=True)                                  # bag order (i, c), then j
        s = chunk_slice[c]
        bag_ids, sizes = torch.unique_consecutive(i * chunks + c, return_counts=True)
        bag_offsets = torch.zeros_like(sizes)
        bag_offsets[1:] = sizes.cumsum(0)[:-1]
        return ExpandIndex(
            width=width,
            idx=self.b_rows[i, s, j] * (unit // width) + (c - first_chunk[s]),
            wpos=i * (s_count * r) + s * r + j,
            bag_offsets=bag_offsets,
            bags=None if len(bag_ids) == n * chunks else bag_ids,
        )


def plan_rows(a_rows: torch.Tensor, b_rows: torch.Tensor, ranks: torch.Tensor,
              dense_min_rows: int = DENSE_MIN_ROWS) -> RowPlan:
    """Plan for mbgmv_shrink / mbgmv_expand of one decode batch (any device; read on the CPU)."""
    return RowPlan(a_rows, b_rows, ranks, dense_min_rows)


def pad_to_max_rank(a_rows: torch.Tensor, b_rows: torch.Tensor, ranks: torch.Tensor,
                    zero_unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Punica's bgmv as descriptors: every row with an adapter computes all R rank rows of every
    slice; rows past a slice's own rank read the pool's zero row at `zero_unit` (which must be at
    least as wide as any row). Returns (a_rows, b_rows, ranks) padded; same device and dtypes."""
    rank = a_rows.shape[2]
    live = torch.arange(rank, device=ranks.device)[None, None, :] < ranks[:, :, None]   # [N, S, R]
    has = (ranks.max(1).values > 0)[:, None, None].expand_as(live)                     # [N, S, R]
    filler = torch.where(has, torch.full_like(a_rows, zero_unit), torch.full_like(a_rows, -1))
    padded_ranks = torch.where(has[:, :, 0], rank, 0).to(ranks.dtype)
    return (torch.where(live, a_rows, filler).contiguous(), torch.where(live, b_rows, filler).contiguous(),
            padded_ranks.contiguous())
