"""Rotary position embedding with YaRN, in the two pair layouts DeepSeek-V3.2 uses.

MLA rotates interleaved pairs ``(x[2i], x[2i+1])`` in checkpoint order; the indexer rotates half-split pairs
``(x[i], x[i + d/2])`` (DeepSeek's 2025-11-18 fix). Both share one frequency table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .configuration import DeepseekV32Config


def yarn_inverse_frequencies(config: DeepseekV32Config) -> torch.Tensor:
    """Inverse frequencies of the rope slice, YaRN-corrected when the config asks for it (fp32, [dim/2])."""
    rope = config.rope_parameters
    dim, base = config.qk_rope_head_dim, float(rope["rope_theta"])
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if rope["rope_type"] != "yarn" or rope["factor"] <= 1:
        return inv_freq.float()
    factor, original = float(rope["factor"]), float(rope["original_max_position_embeddings"])

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rope["beta_slow"])), dim - 1)
    # A zero-width ramp would divide by zero; widen it by a hair as DeepSeek does.
    ramp = (torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
    ramp = ramp.clamp(0, 1)
    return (inv_freq / factor * ramp + inv_freq * (1 - ramp)).float()


class DeepseekV32RotaryEmbedding(nn.Module):
    """Returns ``(cos, sin)`` of shape ``[batch, seq, qk_rope_head_dim / 2]`` in fp32 for given positions."""

    def __init__(self, config: DeepseekV32Config, device: torch.device | None = None):
        super().__init__()
        self.register_buffer("inv_freq", yarn_inverse_frequencies(config).to(device), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
        return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])``. ``x``: [B, S, ..., d]; ``cos``/``sin``: [B, S, d/2]."""
    cos, sin = _broadcast(cos, x), _broadcast(sin, x)
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def apply_rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[i], x[i + d/2])``. ``x``: [B, S, ..., d]; ``cos``/``sin``: [B, S, d/2]."""
    cos, sin = _broadcast(cos, x), _broadcast(sin, x)
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.to(x.dtype)


def _broadcast(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Insert head dims between [B, S] and the last dim so the table broadcasts over ``x``."""
    while table.dim() < x.dim():
        table = table.unsqueeze(-2)
    return table
