"""Session fixtures: the default model, a tiny random llama (with adapters), free ports."""
from __future__ import annotations

import pytest

from tests import fixtures


@pytest.fixture(scope="session")
def default_model_dir():
    return fixtures.default_model_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return fixtures.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_llama_adapters(tmp_path_factory):
    return fixtures.tiny_llama_with_adapters(tmp_path_factory.mktemp("tiny-lora"))
