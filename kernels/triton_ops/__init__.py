"""Triton path (CUDA; tests run it under TRITON_INTERPRET=1)."""
from .decode import mbgmv_expand, mbgmv_expand_split, mbgmv_shrink
from .prefill import sgmv_expand, sgmv_shrink

__all__ = ["sgmv_shrink", "sgmv_expand", "mbgmv_shrink", "mbgmv_expand", "mbgmv_expand_split"]
