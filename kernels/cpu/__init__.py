"""Fast CPU path: vectorised torch (see decode.py for mbgmv, prefill.py for sgmv)."""
from .decode import PreparedDecode, mbgmv_expand, mbgmv_shrink
from .prefill import PreparedPrefill, sgmv_expand, sgmv_shrink

__all__ = ["sgmv_shrink", "sgmv_expand", "mbgmv_shrink", "mbgmv_expand", "PreparedDecode", "PreparedPrefill"]
