"""Kernel tests draw fresh random batches every run; a failing test reports its seed."""
from __future__ import annotations

import pytest
import torch

from tests.seeded import gen, pytest_runtest_makereport, seed  # noqa: F401  (fixtures and the report hook)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the dev machine's 2 cores are shared, and OpenMP barriers stall for
    milliseconds when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
