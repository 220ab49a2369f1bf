"""Helpers for tests of this package and of code built on it: tiny configs and seeded random models."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration import DeepseekV32Config
from .modeling_deepseek_v32 import DeepseekV32ForCausalLM
from .moe import DeepseekV32TopkRouter


def tiny_config(**overrides) -> DeepseekV32Config:
    """The shipped tiny preset (3 layers, 8 experts, index_topk 8, one MTP layer), fp32."""
    return DeepseekV32Config.from_preset("tiny", **overrides)


def random_model(config: DeepseekV32Config, seed: int = 0) -> DeepseekV32ForCausalLM:
    """A seeded model whose norms, LayerNorm biases and routing biases are perturbed away from their
    identity initialization, so a test that forgets one of them fails."""
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dtype.is_floating_point:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        for module in model.modules():
            if isinstance(module, DeepseekV32TopkRouter) and module.e_score_correction_bias is not None:
                module.e_score_correction_bias.copy_(torch.randn(module.e_score_correction_bias.shape, generator=generator) * 0.02)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


class IndexKeyCache:
    """The one method of ``DeepseekV32Cache`` the indexer uses, for indexer decode tests without a whole model."""

    def __init__(self):
        self.k = self.scale = None

    def update_index_keys(self, k, scale, layer_idx):
        self.k = k if self.k is None else torch.cat((self.k, k), 1)
        if scale is not None:
            self.scale = scale if self.scale is None else torch.cat((self.scale, scale), 1)
        return self.k, self.scale


def directory_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``directory``, read with safetensors alone (not our loader)."""
    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``tensor``: equality of these is bit-exactness, also for FP8 and NaN payloads."""
    return tensor.reshape(-1).view(torch.uint8)
