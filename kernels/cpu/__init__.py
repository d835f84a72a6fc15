"""Fast CPU path: vectorised torch (see decode.py for mbgmv / bgmv, prefill.py for sgmv)."""
from .decode import bgmv_expand, bgmv_shrink, mbgmv_expand, mbgmv_shrink
from .prefill import sgmv_expand, sgmv_shrink

__all__ = ["sgmv_shrink", "sgmv_expand", "mbgmv_shrink", "mbgmv_expand", "bgmv_shrink", "bgmv_expand"]
