"""Fresh random batches every run (a failing test reports its seed, as in tests/kernels)."""
from __future__ import annotations

from tests.seeded import gen, pytest_runtest_makereport, seed  # noqa: F401  (fixtures and the report hook)
