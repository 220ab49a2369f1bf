"""Small building blocks shared by attention, indexer and MoE: RMSNorm, the SwiGLU MLP and the linear factory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels as _kernels
from .configuration import DeepseekV32Config
from .fp8 import FP8Linear


def make_linear(config: DeepseekV32Config, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """An ``nn.Linear``, or an ``FP8Linear`` holding 128x128 block-scaled e4m3 weights for FP8 checkpoints."""
    if config.is_block_fp8:
        return FP8Linear(in_features, out_features, bias=bias, block_size=config.fp8_block_size)
    return nn.Linear(in_features, out_features, bias=bias)


class DeepseekV32RMSNorm(nn.Module):
    """RMSNorm computed in fp32 with the weight applied before casting back, as DeepSeek's runtime does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = _kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        if fused is not None:
            return fused
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * self.weight.float()).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class DeepseekV32MLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``; the activation product is taken in fp32."""

    def __init__(self, config: DeepseekV32Config, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = make_linear(config, config.hidden_size, intermediate_size)
        self.up_proj = make_linear(config, config.hidden_size, intermediate_size)
        self.down_proj = make_linear(config, intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.silu(self.gate_proj(x).float()) * self.up_proj(x).float()
        return self.down_proj(activated.to(x.dtype))
