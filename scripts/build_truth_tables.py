#!/usr/bin/env python
"""Write the shipped truth tables (data/truth_tables/): this CPU VM's, from its measured profile
and bench_modes' calibration, the same VM with one torch thread per instance (the live validation
cluster's setting), and the H200's, from docs/results/gpu. Each table lists what was
measured and what was derived (`measured` / `not_measured`); `scripts/simulate.py --truth` reads them."""
from __future__ import annotations

import sys
from pathlib import Path

from caraserve_router.evaluation.truth_sources import cpu_vm_1thread_table, cpu_vm_table, h200_table

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    out = REPO / "data" / "truth_tables"
    out.mkdir(parents=True, exist_ok=True)
    for table in (cpu_vm_table(REPO), cpu_vm_1thread_table(REPO), h200_table(REPO / "docs" / "results" / "gpu")):
        path = out / f"{table.name}.json"
        table.save(path)
        print(f"wrote {path.relative_to(REPO)} ({table.device}): measured {table.measured}; "
              f"NOT measured {table.not_measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
