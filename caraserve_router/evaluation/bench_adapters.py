"""The adapters the benchmark scripts share: `scripts/bench/many_adapters.py` makes its distinct
PEFT adapters once under the repository's `.cache/bench/many/distinct`; other benchmarks reuse them."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DISTINCT_DIR = REPO / ".cache" / "bench" / "many" / "distinct"


def have_adapters(path: Path) -> bool:
    """True if `path` is a directory; otherwise say how to make it (on stderr) and return False."""
    if path.is_dir():
        return True
    print(f"no adapters in {path}: run scripts/bench/many_adapters.py first or pass --adapters-dir", file=sys.stderr)
    return False
