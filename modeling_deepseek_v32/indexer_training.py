"""Training the DSA lightning indexer with its own loss, as in DeepSeek's V3.2 report.

The indexer's top-k selection is not differentiable, so the LM loss cannot train it. Instead it learns to imitate
the main attention: the target is the main attention's probabilities summed over heads and L1-normalized over keys
(detached), and the loss is ``KL(target || softmax(index_scores))`` per query, averaged over queries and layers.

* ``config.indexer_training = "dense_warmup"``: the main attention runs dense over every causal token and the KL
  covers all of them. The report trains only the indexer in this stage: ``freeze_for_indexer_warmup(model)``.
* ``config.indexer_training = "sparse"``: attention stays sparse; the KL covers the selected tokens only.

In both stages the indexer scores detached inputs, so its loss never reaches the rest of the model and, its selection
being discrete, the LM loss never reaches the indexer. The scores here are the differentiable full-precision twin of
``DeepseekV32Indexer.forward`` (no FP8 emulation: the Hadamard rotation is orthogonal and rounding has no gradient).

``DeepseekV32Attention`` calls :func:`record_indexer_loss` once per training forward; the causal LM collects
``attention.indexer_loss`` into its ``indexer_loss`` output. ``indexer_stats(model)`` reports the last forward's KL
and, in dense warm-up, ``recall@topk``: the share of the dense attention's top-k tokens that the indexer selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .indexer import DeepseekV32Indexer, IndexSelection
from .moe_balancing import in_checkpoint_recompute

__all__ = [
    "differentiable_index_scores",
    "indexer_kl_loss",
    "selection_recall",
    "record_indexer_loss",
    "indexer_stats",
    "freeze_for_indexer_warmup",
]

_NEG = torch.finfo(torch.float32).min


def differentiable_index_scores(
    indexer: DeepseekV32Indexer,
    hidden_states: torch.Tensor,
    q_latent: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index scores ``sum_h w_h * ReLU(q_h . k_t)`` in fp32 with gradients to the indexer's weights, over all keys
    (``[B, S, T]``, T = S: no cache) or, given ``indices`` ``[B, S, K]``, over those keys only (``[B, S, K]``).
    Inputs are detached: only the indexer learns from these scores. No mask is applied."""
    # Autocast is off here (fp32 scores), so activations produced under bf16 autocast must meet the weights' dtype.
    hidden_states = _as_input_of(indexer.wk, hidden_states.detach())
    q_latent = _as_input_of(indexer.wq_b, q_latent.detach())
    norm = indexer.k_norm
    keys = F.layer_norm(indexer.wk(hidden_states).float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    keys = indexer._rope(keys, cos, sin)
    queries = indexer.wq_b(q_latent).float().unflatten(-1, (indexer.n_heads, indexer.head_dim))
    queries = indexer._rope(queries, cos, sin)
    weights = F.linear(hidden_states.float(), indexer.weights_proj.weight.float())
    weights = weights * (indexer.n_heads**-0.5 * indexer.head_dim**-0.5)
    if indices is None:
        logits = torch.einsum("bshd,btd->bsht", queries, keys).relu()
        return torch.einsum("bsh,bsht->bst", weights, logits)
    batch, seq, k = indices.shape
    batch_index = torch.arange(batch, device=keys.device)[:, None]
    selected = keys[batch_index, indices.reshape(batch, seq * k)].view(batch, seq, k, -1)
    logits = torch.einsum("bshd,bskd->bshk", queries, selected).relu()
    return torch.einsum("bsh,bshk->bsk", weights, logits)


def _as_input_of(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(linear, "weight", None)
    if weight is not None and weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return x.to(weight.dtype)
    return x  # FP8 / quantized modules convert their input themselves


def indexer_kl_loss(
    scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor, query_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over queries of ``KL(p || softmax(scores))`` with ``p = target / sum(target)`` over the ``allowed`` keys.

    ``scores``, ``target`` (head-summed attention probabilities, zero where not allowed) and ``allowed``: ``[B, S, K]``.
    Queries with no allowed key, or with ``query_valid`` False, do not count. Returns 0 when none counts.
    """
    target = target.float() * allowed
    p = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    # A finite fill keeps rows without any allowed key free of NaN in backward (they are dropped below anyway).
    log_q = scores.float().masked_fill(~allowed, _NEG).log_softmax(dim=-1)
    per_query = (torch.xlogy(p, p) - p * log_q.masked_fill(~allowed, 0.0)).sum(dim=-1)
    counted = allowed.any(dim=-1) & (target.sum(dim=-1) > 0)
    if query_valid is not None:
        counted = counted & query_valid
    if not bool(counted.any()):
        return scores.sum() * 0.0
    return per_query[counted].mean()


@torch.no_grad()
def selection_recall(selection: IndexSelection, dense_probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor | None:
    """``recall@k``: share of the dense attention's top-k keys (``dense_probs`` ``[B, S, T]``) that the indexer
    selected, averaged over queries with more than k allowed keys (the others select everything). None if none."""
    k = selection.indices.shape[-1]
    counted = allowed.sum(dim=-1) > k
    if not bool(counted.any()):
        return None
    top = dense_probs.masked_fill(~allowed, -1.0).topk(k, dim=-1).indices
    is_top = torch.zeros_like(allowed).scatter_(-1, top, True)
    hits = (is_top.gather(-1, selection.indices) & selection.valid).sum(dim=-1).float() / k
    return hits[counted].mean()


def _causal_allowed(seq: int, key_valid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    positions = torch.arange(seq, device=device)
    allowed = (positions[None, :] <= positions[:, None])[None]
    return allowed & key_valid[:, None, :] if key_valid is not None else allowed


def record_indexer_loss(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    q_latent: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_valid: torch.Tensor | None,
    selection: IndexSelection | None,
    head_probs: list[torch.Tensor],
    stage: str,
) -> None:
    """Compute one layer's indexer loss from the main attention's head-summed probabilities (``head_probs``: the
    query chunks of ``_attend``, ``[B, C, K]`` each) and stash it as ``attention.indexer_loss`` (and its metrics as
    ``attention.indexer_metrics``). ``selection`` is what the indexer picked (None: it picked every causal token);
    in ``"dense_warmup"`` the probabilities cover all keys, in ``"sparse"`` the selected ones."""
    if not head_probs:
        raise RuntimeError("indexer training needs the PyTorch attention path (a fused kernel ran instead)")
    target = torch.cat(head_probs, dim=1)
    seq = hidden_states.shape[1]
    query_valid = key_valid[:, -seq:] if key_valid is not None else None
    with torch.autocast(device_type=hidden_states.device.type, enabled=False):
        if stage == "dense_warmup" or selection is None:
            allowed = _causal_allowed(seq, key_valid, hidden_states.device).expand_as(target)
            scores = differentiable_index_scores(attention.indexer, hidden_states, q_latent, cos, sin)
        else:
            allowed = selection.valid
            scores = differentiable_index_scores(attention.indexer, hidden_states, q_latent, cos, sin, selection.indices)
        loss = indexer_kl_loss(scores, target, allowed, query_valid)
    # A checkpoint recomputation runs the same ops (it must save the same tensors) but keeps nothing.
    if in_checkpoint_recompute():
        return
    attention.indexer_loss = loss
    recall = None
    if stage == "dense_warmup" and selection is not None:
        recall = selection_recall(selection, target, allowed)
    attention.indexer_metrics = {"kl": loss.detach(), "recall": recall}


def indexer_stats(model: nn.Module) -> dict[str, float]:
    """The last training forward's indexer metrics averaged over layers: ``indexer_kl`` and, in dense warm-up when
    sequences are longer than ``index_topk``, ``indexer_recall`` (recall@topk against the dense attention)."""
    kls, recalls = [], []
    for module in model.modules():
        metrics = getattr(module, "indexer_metrics", None)
        if metrics:
            kls.append(metrics["kl"].item())
            if metrics["recall"] is not None:
                recalls.append(metrics["recall"].item())
    stats = {}
    if kls:
        stats["indexer_kl"] = sum(kls) / len(kls)
    if recalls:
        stats["indexer_recall"] = sum(recalls) / len(recalls)
    return stats


def freeze_for_indexer_warmup(model: nn.Module) -> list[str]:
    """Freeze every parameter except the lightning indexers' (the report's dense warm-up trains only them).
    Returns the names of the parameters left trainable. Undo with ``model.requires_grad_(True)``."""
    indexer_params = {
        id(param) for module in model.modules() if isinstance(module, DeepseekV32Indexer) for param in module.parameters()
    }
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in indexer_params)
        if id(param) in indexer_params:
            trainable.append(name)
    return trainable
