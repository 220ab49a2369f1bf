"""Shared fixtures: tiny DeepSeek-V3.2 models whose every weight matters."""

from __future__ import annotations

import pytest

from modeling_deepseek_v32.testing_utils import random_model, tiny_config


@pytest.fixture
def tiny_model():
    return random_model(tiny_config())


@pytest.fixture
def tiny_model_fp32_indexer():
    return random_model(tiny_config(index_fp8=False))
