"""MoE load balancing math: per-expert loads and DeepSeek-V3's sequence-wise balance loss.

The router records its loads here on every forward; the auxiliary-loss-free bias update that consumes them is a
Trainer callback in ``training.py``. This module imports no Trainer machinery because ``moe.py`` needs it at model
import time.
"""

from __future__ import annotations

import torch

__all__ = ["expert_load", "sequence_balance_loss", "in_checkpoint_recompute", "layer_mean"]


def in_checkpoint_recompute() -> bool:
    """Whether this forward is a recomputation inside backward (non-reentrant activation checkpointing).

    A recomputed forward must not count its tokens again nor stash new loss tensors: the counts would double, and
    the stashed tensors would pin the recomputed graph until the next forward.
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def expert_load(experts: torch.Tensor, n_experts: int, token_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Number of routing slots each expert received, float32 ``[n_experts]``, from ``experts`` ``[..., top_k]``.

    ``token_valid`` (bool, ``experts.shape[:-1]``) leaves padding tokens out: they are routed like any token, but
    counting them would make the bias update balance the experts for padding. Built with ``index_add_`` rather than
    ``bincount`` so it never synchronizes a GPU.
    """
    flat = experts.detach().reshape(-1)
    if token_valid is None:
        ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    else:
        if token_valid.shape != experts.shape[:-1]:
            raise ValueError(f"token_valid has shape {tuple(token_valid.shape)}, expected {tuple(experts.shape[:-1])}")
        ones = token_valid.to(device=flat.device, dtype=torch.float32)[..., None].expand(experts.shape).reshape(-1)
    return torch.zeros(n_experts, dtype=torch.float32, device=flat.device).index_add_(0, flat, ones)


def sequence_balance_loss(
    scores: torch.Tensor, experts: torch.Tensor, token_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss without its ``alpha``: ``mean_b sum_i f_bi * P_bi``.

    ``scores`` ``[B, S, E]``: the router's affinities before the correction bias (sigmoid for V3.2); ``experts``
    ``[B, S, K]``: the chosen experts. For each sequence ``f_i = E / (K * S) * count_i`` (1 for every expert under
    perfect balance) and ``P_i`` is the mean over tokens of ``s_i / sum_j s_j``. A perfectly balanced, score-uniform
    sequence gives exactly 1. Only ``P`` carries a gradient: the counts come from a discrete top-k.

    ``token_valid`` (bool ``[B, S]``) restricts both counts and means to real tokens (``S`` becomes each sequence's
    number of real tokens); sequences without one are left out of the mean over ``B``.
    """
    batch, seq, n_experts = scores.shape
    top_k = experts.shape[-1]
    if token_valid is None:
        weight = torch.ones(batch, seq, dtype=scores.dtype, device=scores.device)
    else:
        if token_valid.shape != (batch, seq):
            raise ValueError(f"token_valid has shape {tuple(token_valid.shape)}, expected {(batch, seq)}")
        weight = token_valid.to(device=scores.device, dtype=scores.dtype)
    real = weight.sum(dim=1)  # [B] real tokens per sequence
    slots = weight[..., None].expand(batch, seq, top_k).reshape(batch, -1)
    counts = torch.zeros(batch, n_experts, dtype=scores.dtype, device=scores.device)
    counts = counts.scatter_add_(1, experts.reshape(batch, -1), slots)
    denominator = real.clamp(min=1)[:, None]
    fraction = counts * n_experts / (top_k * denominator)
    probability = ((scores / scores.sum(dim=-1, keepdim=True)) * weight[..., None]).sum(dim=1) / denominator
    per_sequence = (fraction * probability).sum(dim=-1)
    present = real > 0
    return per_sequence[present].sum() / present.sum().clamp(min=1)


def layer_mean(values: list[torch.Tensor]) -> torch.Tensor | None:
    """Mean of per-layer scalar losses, or None when no layer produced one."""
    if not values:
        return None
    return torch.stack([value.to(values[0].device) for value in values]).mean()
