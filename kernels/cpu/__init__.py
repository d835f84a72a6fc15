"""Fast CPU path: vectorised torch (see decode.py for mbgmv, prefill.py for sgmv)."""
from .decode import PreparedDecode, mbgmv_expand, mbgmv_shrink
from ..reference import mbgmv_expand_split  # scratch + two adds: the CPU route needs no fused one
from .prefill import PreparedPrefill, sgmv_expand, sgmv_shrink

__all__ = ["sgmv_shrink", "sgmv_expand", "mbgmv_shrink", "mbgmv_expand", "mbgmv_expand_split", "PreparedDecode", "PreparedPrefill"]
