"""The CPU sidecar's shared-memory segment: control words, job descriptor, adapter table, buffers.

One named segment (`/dev/shm/<prefix>_sidecar`) is shared by the engine and every worker.
Words are int64, read and written through a `memoryview` (one aligned 8-byte load or store
each, atomic on x86-64). Layout (offsets in words unless noted; `LINE` = 8 words = 64 bytes):

    header       [HEADER_WORDS]          magic, version, sizes, dtype, stop, armed, table epoch,
                                         arm count
    job flags    [workers]               job sequence number per worker (engine writes;
                                         on CUDA, a stream-ordered device->host copy writes it)
    worker lines [workers, LINE]         done sequence number (worker writes; -seq = the job
                                         failed in the worker), pid once ready
    descriptor   [LINE]                  seq, layer, group, rows, segments, in/out features
    segments     [max_segments, 3]       (row start, row end, adapter slot) in packed rows
    ranges       [workers, 2]            (row start, row end) each worker computes
    table        [max_adapters, SLOT]    generation, rank, slice ranks, segment name
    -- page aligned, in bytes --
    input        [max_tokens * max_in]   x of the job's rows, packed: [rows, in_features]
    output       [max_tokens * max_out]  deltas, packed: [rows, out_features]

Job flags of all workers share cache lines (one writer, the engine); each worker's done word
has a line of its own so workers finishing at once do not fight over one line.

Ordering: the engine writes the descriptor (and, on the CPU path, the input) before it bumps
a job flag, and a worker writes its output rows before its done word. x86-64 keeps stores in
program order and loads in program order (TSO), which is all this protocol needs; a weakly
ordered CPU would need fences here.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Optional

import torch

from caraserve_router.lora.shapes import GROUP_MODULES, GROUPS, MODULE_SLOTS, ModelShapes

MAGIC = 0x43415241_53494445  # "CARASIDE"
VERSION = 1
LINE = 8  # words per 64-byte cache line
NAME_BYTES = 64  # an adapter segment name, NUL padded

# header words
H_MAGIC, H_VERSION, H_WORKERS, H_MAX_TOKENS, H_MAX_IN, H_MAX_OUT, H_MAX_SEGMENTS, H_MAX_ADAPTERS = range(8)
H_DTYPE, H_STOP, H_ARMED, H_TABLE_EPOCH, H_ARM_SEQ = range(8, 13)
HEADER_WORDS = 2 * LINE

# descriptor words
D_SEQ, D_LAYER, D_GROUP, D_ROWS, D_NSEG, D_IN, D_OUT = range(7)

# worker line words
W_DONE, W_PID = 0, 1

# adapter table slot words: generation (0 = free), rank, 7 slice ranks, then the name
T_GEN, T_RANK, T_SLICE_RANKS = 0, 1, 2
SLICE_COUNT = len(MODULE_SLOTS)  # q k v | o | gate up | down
T_NAME = T_SLICE_RANKS + SLICE_COUNT
SLOT_WORDS = 3 * LINE  # 9 words + 8 words of name, rounded up to whole lines

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _lines(words: int) -> int:
    """`words` rounded up to whole cache lines."""
    return -(-words // LINE) * LINE


def _pages(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def max_features(shapes: ModelShapes) -> tuple[int, int]:
    """(largest in_features, largest out_total) over the projection groups."""
    groups = [shapes.group(g) for g in GROUPS]
    return max(g.in_features for g in groups), max(g.out_total for g in groups)


@dataclass(frozen=True)
class ControlLayout:
    """Sizes of the segment; every offset derives from them."""

    workers: int
    max_tokens: int
    max_in: int
    max_out: int
    max_segments: int
    max_adapters: int
    dtype: torch.dtype

    # ---- word offsets ---------------------------------------------------------------------

    @property
    def jobs(self) -> int:
        return HEADER_WORDS

    @property
    def lines(self) -> int:
        return self.jobs + _lines(self.workers)

    @property
    def desc(self) -> int:
        return self.lines + self.workers * LINE

    @property
    def segs(self) -> int:
        return self.desc + LINE

    @property
    def ranges(self) -> int:
        return self.segs + _lines(3 * self.max_segments)

    @property
    def table(self) -> int:
        return self.ranges + _lines(2 * self.workers)

    @property
    def control_words(self) -> int:
        return self.table + self.max_adapters * SLOT_WORDS

    # ---- byte offsets of the buffers ------------------------------------------------------

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def input_offset(self) -> int:
        return _pages(self.control_words * 8)

    @property
    def output_offset(self) -> int:
        return self.input_offset + _pages(self.max_tokens * self.max_in * self.itemsize)

    @property
    def total_bytes(self) -> int:
        return self.output_offset + _pages(self.max_tokens * self.max_out * self.itemsize)

    def header(self) -> dict[int, int]:
        return {
            H_MAGIC: MAGIC, H_VERSION: VERSION, H_WORKERS: self.workers, H_MAX_TOKENS: self.max_tokens,
            H_MAX_IN: self.max_in, H_MAX_OUT: self.max_out, H_MAX_SEGMENTS: self.max_segments,
            H_MAX_ADAPTERS: self.max_adapters, H_DTYPE: DTYPES.index(self.dtype),
        }

    @classmethod
    def from_header(cls, words: memoryview) -> "ControlLayout":
        if words[H_MAGIC] != MAGIC or words[H_VERSION] != VERSION:
            raise ValueError("not a CaraServe sidecar segment (or of another version)")
        return cls(workers=words[H_WORKERS], max_tokens=words[H_MAX_TOKENS], max_in=words[H_MAX_IN],
                   max_out=words[H_MAX_OUT], max_segments=words[H_MAX_SEGMENTS],
                   max_adapters=words[H_MAX_ADAPTERS], dtype=DTYPES[words[H_DTYPE]])


class ControlBlock:
    """A mapped sidecar segment: word access, descriptor, adapter table and buffer tensors."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: ControlLayout, owner: bool):
        self.shm = shm
        self.layout = layout
        self.owner = owner
        self.words = shm.buf[: layout.control_words * 8].cast("q")
        self.inp = torch.frombuffer(shm.buf, dtype=layout.dtype, count=layout.max_tokens * layout.max_in,
                                    offset=layout.input_offset)  # flat; a job uses [rows, in_features]
        self.out = torch.frombuffer(shm.buf, dtype=layout.dtype, count=layout.max_tokens * layout.max_out,
                                    offset=layout.output_offset)  # flat; a job uses [rows, out_features]
        # int64 view of the job flags: the target of the CUDA path's stream-ordered flag copy
        self.job_flags = torch.frombuffer(shm.buf, dtype=torch.int64, count=layout.workers,
                                          offset=layout.jobs * 8)

    @property
    def name(self) -> str:
        return self.shm.name

    @classmethod
    def create(cls, name: str, layout: ControlLayout) -> "ControlBlock":
        shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_bytes)
        block = cls(shm, layout, owner=True)  # a new segment reads as zeros
        for index, value in layout.header().items():
            block.words[index] = value
        return block

    @classmethod
    def attach(cls, name: str) -> "ControlBlock":
        shm = shared_memory.SharedMemory(name=name, create=False)
        # Python < 3.13 registers attached segments with this process's resource tracker,
        # which would unlink the segment when a worker exits; the engine owns its lifetime.
        try:
            resource_tracker.unregister(shm._name, "shared_memory")
        except Exception:  # noqa: BLE001 - no tracker in some start-up paths
            pass
        layout = ControlLayout.from_header(shm.buf[: HEADER_WORDS * 8].cast("q"))
        return cls(shm, layout, owner=False)

    def close(self) -> None:
        """Drop every view, unmap, and unlink when this process created the segment."""
        if self.shm is None:
            return
        self.inp = self.out = self.job_flags = None
        self.words.release()
        try:
            self.shm.close()
        except BufferError:  # a caller still holds a tensor on the buffers: leave the mapping
            pass
        if self.owner:
            self.shm.unlink()  # the name goes now; the memory when the last mapping does
        self.shm = None

    # ---- per-worker words -------------------------------------------------------------------

    def job_word(self, worker: int) -> int:
        return self.layout.jobs + worker

    def done_word(self, worker: int) -> int:
        return self.layout.lines + worker * LINE + W_DONE

    def pid_word(self, worker: int) -> int:
        return self.layout.lines + worker * LINE + W_PID

    # ---- job descriptor ---------------------------------------------------------------------

    def write_job(self, seq: int, layer: int, group: int, rows: int, in_features: int, out_features: int,
                  segments: list, ranges: list) -> None:
        """Descriptor of one job. segments: [(start, end, slot)] in packed rows; ranges: per worker."""
        w, lay = self.words, self.layout
        for i, (start, end, slot) in enumerate(segments):
            base = lay.segs + 3 * i
            w[base], w[base + 1], w[base + 2] = start, end, slot
        for i, (start, end) in enumerate(ranges):
            base = lay.ranges + 2 * i
            w[base], w[base + 1] = start, end
        d = lay.desc
        w[d + D_LAYER], w[d + D_GROUP], w[d + D_ROWS] = layer, group, rows
        w[d + D_NSEG], w[d + D_IN], w[d + D_OUT] = len(segments), in_features, out_features
        w[d + D_SEQ] = seq  # last: a worker seeing this seq sees the fields above

    def read_job(self, worker: int) -> tuple:
        """(seq, layer, group, rows, in, out, (start, end) of `worker`, [(start, end, slot)])."""
        w, lay = self.words, self.layout
        d = lay.desc
        nseg = w[d + D_NSEG]
        segments = [(w[lay.segs + 3 * i], w[lay.segs + 3 * i + 1], w[lay.segs + 3 * i + 2]) for i in range(nseg)]
        own = (w[lay.ranges + 2 * worker], w[lay.ranges + 2 * worker + 1])
        return (w[d + D_SEQ], w[d + D_LAYER], w[d + D_GROUP], w[d + D_ROWS], w[d + D_IN], w[d + D_OUT],
                own, segments)

    def input_rows(self, rows: int, features: int) -> torch.Tensor:
        return self.inp[: rows * features].view(rows, features)  # [rows, in]

    def output_rows(self, rows: int, features: int) -> torch.Tensor:
        return self.out[: rows * features].view(rows, features)  # [rows, out]

    # ---- adapter table ----------------------------------------------------------------------

    def _slot_base(self, slot: int) -> int:
        if not 0 <= slot < self.layout.max_adapters:
            raise IndexError(f"adapter slot {slot} out of range 0..{self.layout.max_adapters - 1}")
        return self.layout.table + slot * SLOT_WORDS

    def set_slot(self, slot: int, generation: int, rank: int, slice_ranks: tuple, shm_name: str) -> None:
        raw = shm_name.encode()
        if len(raw) >= NAME_BYTES:
            raise ValueError(f"segment name {shm_name!r} is longer than {NAME_BYTES - 1} bytes")
        base = self._slot_base(slot)
        w = self.words
        w[base + T_GEN] = 0  # invalid while rewritten
        w[base + T_RANK] = rank
        for i, r in enumerate(slice_ranks):
            w[base + T_SLICE_RANKS + i] = r
        start = (base + T_NAME) * 8
        self.shm.buf[start : start + NAME_BYTES] = raw.ljust(NAME_BYTES, b"\0")
        w[base + T_GEN] = generation
        w[H_TABLE_EPOCH] += 1

    def clear_slot(self, slot: int) -> None:
        self.words[self._slot_base(slot) + T_GEN] = 0
        self.words[H_TABLE_EPOCH] += 1

    def slot_generation(self, slot: int) -> int:
        return self.words[self._slot_base(slot) + T_GEN]

    def read_slot(self, slot: int) -> Optional[tuple]:
        """(generation, rank, slice ranks, segment name), or None for a free slot."""
        base = self._slot_base(slot)
        w = self.words
        generation = w[base + T_GEN]
        if generation == 0:
            return None
        start = (base + T_NAME) * 8
        name = bytes(self.shm.buf[start : start + NAME_BYTES]).rstrip(b"\0").decode()
        slice_ranks = tuple(w[base + T_SLICE_RANKS + i] for i in range(SLICE_COUNT))
        return generation, w[base + T_RANK], slice_ranks, name


def flat_slice_ranks(slice_ranks: dict) -> tuple:
    """AdapterSpec.slice_ranks (group -> per-slice ranks) as the table's 7 words, GROUPS order."""
    flat = tuple(r for g in GROUPS for r in slice_ranks.get(g, ()))
    if len(flat) != SLICE_COUNT:
        raise ValueError(f"expected {SLICE_COUNT} slice ranks over {GROUPS}, got {slice_ranks}")
    return flat


def group_slice_ranks(flat: tuple) -> dict:
    """Inverse of `flat_slice_ranks`."""
    out, i = {}, 0
    for g in GROUPS:
        n = len(GROUP_MODULES[g])
        out[g] = tuple(flat[i : i + n])
        i += n
    return out
