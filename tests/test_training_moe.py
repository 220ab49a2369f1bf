"""MoE balancing for training: routing statistics, the sequence-wise balance loss, the bias-update callback."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState

from modeling_deepseek_v32.moe_balancing import expert_load, sequence_balance_loss
from modeling_deepseek_v32.testing_utils import random_model, tiny_config
from modeling_deepseek_v32.training import (
    DeepseekV32BiasUpdateCallback,
    load_imbalance,
    routers,
    routing_stats,
    update_routing_bias,
)



def _ids(batch: int = 2, seq: int = 12, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_sequence_balance_loss_by_hand():
    # 2 sequences, 3 tokens, 4 experts, top-2.
    scores = torch.tensor(
        [
            [[0.9, 0.1, 0.5, 0.5], [0.8, 0.2, 0.6, 0.4], [0.7, 0.3, 0.1, 0.9]],
            [[0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.4, 0.6], [0.1, 0.9, 0.3, 0.7]],
        ]
    )
    experts = torch.tensor([[[0, 2], [0, 2], [0, 3]], [[1, 2], [1, 3], [1, 3]]])
    expected = 0.0
    for b in range(2):
        n_experts, top_k, seq = 4, 2, 3
        counts = [sum(int(e in experts[b, t].tolist()) for t in range(seq)) for e in range(n_experts)]
        f = [n_experts / (top_k * seq) * c for c in counts]
        p = [sum(scores[b, t, e].item() / scores[b, t].sum().item() for t in range(seq)) / seq for e in range(n_experts)]
        expected += sum(fi * pi for fi, pi in zip(f, p)) / 2
    assert sequence_balance_loss(scores, experts).item() == pytest.approx(expected, rel=1e-6)
    # Perfect balance with uniform scores gives exactly 1; piling onto the scored-highest experts gives more.
    uniform = torch.full((1, 2, 4), 0.5)
    assert sequence_balance_loss(uniform, torch.tensor([[[0, 1], [2, 3]]])).item() == pytest.approx(1.0)
    assert sequence_balance_loss(scores[:1], experts[:1]).item() > 1.0


def test_model_aux_loss_is_reported_and_added_with_alpha():
    ids = _ids()
    plain = random_model(tiny_config()).train()
    with_aux = random_model(tiny_config(moe_aux_loss_alpha=0.01)).train()
    base = plain(ids, labels=ids)
    out = with_aux(ids, labels=ids)
    assert base.aux_loss is None and out.aux_loss is not None
    # Same weights, so the only difference in the loss is alpha * aux_loss; aux_loss is near 1 for a random router.
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.01 * out.aux_loss.item(), rel=1e-5)
    assert 0.8 < out.aux_loss.item() < 2.0
    # It is the mean over the MoE layers of the per-layer balance loss recomputed from the routers' outputs.
    per_layer = []
    for layer in with_aux.model.decoder_layers[with_aux.config.first_k_dense_replace :]:
        hidden = {}
        handle = layer.mlp.register_forward_pre_hook(lambda mod, args: hidden.setdefault("x", args[0]))
        with_aux(ids)
        handle.remove()
        logits, _, experts = layer.mlp.gate(hidden["x"].reshape(-1, hidden["x"].shape[-1]))
        per_layer.append(sequence_balance_loss(logits.sigmoid().view(2, 12, -1), experts.view(2, 12, -1)))
    assert out.aux_loss.item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-5)
    # Only training mode computes it, and the gradient reaches the router weights through it.
    with_aux.eval()
    assert with_aux(ids, labels=ids).aux_loss is None
    with_aux.train()
    with_aux(ids, labels=ids).aux_loss.backward()
    gate = with_aux.model.layers[with_aux.config.first_k_dense_replace].mlp.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_aux_loss_is_weighted_by_share_of_items_under_gradient_accumulation():
    ids = _ids()
    model = random_model(tiny_config(moe_aux_loss_alpha=0.1)).train()
    out = model(ids, labels=ids)
    items = ids[:, 1:].numel()
    scaled = model(ids, labels=ids, num_items_in_batch=torch.tensor(4 * items))
    # Cross-entropy sums over tokens / num_items_in_batch; the aux term gets this batch's share (1/4) of alpha.
    ce = out.loss.item() - 0.1 * out.aux_loss.item()
    assert scaled.loss.item() == pytest.approx(ce / 4 + 0.1 / 4 * out.aux_loss.item(), rel=1e-5)


def test_routing_stats_count_every_slot_and_accumulate_only_in_training():
    config = tiny_config()
    model = random_model(config)
    ids = _ids(batch=3, seq=10)
    model(ids)
    stats = model.routing_stats()
    assert len(stats.loads) == config.num_hidden_layers - config.first_k_dense_replace  # MTP layer did not run
    for name, load in stats.loads.items():
        assert load.sum().item() == 30 * config.num_experts_per_tok
        assert stats.imbalance[name] == pytest.approx(load.max().item() / load.mean().item())
    assert set(stats.summary()) == {"moe_imbalance_mean", "moe_imbalance_max"}
    assert not routing_stats(model, accumulated=True).loads  # eval forwards do not accumulate
    model.train()
    model(ids)
    first = routing_stats(model).loads
    model(_ids(batch=3, seq=10, seed=1))
    second = routing_stats(model).loads
    accumulated = routing_stats(model, accumulated=True).loads
    for name in first:
        assert torch.equal(accumulated[name], first[name] + second[name])
    assert load_imbalance(torch.tensor([2.0, 2.0, 2.0, 2.0])) == 1.0
    assert torch.equal(expert_load(torch.tensor([[0, 3], [3, 1]]), 5), torch.tensor([1.0, 1.0, 0.0, 2.0, 0.0]))


def test_activation_checkpointing_neither_double_counts_nor_drops_the_aux_gradient():
    ids = _ids()
    grads = []
    for checkpointing in (False, True):
        model = random_model(tiny_config(moe_aux_loss_alpha=0.1)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids, labels=ids)
        out.aux_loss.backward()
        loads = routing_stats(model, accumulated=True).loads
        assert all(load.sum().item() == ids.numel() * 2 for load in loads.values())  # counted once, not recounted
        grads.append(model.model.layers[1].mlp.gate.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bias_update_moves_against_the_load_and_counts_accumulated_micro_batches():
    model = random_model(tiny_config()).train()
    callback = DeepseekV32BiasUpdateCallback(gamma=0.05)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control, model=model)
    before = {name: router.e_score_correction_bias.clone() for name, router in routers(model).items()}
    # Two micro-batches of one accumulation step, then one optimizer step.
    model(_ids(seed=1))
    model(_ids(seed=2))
    loads = routing_stats(model, accumulated=True).loads
    callback.on_optimizer_step(None, state, control, model=model)
    for name, router in routers(model).items():
        if name not in loads:  # the MTP layer's router did not run and is left alone
            assert torch.equal(router.e_score_correction_bias, before[name])
            continue
        load = loads[name]
        assert load.sum().item() == 2 * 24 * 2
        delta = router.e_score_correction_bias - before[name]
        over, under = load > load.mean(), load < load.mean()
        assert over.any() and under.any()
        torch.testing.assert_close(delta[over], torch.full_like(delta[over], -0.05))
        torch.testing.assert_close(delta[under], torch.full_like(delta[under], 0.05))
    assert routing_stats(model, accumulated=True).loads == {}  # consumed
    assert callback.history[0][0] == 1 and "moe_imbalance_mean" in callback.history[0][1]
    with pytest.raises(ValueError, match="gamma"):
        DeepseekV32BiasUpdateCallback(gamma=-1.0)


def _train_and_measure_imbalance(gamma: float, steps: int = 100) -> tuple[float, float]:
    """A plain loop on random tokens (AdamW on the LM loss, the callback after each step). Returns the mean over MoE
    layers of max/mean load, over the first and over the last 20 steps' accumulated loads."""
    torch.manual_seed(0)
    config = tiny_config()
    model = random_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    callback = DeepseekV32BiasUpdateCallback(gamma=gamma)
    state, control = TrainerState(), TrainerControl()
    generator = torch.Generator().manual_seed(1)
    windows: dict[str, dict[str, torch.Tensor]] = {"first": {}, "last": {}}
    for step in range(steps):
        ids = torch.randint(0, config.vocab_size, (8, 32), generator=generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loads = routing_stats(model, accumulated=True).loads
        callback.on_optimizer_step(None, state, control, model=model)
        window = "first" if step < 20 else "last" if step >= steps - 20 else None
        for name, load in loads.items() if window else ():
            windows[window][name] = windows[window].get(name, 0) + load

    def mean_imbalance(loads):
        return sum(load_imbalance(load) for load in loads.values()) / len(loads)

    return mean_imbalance(windows["first"]), mean_imbalance(windows["last"])


def test_bias_update_reduces_load_imbalance_over_training():
    _, without = _train_and_measure_imbalance(gamma=0.0)
    _, with_update = _train_and_measure_imbalance(gamma=1e-2)
    print(f"max/mean load over steps 80-100: {without:.3f} without the bias update, {with_update:.3f} with it")
    # Measured: 2.53 without, 1.10 with.
    assert with_update < 1.3
    assert with_update < 0.7 * without


def test_bias_update_all_reduces_loads_under_torch_distributed(tmp_path):
    """One-process gloo group: the distributed branch (all-reduce, routers that did not run) gives the same update."""
    import torch.distributed as dist

    ids = _ids()
    expected = random_model(tiny_config()).train()
    expected(ids)
    update_routing_bias(expected, 0.05)
    model = random_model(tiny_config()).train()
    model(ids)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        update_routing_bias(model, 0.05)
    finally:
        dist.destroy_process_group()
    for (name, router), reference in zip(routers(model).items(), routers(expected).values()):
        assert torch.equal(router.e_score_correction_bias, reference.e_score_correction_bias), name


def test_routing_stays_fp32_under_bf16_autocast():
    model = random_model(tiny_config(moe_aux_loss_alpha=0.1)).train()
    gate = model.model.layers[1].mlp.gate
    tokens = torch.randn(6, tiny_config().hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, _ = gate(tokens)
        out = model(_ids(), labels=_ids())
    assert logits.dtype == weights.dtype == torch.float32
    assert out.aux_loss.dtype == torch.float32


def test_padding_tokens_are_left_out_of_loads_balance_loss_and_bias_update():
    """A left-padded batch counts exactly what its rows count when run alone without padding."""
    config = tiny_config(moe_aux_loss_alpha=0.1, mtp_loss_weight=0.3)  # the MTP layer routes too
    long, short = _ids(batch=1, seq=12, seed=3), _ids(batch=1, seq=7, seed=4)
    alone = []
    for row in (long, short):
        model = random_model(config).train()
        out = model(row, labels=row)
        alone.append((routing_stats(model, accumulated=True).loads, out.aux_loss.item()))
    model = random_model(config).train()
    ids = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    loads = routing_stats(model, accumulated=True).loads
    assert len(loads) == config.num_hidden_layers - config.first_k_dense_replace + 1  # the MTP router ran too
    for name, load in loads.items():
        # Padding is routed to some experts; only the 12 + 7 real tokens (11 + 6 pairs in the MTP layer) count.
        assert torch.equal(load, alone[0][0][name] + alone[1][0][name]), name
    # The balance loss is a mean over sequences, each over its real tokens only.
    assert out.aux_loss.item() == pytest.approx((alone[0][1] + alone[1][1]) / 2, rel=1e-5)
    before = {name: router.e_score_correction_bias.clone() for name, router in routers(model).items()}
    used = update_routing_bias(model, 0.05).loads
    for name, router in routers(model).items():
        expected = before[name] + 0.05 * torch.sign(used[name].mean() - used[name])
        torch.testing.assert_close(router.e_score_correction_bias, expected)
        assert torch.equal(used[name], loads[name])
