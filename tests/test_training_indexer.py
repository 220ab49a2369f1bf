"""Indexer training (DeepSeek-V3.2 report): KL to the main attention, dense warm-up and sparse stages."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_v32.indexer import DeepseekV32Indexer
from modeling_deepseek_v32.indexer_training import (
    differentiable_index_scores,
    freeze_for_indexer_warmup,
    indexer_kl_loss,
    indexer_stats,
)
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config



def _ids(batch: int = 2, seq: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _is_indexer_param(model, name: str) -> bool:
    indexers = {n for n, m in model.named_modules() if isinstance(m, DeepseekV32Indexer)}
    return name.rsplit(".", 2)[0] in indexers or name.rsplit(".", 1)[0] in indexers


def _grad_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_kl_by_hand():
    scores = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 0.0, math.log(2.0)], [5.0, 1.0, 0.0]]])
    target = torch.tensor([[[0.3, 0.1, 0.0], [1.0, 1.0, 2.0], [0.0, 0.0, 0.0]]])
    allowed = torch.tensor([[[True, True, False], [True, True, True], [False, False, False]]])
    # Query 0: p = (0.75, 0.25) against softmax(0, 1); query 1: p = q exactly; query 2 has no key and is skipped.
    q0, q1 = 1 / (1 + math.e), math.e / (1 + math.e)
    kl0 = 0.75 * math.log(0.75 / q0) + 0.25 * math.log(0.25 / q1)
    assert indexer_kl_loss(scores, target, allowed).item() == pytest.approx((kl0 + 0.0) / 2, rel=1e-6)
    # Padding queries are excluded; a masked key's score does not matter.
    assert indexer_kl_loss(scores, target, allowed, torch.tensor([[True, False, True]])).item() == pytest.approx(kl0, rel=1e-6)
    changed = scores.clone()
    changed[0, 0, 2] = -7.0
    assert indexer_kl_loss(changed, target, allowed).item() == pytest.approx(kl0 / 2, rel=1e-6)
    # Gradient of the fully masked row stays finite.
    scores.requires_grad_(True)
    indexer_kl_loss(scores, target, allowed).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 2].abs().sum() == 0


def test_differentiable_scores_select_what_the_indexer_selects():
    model = random_model(tiny_config(index_fp8=False))
    attention = model.model.layers[1].self_attn
    captured = {}

    def hook(module, args, output):
        captured["args"], captured["selection"] = args, output

    handle = attention.indexer.register_forward_hook(hook)
    model(_ids())
    handle.remove()
    hidden, q_latent, cos, sin = captured["args"][:4]
    selection = captured["selection"]
    scores = differentiable_index_scores(attention.indexer, hidden, q_latent, cos, sin)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    # ReLU makes exact ties at 0 likely; the indexer breaks them towards the earlier token, like a stable sort.
    order = scores.masked_fill(~causal, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    for batch in range(2):
        for query in range(20):
            chosen = selection.indices[batch, query][selection.valid[batch, query]].tolist()
            assert len(chosen) == min(query + 1, 8)
            assert set(chosen) == set(order[batch, query, : len(chosen)].tolist())
    # The gathered form (sparse stage) equals gathering the full scores.
    gathered = differentiable_index_scores(attention.indexer, hidden, q_latent, cos, sin, selection.indices)
    assert relative_error(gathered, scores.gather(-1, selection.indices)) < 1e-6


def test_inference_path_unchanged_and_dense_warmup_attends_to_everything():
    ids = _ids()
    reference = random_model(tiny_config())(ids).logits
    for stage in ("sparse", None):  # the sparse stage changes nothing outside training mode
        assert torch.equal(random_model(tiny_config(indexer_training=stage))(ids).logits, reference)
    warm = random_model(tiny_config(indexer_training="dense_warmup"))(ids).logits
    dense = random_model(tiny_config(index_topk=64))(ids).logits
    assert relative_error(warm, dense) < 1e-6 and relative_error(warm, reference) > 1e-3


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_indexer_loss_trains_only_the_indexer_and_the_lm_loss_never_does(stage):
    ids = _ids()
    base = random_model(tiny_config()).train()(ids, labels=ids).loss
    model = random_model(tiny_config(indexer_training=stage, indexer_loss_coef=0.5)).train()
    out = model(ids, labels=ids)
    assert out.indexer_loss is not None and out.indexer_loss.item() > 0
    if stage == "sparse":  # same attention as the base model, so the loss is the LM loss plus coef * KL
        assert out.loss.item() == pytest.approx(base.item() + 0.5 * out.indexer_loss.item(), rel=1e-5)
    out.indexer_loss.backward(retain_graph=True)
    grads = _grad_names(model)
    assert grads and all(_is_indexer_param(model, name) for name in grads)
    model.zero_grad()
    (out.loss - 0.5 * out.indexer_loss).backward()
    lm_grads = _grad_names(model)
    assert lm_grads and not any(_is_indexer_param(model, name) for name in lm_grads)


def test_warmup_freeze_leaves_gradients_only_on_indexers():
    model = random_model(tiny_config(indexer_training="dense_warmup")).train()
    trainable = freeze_for_indexer_warmup(model)
    # wq_b, wk, k_norm weight and bias, weights_proj, for each of the 4 layers (MTP included).
    assert len(trainable) == 5 * 4 and all(_is_indexer_param(model, name) for name in trainable)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n in trainable if ".layers.3." not in n  # the MTP layer does not run with mtp_loss_weight 0
    }


def test_indexer_training_under_activation_checkpointing():
    ids = _ids()
    grads = []
    for checkpointing in (False, True):
        model = random_model(tiny_config(indexer_training="sparse")).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append(model.model.layers[1].self_attn.indexer.wk.weight.grad.clone())
        assert model.model.layers[1].self_attn.indexer_loss is None  # collected, not re-stashed by the recompute
    torch.testing.assert_close(grads[0], grads[1])


def _sharpen_attention(model, factor: float) -> None:
    """Random init gives nearly uniform attention, which any indexer imitates already; scale the query and key
    projections so each head attends sharply to content- and position-dependent tokens."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_b_proj.weight.mul_(factor)
            layer.self_attn.kv_b_proj.weight.mul_(factor)


def test_dense_warmup_lowers_kl_and_raises_recall():
    torch.manual_seed(0)
    model = random_model(tiny_config(indexer_training="dense_warmup")).train()  # index_topk 8 < 32 tokens
    _sharpen_attention(model, 12.0)
    freeze_for_indexer_warmup(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    probe = _ids(batch=8, seq=32, seed=99)

    def measure() -> dict[str, float]:
        with torch.no_grad():
            model(probe)
        return indexer_stats(model)

    before = measure()
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        ids = torch.randint(0, 512, (4, 32), generator=generator)
        model(ids).indexer_loss.backward()  # no labels needed: the KL needs only the attention
        optimizer.step()
        optimizer.zero_grad()
    after = measure()
    print(f"indexer KL {before['indexer_kl']:.4f} -> {after['indexer_kl']:.4f}, "
          f"recall@8 {before['indexer_recall']:.3f} -> {after['indexer_recall']:.3f}")  # fmt: skip
    # Measured: KL 0.272 -> 0.166, recall@8 0.446 -> 0.683.
    assert after["indexer_kl"] < 0.8 * before["indexer_kl"]
    assert after["indexer_recall"] > before["indexer_recall"] + 0.1
