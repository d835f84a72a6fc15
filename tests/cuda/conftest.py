"""Fresh random batches every run (a failing test reports its seed, as in tests/kernels)."""
from __future__ import annotations

import random

import pytest
import torch

FIXED_SEED: int | None = None  # set to a reported seed to replay a failure


@pytest.fixture
def seed(request) -> int:
    value = FIXED_SEED if FIXED_SEED is not None else random.SystemRandom().randrange(2**31)
    request.node.cuda_seed = value
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "cuda_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("cuda test seed", f"seed={seed}: set FIXED_SEED = {seed} in tests/cuda/conftest.py"))
