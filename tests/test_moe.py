"""DeepSeekMoE routing against a hand re-derivation of the notes, and the MoE block against a per-token loop."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_v32.configuration import DeepseekV32Config
from modeling_deepseek_v32.moe import DeepseekV32MoE, DeepseekV32TopkRouter

HIDDEN = 16


def _config(**overrides) -> DeepseekV32Config:
    base = dict(
        hidden_size=HIDDEN, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        moe_intermediate_size=8, n_shared_experts=1, routed_scaling_factor=2.5,
    )  # fmt: skip
    return DeepseekV32Config.from_preset("tiny", **{**base, **overrides})


def _router(config, seed=0, bias_scale=0.05) -> DeepseekV32TopkRouter:
    g = torch.Generator().manual_seed(seed)
    router = DeepseekV32TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.5)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, generator=g) * bias_scale)
    return router


def _tokens(n=64, seed=1) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _hand_route(x, weight, bias, cfg, group_score="auto"):
    """Per token, in Python floats: returns list of (dict expert -> weight)."""
    E, G = cfg.n_routed_experts, cfg.n_group
    per_group = E // G
    all_logits = (x.detach().double() @ weight.detach().double().T).tolist()
    bias = None if bias is None else bias.detach().double().tolist()
    out = []
    for t in range(x.shape[0]):
        logits = all_logits[t]
        if cfg.scoring_func == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            m = max(logits)
            exps = [math.exp(v - m) for v in logits]
            scores = [v / sum(exps) for v in exps]
        sel = [s + (bias[e] if bias is not None else 0.0) for e, s in enumerate(scores)]
        if cfg.topk_method == "greedy" or G == 1:
            candidates = list(range(E))
        else:
            mode = group_score if group_score != "auto" else ("top2" if bias is not None else "max")
            gscores = []
            for g_ in range(G):
                members = sorted((sel[e] for e in range(g_ * per_group, (g_ + 1) * per_group)), reverse=True)
                gscores.append(sum(members[:2]) if mode == "top2" else members[0])
            kept = sorted(range(G), key=lambda g_: gscores[g_], reverse=True)[: cfg.topk_group]
            candidates = [e for g_ in kept for e in range(g_ * per_group, (g_ + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: sel[e], reverse=True)[: cfg.num_experts_per_tok]
        w = [scores[e] for e in chosen]
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            total = sum(w)
            w = [v / total for v in w]
        out.append({e: v * cfg.routed_scaling_factor for e, v in zip(chosen, w)})
    return out


def _as_dicts(weights, experts):
    return [
        {int(e): float(w) for e, w in zip(experts[t].tolist(), weights[t].tolist())} for t in range(experts.shape[0])
    ]


def _assert_same_routing(got, expected):
    assert len(got) == len(expected)
    for t, (g, e) in enumerate(zip(got, expected)):
        assert set(g) == set(e), f"token {t}: experts {sorted(g)} != expected {sorted(e)}"
        for expert in e:
            assert g[expert] == pytest.approx(e[expert], rel=1e-5, abs=1e-6), f"token {t} expert {expert}"


def test_noaux_tc_router_matches_hand_derivation():
    config = _config()
    router = _router(config)
    x = _tokens()
    logits, weights, experts = router(x)
    assert weights.dtype == torch.float32
    assert weights.shape == experts.shape == (64, 4)
    assert logits.shape == (64, 16)
    expected = _hand_route(x, router.weight, router.e_score_correction_bias, config)
    _assert_same_routing(_as_dicts(weights, experts), expected)
    # Weights of each token sum to routed_scaling_factor (renormalized unbiased sigmoid scores).
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5))


def test_group_score_is_sum_of_top2_not_max():
    """The inputs are such that the two group-score rules pick different experts for some tokens."""
    config = _config()
    router = _router(config, seed=3, bias_scale=0.2)
    x = _tokens(seed=4)
    bias = router.e_score_correction_bias
    top2 = _hand_route(x, router.weight, bias, config, group_score="top2")
    by_max = _hand_route(x, router.weight, bias, config, group_score="max")
    assert any(set(a) != set(b) for a, b in zip(top2, by_max)), "inputs do not discriminate the group rules"
    _, weights, experts = router(x)
    _assert_same_routing(_as_dicts(weights, experts), top2)


def test_bias_changes_selection_but_not_weights():
    config = _config()
    router = _router(config, seed=5)
    x = _tokens(seed=6)
    no_bias = _hand_route(x, router.weight, None, config, group_score="top2")
    # Push one whole group up and boost single experts so that many tokens select differently.
    bias = torch.zeros(16)
    bias[12:16] = 0.6
    bias[1] = 0.9
    with torch.no_grad():
        router.e_score_correction_bias.copy_(bias)
    with_bias = _hand_route(x, router.weight, bias, config)
    changed = sum(set(a) != set(b) for a, b in zip(no_bias, with_bias))
    assert changed >= 16, "the bias should change the selection of many tokens"
    _, weights, experts = router(x)
    got = _as_dicts(weights, experts)
    _assert_same_routing(got, with_bias)
    # Weights come from the unbiased scores: recompute from sigmoid(logits) only.
    scores = torch.sigmoid(x.double() @ router.weight.double().T)
    for t in range(x.shape[0]):
        chosen = sorted(got[t])
        s = scores[t, chosen]
        torch.testing.assert_close(
            torch.tensor([got[t][e] for e in chosen], dtype=torch.float64), s / s.sum() * 2.5, rtol=1e-5, atol=1e-6
        )


def test_router_scores_in_fp32_for_bf16_input():
    config = _config()
    router = _router(config, seed=7)
    x = _tokens(seed=8)
    _, w_fp32, e_fp32 = router(x)
    _, w_bf16, e_bf16 = router(x.to(torch.bfloat16))
    assert w_bf16.dtype == torch.float32
    expected = _hand_route(x.to(torch.bfloat16).float(), router.weight, router.e_score_correction_bias, config)
    _assert_same_routing(_as_dicts(w_bf16, e_bf16), expected)


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_greedy_router(scoring_func, norm_topk_prob):
    config = _config(topk_method="greedy", scoring_func=scoring_func, norm_topk_prob=norm_topk_prob,
                     routed_scaling_factor=1.5)  # fmt: skip
    router = _router(config, seed=9)
    assert router.e_score_correction_bias is None
    x = _tokens(seed=10)
    _, weights, experts = router(x)
    expected = _hand_route(x, router.weight, None, config)
    _assert_same_routing(_as_dicts(weights, experts), expected)
    # Greedy ignores groups: with 4 groups and topk_group 2, some token must use experts from > 2 groups.
    assert any(len({e // 4 for e in row.tolist()}) > 2 for row in experts)


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_group_limited_greedy_router(scoring_func, norm_topk_prob):
    config = _config(topk_method="group_limited_greedy", scoring_func=scoring_func, norm_topk_prob=norm_topk_prob)
    router = _router(config, seed=11)
    assert router.e_score_correction_bias is None
    x = _tokens(seed=12)
    _, weights, experts = router(x)
    expected = _hand_route(x, router.weight, None, config, group_score="max")
    greedy = _hand_route(x, router.weight, None, _config(topk_method="greedy", scoring_func=scoring_func,
                                                         norm_topk_prob=norm_topk_prob))  # fmt: skip
    assert any(set(a) != set(b) for a, b in zip(expected, greedy)), "group limit never binds"
    top2 = _hand_route(x, router.weight, None, config, group_score="top2")
    assert any(set(a) != set(b) for a, b in zip(expected, top2)), "inputs do not separate max from top-2 sum"
    _assert_same_routing(_as_dicts(weights, experts), expected)
    # Every token's experts lie in at most topk_group groups.
    assert all(len({e // 4 for e in row.tolist()}) <= 2 for row in experts)


# ------------------------------------------------------------------------------------------------------------------
# MoE block
# ------------------------------------------------------------------------------------------------------------------
def _moe(config, seed=0) -> DeepseekV32MoE:
    torch.manual_seed(seed)
    moe = DeepseekV32MoE(config).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in moe.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, generator=g) * 0.05)
    return moe


def _hand_mlp(mlp, x):
    """down(silu(gate x) * up x) written with the weight matrices, float64."""
    wg, wu, wd = (m.weight.double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    xd = x.double()
    gate = wg @ xd
    act = gate / (1 + torch.exp(-gate))
    return wd @ (act * (wu @ xd))


@pytest.mark.parametrize("n_shared", [1, 2, 0])
def test_moe_output_matches_per_token_loop(n_shared):
    config = _config(n_shared_experts=n_shared)
    moe = _moe(config, seed=n_shared)
    x = torch.randn(2, 12, HIDDEN, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        out = moe(x)
    assert out.shape == x.shape and out.dtype == x.dtype

    tokens = x.reshape(-1, HIDDEN)
    routes = _hand_route(tokens, moe.gate.weight, moe.gate.e_score_correction_bias, config)
    # The module's own router agrees with the hand routing ...
    _, weights, experts = moe.gate(tokens)
    _assert_same_routing(_as_dicts(weights, experts), routes)
    # ... and the output is the weighted sum over exactly those experts plus the shared experts.
    expected = torch.zeros(tokens.shape, dtype=torch.float64)
    with torch.no_grad():
        for t in range(tokens.shape[0]):
            for e, w in routes[t].items():
                expected[t] += w * _hand_mlp(moe.experts[e], tokens[t])
            if n_shared:
                assert moe.shared_experts.gate_proj.weight.shape[0] == config.moe_intermediate_size * n_shared
                expected[t] += _hand_mlp(moe.shared_experts, tokens[t])
            else:
                assert moe.shared_experts is None
    torch.testing.assert_close(out.reshape(-1, HIDDEN).double(), expected, rtol=1e-4, atol=1e-4)


def test_moe_unused_experts_do_not_matter_and_used_ones_do():
    config = _config()
    moe = _moe(config, seed=21)
    x = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        base = moe(x)
        _, _, experts = moe.gate(x.reshape(-1, HIDDEN))
        used = set(experts.flatten().tolist())
        unused = sorted(set(range(16)) - used)
        assert unused
        moe.experts[unused[0]].down_proj.weight.mul_(10)
        torch.testing.assert_close(moe(x), base)
        moe.experts[sorted(used)[0]].down_proj.weight.mul_(10)
        assert (moe(x) - base).abs().max() > 1e-3
