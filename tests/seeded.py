"""Fresh random batches every run, and a failing test reports its seed so it can be replayed.

Kernel tests (tests/kernels) and CUDA tests (tests/cuda) import these fixtures in their
conftest.py.
"""
from __future__ import annotations

import random

import pytest
import torch

FIXED_SEED: int | None = None  # set to a reported seed to replay a failure


@pytest.fixture
def seed(request) -> int:
    value = FIXED_SEED if FIXED_SEED is not None else random.SystemRandom().randrange(2**31)
    request.node.test_seed = value
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "test_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("test seed", f"seed={seed}: set FIXED_SEED = {seed} in tests/seeded.py to replay"))
