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


def expert_load(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Number of routing slots each expert received, float32 ``[n_experts]``, from ``experts`` ``[..., top_k]``.

    Built with ``index_add_`` rather than ``bincount`` so it never synchronizes a GPU.
    """
    flat = experts.detach().reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(n_experts, dtype=torch.float32, device=flat.device).index_add_(0, flat, ones)


def sequence_balance_loss(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss without its ``alpha``: ``mean_b sum_i f_bi * P_bi``.

    ``scores`` ``[B, S, E]``: the router's affinities before the correction bias (sigmoid for V3.2); ``experts``
    ``[B, S, K]``: the chosen experts. For each sequence ``f_i = E / (K * S) * count_i`` (1 for every expert under
    perfect balance) and ``P_i`` is the mean over tokens of ``s_i / sum_j s_j``. A perfectly balanced, score-uniform
    sequence gives exactly 1. Only ``P`` carries a gradient: the counts come from a discrete top-k.
    """
    batch, seq, n_experts = scores.shape
    top_k = experts.shape[-1]
    ones = torch.ones(batch, seq * top_k, dtype=scores.dtype, device=scores.device)
    counts = torch.zeros(batch, n_experts, dtype=scores.dtype, device=scores.device)
    counts = counts.scatter_add_(1, experts.reshape(batch, -1), ones)
    fraction = counts * (n_experts / (top_k * seq))
    probability = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (fraction * probability).sum(dim=-1).mean()


def layer_mean(values: list[torch.Tensor]) -> torch.Tensor | None:
    """Mean of per-layer scalar losses, or None when no layer produced one."""
    if not values:
        return None
    return torch.stack([value.to(values[0].device) for value in values]).mean()
