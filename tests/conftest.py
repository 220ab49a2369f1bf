"""Shared fixtures: tiny DeepSeek-V3.2 models whose every weight matters."""

from __future__ import annotations

import pytest
import torch

import modeling_deepseek_v32.kernels as kernels
from modeling_deepseek_v32.testing_utils import random_model, tiny_config


@pytest.fixture
def tiny_model():
    return random_model(tiny_config())


@pytest.fixture
def tiny_model_fp32_indexer():
    return random_model(tiny_config(index_fp8=False))


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and a busy (CI) machine cannot stall them in OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_switch(monkeypatch):
    """Triton kernels on, with failures raised instead of a silent fall back to the PyTorch twin; returns
    ``switch(on)``, which turns them off (``DEEPSEEK_V32_KERNELS=0``) and on again."""
    monkeypatch.setattr(kernels, "RAISE_ERRORS", True)
    monkeypatch.delenv("DEEPSEEK_V32_KERNELS", raising=False)
    kernels._broken.clear()

    def switch(on: bool) -> None:
        if on:
            monkeypatch.delenv("DEEPSEEK_V32_KERNELS", raising=False)
        else:
            monkeypatch.setenv("DEEPSEEK_V32_KERNELS", "0")

    return switch


@pytest.fixture
def use_kernels(kernel_switch, monkeypatch):
    """``kernel_switch`` that also runs the kernels on CPU tensors, through Triton's interpreter (the test module
    sets ``TRITON_INTERPRET=1`` before importing any kernel when there is no GPU)."""
    monkeypatch.setattr(kernels, "ALLOW_CPU_INTERPRETER", True)
    return kernel_switch
