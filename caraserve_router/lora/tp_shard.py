"""One tensor-parallel rank's shard of every adapter, cut the way LightLLM 0.0.1 cuts the base.

LightLLM's TP llama (`LlamaTransformerLayerWeight._load_qkvo_weights` / `_load_ffn_weights`)
splits the column-parallel projections (q, k, v, gate, up) by output features and the
row-parallel ones (o, down) by input features, and all-reduces the o and down outputs. The LoRA
of a projection y = x W^T + (x A^T) B^T is sharded to match (the paper's TP scheme):

| projection | base weight on rank k | lora_A [r, in] | lora_B [out, r] | delta on rank k |
|---|---|---|---|---|
| q, k, v, gate, up (column) | rows k of W | replicated | rows k (output slice) | its output columns, complete |
| o, down (row) | columns k of W | columns k (input slice) | replicated | partial: x_k A_k^T B^T |

The row-parallel partial delta is added to the base's partial output *before* LightLLM's
all-reduce (our `_get_o` / `_ffn` add it in place), so one reduction serves base and LoRA: the
sum over ranks of x_k A_k^T B^T is x A^T B^T. No collective is added for LoRA, and a rank never
waits for another rank's LoRA work.

Bytes: the sliced halves (B of the column projections, A of the row ones) are split N ways, the
other halves replicated, so a rank holds `replicated + sliced / N` of an adapter, not 1/N
(`shard_fraction`; Llama-2-7B, all seven projections: 0.68 at N = 2, 0.53 at N = 4; q/v only:
0.75 at N = 2). Splitting the replicated halves too (S-LoRA's scheme) would need an extra
all-gather of the rank-r intermediate per projection group and step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from caraserve_router.contracts.tensor_parallel import tp_split_problem
from caraserve_router.lora.shapes import GROUPS, MODULE_SLOTS, ModelShapes

# Which weight of a PEFT pair is sliced: B (by output rows) for column-parallel projections, A
# (by input columns) for row-parallel ones.
COLUMN_PARALLEL: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL: tuple[str, ...] = ("o_proj", "down_proj")
ROW_PARALLEL_GROUPS: tuple[str, ...] = ("o", "down")


@dataclass(frozen=True)
class TpShard:
    """Rank `rank` of `size` (size 1: the whole adapter, no slicing)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of {self.size} is not a valid rank")

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def check(self, full: ModelShapes) -> None:
        """Refuse a base model LightLLM's split cannot cut evenly (with the reason)."""
        problem = tp_split_problem({"num_attention_heads": full.num_heads, "num_key_value_heads": full.num_kv_heads,
                                    "hidden_size": full.hidden, "head_dim": full.head_dim,
                                    "intermediate_size": full.intermediate}, self.size)
        if problem:
            raise ValueError(problem)

    def shapes(self, full: ModelShapes) -> ModelShapes:
        """This rank's projection shapes: what its pool, host segment, kernels and sidecar see."""
        if not self.sharded:
            return full
        self.check(full)
        return dataclasses.replace(full, num_heads=full.num_heads // self.size,
                                   num_kv_heads=full.num_kv_heads // self.size,
                                   intermediate=full.intermediate // self.size)

    def _span(self, features: int) -> tuple[int, int]:
        width = features // self.size
        return self.rank * width, width

    def slice_pair(self, module: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (lora_A, lora_B) of `module`: a [r, in] -> [r, in / N] for row-parallel
        projections, b [out, r] -> [out / N, r] for column-parallel ones (views, no copy)."""
        if not self.sharded:
            return a, b
        if module in ROW_PARALLEL:
            start, width = self._span(a.shape[1])
            return a.narrow(1, start, width), b
        if module in COLUMN_PARALLEL:
            start, width = self._span(b.shape[0])
            return a, b.narrow(0, start, width)
        raise ValueError(f"unknown projection {module!r}")


def shard_fraction(full: ModelShapes, size: int, modules=tuple(MODULE_SLOTS)) -> float:
    """Fraction of an adapter's bytes one of `size` ranks holds (same rank on every module)."""
    whole = part = 0
    for module in modules:
        in_f, out_f = full.module_shape(module)
        whole += in_f + out_f
        part += (in_f / size + out_f) if module in ROW_PARALLEL else (in_f + out_f / size)
    return part / whole


assert set(COLUMN_PARALLEL) | set(ROW_PARALLEL) == set(MODULE_SLOTS)
assert {MODULE_SLOTS[m][0] for m in ROW_PARALLEL} == set(ROW_PARALLEL_GROUPS) <= set(GROUPS)
