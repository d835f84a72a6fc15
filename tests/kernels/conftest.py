"""Kernel tests draw fresh random batches every run; a failing test reports its seed."""
from __future__ import annotations

import random

import pytest
import torch

# Set to a reported seed to replay a failure.
FIXED_SEED: int | None = None


@pytest.fixture
def seed(request) -> int:
    value = FIXED_SEED if FIXED_SEED is not None else random.SystemRandom().randrange(2**31)
    request.node.kernel_seed = value
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "kernel_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("kernel test seed", f"seed={seed}: set FIXED_SEED = {seed} in "
                                                    "tests/kernels/conftest.py to replay"))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the dev machine's 2 cores are shared, and OpenMP barriers stall for
    milliseconds when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
