"""The DSA lightning indexer against a plain re-derivation of DeepSeek's scoring (notes, "Lightning indexer"):
LayerNorm'd key, half-split RoPE on the first qk_rope_head_dim dims, Hadamard, per-block e4m3 with ue8m0 scales,
weighted ReLU head sum, causal/padding mask, top-k. Also the fp32 path, the cache, padding and decode."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_v32.cache import DeepseekV32Cache
from modeling_deepseek_v32.indexer import DeepseekV32Indexer, IndexSelection, hadamard_matrix
from modeling_deepseek_v32.rope import DeepseekV32RotaryEmbedding
from modeling_deepseek_v32.testing_utils import tiny_config

E4M3 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------------------------
# Independent reference
# ------------------------------------------------------------------------------------------------------------------
def _sylvester(n: int) -> torch.Tensor:
    h = [[1.0]]
    while len(h) < n:
        h = [row + row for row in h] + [row + [-v for v in row] for row in h]
    return torch.tensor(h, dtype=torch.float32) / math.sqrt(n)


def _quantize_e4m3(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [..., D] (one block per vector): returns (fp8 values [..., D], scale [..., 1]) with a ue8m0 scale."""
    flat = v.reshape(-1, v.shape[-1])
    scales = []
    for row in flat:
        amax = row.abs().max().item()
        scales.append(2.0 ** math.ceil(math.log2(max(amax, 1e-4) / 448.0)))
    scale = torch.tensor(scales, dtype=torch.float32).reshape(*v.shape[:-1], 1)
    q = (v / scale).clamp(-448.0, 448.0).to(E4M3)
    return q, scale


def _half_split_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """x [B, S, (H,) D]; rotates pairs (x[i], x[i + rope_dim/2]) for i < rope_dim/2; cos/sin [B, S, rope_dim/2]."""
    out = x.clone()
    half = rope_dim // 2
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    for i in range(half):
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * cos[..., i] - b * sin[..., i]
        out[..., i + half] = a * sin[..., i] + b * cos[..., i]
    return out


def _interleaved_rope(x, cos, sin, rope_dim):
    out = x.clone()
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    for i in range(rope_dim // 2):
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * cos[..., i] - b * sin[..., i]
        out[..., 2 * i + 1] = a * sin[..., i] + b * cos[..., i]
    return out


def _ref_keys(ix: DeepseekV32Indexer, x, cos, sin, fp8=True, rope=_half_split_rope):
    """Indexer keys as DeepSeek computes them; returns (k fp8 or fp32 [B, T, D], k_scale [B, T, 1] or None)."""
    k = x.float() @ ix.wk.weight.float().T
    mu = k.mean(-1, keepdim=True)
    var = ((k - mu) ** 2).mean(-1, keepdim=True)
    k = (k - mu) / torch.sqrt(var + 1e-6) * ix.k_norm.weight.float() + ix.k_norm.bias.float()
    k = rope(k, cos, sin, ix.rope_dim)
    if not fp8:
        return k, None
    return _quantize_e4m3(k @ _sylvester(k.shape[-1]))


def _ref_scores(ix, x, q_latent, cos, sin, key_x=None, key_cos=None, key_sin=None, past_len=0, key_valid=None,
                fp8=True, rope=_half_split_rope):  # fmt: skip
    """Scores [B, S, T] (masked with -inf) of the S queries of (x, q_latent) against the keys of key_x."""
    if key_x is None:
        key_x, key_cos, key_sin = x, cos, sin
    n_heads, dim = ix.n_heads, ix.head_dim
    batch, seq, _ = x.shape
    k, k_scale = _ref_keys(ix, key_x, key_cos, key_sin, fp8=fp8, rope=rope)
    q = (q_latent.float() @ ix.wq_b.weight.float().T).reshape(batch, seq, n_heads, dim)
    q = rope(q, cos, sin, ix.rope_dim)
    w = (x.float() @ ix.weights_proj.weight.float().T) * n_heads**-0.5 * dim**-0.5  # [B, S, H]
    if fp8:
        q, q_scale = _quantize_e4m3(q @ _sylvester(dim))  # q_scale [B, S, H, 1]
        w = w * q_scale[..., 0]
    total = k.shape[1]
    scores = torch.full((batch, seq, total), float("-inf"), dtype=torch.float64)
    qd, kd, wd = q.double() if not fp8 else q.float().double(), k.float().double(), w.double()
    for b in range(batch):
        for s in range(seq):
            for t in range(total):
                if t > past_len + s or (key_valid is not None and not bool(key_valid[b, t])):
                    continue
                dots = (qd[b, s] @ kd[b, t]).clamp_min(0)  # [H]: ReLU(q_h . k_t)
                score = (wd[b, s] * dots).sum()
                if fp8:
                    score = score * k_scale[b, t, 0].double()
                scores[b, s, t] = score
    return scores


def _check_selection(sel: IndexSelection, scores: torch.Tensor, topk: int, rel_tol: float = 1e-5) -> int:
    """Compares per query the module's valid picks to the reference top-k set; returns #queries with > topk keys."""
    batch, seq, total = scores.shape
    k = min(topk, total)
    assert sel.indices.shape == sel.valid.shape == (batch, seq, k)
    assert sel.valid.dtype == torch.bool
    decided = 0
    for b in range(batch):
        for s in range(seq):
            row = scores[b, s]
            allowed = set(torch.nonzero(row > float("-inf")).flatten().tolist())
            picks = sel.indices[b, s].tolist()
            flags = sel.valid[b, s].tolist()
            assert len(set(picks)) == k, f"({b},{s}): duplicate picks {picks}"
            for idx, flag in zip(picks, flags):
                assert flag == (idx in allowed), f"({b},{s}): pick {idx} flagged valid={flag}, allowed={idx in allowed}"
            got = {idx for idx, flag in zip(picks, flags) if flag}
            if len(allowed) <= k:
                assert got == allowed, f"({b},{s}): {sorted(got)} != all allowed {sorted(allowed)}"
                continue
            decided += 1
            order = row.argsort(descending=True).tolist()
            expected = set(order[:k])
            if got != expected:
                kth, nxt = row[order[k - 1]].item(), row[order[k]].item()
                tol = rel_tol * max(abs(kth), abs(row[order[0]].item()), 1e-30)
                assert kth - nxt <= tol, (
                    f"({b},{s}): selected {sorted(got)} != reference {sorted(expected)} "
                    f"(k-th score {kth:.6g}, next {nxt:.6g})"
                )
                assert all(row[i].item() >= nxt - tol for i in got)
    return decided


# ------------------------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------------------------
def _indexer(seed=0, **overrides) -> tuple[DeepseekV32Indexer, DeepseekV32RotaryEmbedding]:
    config = tiny_config(**overrides)
    assert not config.is_block_fp8
    ix = DeepseekV32Indexer(config, layer_idx=0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ix.wq_b.weight.copy_(torch.randn(ix.wq_b.weight.shape, generator=g) * 0.3)
        ix.wk.weight.copy_(torch.randn(ix.wk.weight.shape, generator=g) * 0.15)
        ix.k_norm.weight.copy_(1 + 0.3 * torch.randn(ix.head_dim, generator=g))
        ix.k_norm.bias.copy_(0.3 * torch.randn(ix.head_dim, generator=g))
        ix.weights_proj.weight.copy_(torch.randn(ix.weights_proj.weight.shape, generator=g) * 0.3)
    return ix, DeepseekV32RotaryEmbedding(config)


def _inputs(batch=2, seq=16, seed=1, config=None):
    config = config or tiny_config()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, config.hidden_size, generator=g)
    q_latent = torch.randn(batch, seq, config.q_lora_rank, generator=g)
    return x, q_latent


def _positions(batch, start, stop):
    return torch.arange(start, stop).expand(batch, -1)


# ------------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------------
def test_hadamard_matrix_orthonormal_and_sylvester():
    for n in (1, 2, 4, 8, 16, 128):
        h = hadamard_matrix(n, torch.device("cpu"))
        assert h.shape == (n, n) and h.dtype == torch.float32
        torch.testing.assert_close(h @ h.T, torch.eye(n), rtol=0, atol=1e-6)
        torch.testing.assert_close(h, _sylvester(n), rtol=0, atol=0)
        assert torch.all(h.abs() == n**-0.5)


@pytest.mark.parametrize("bad", [0, 3, 6, 12, 24, 96])
def test_hadamard_matrix_rejects_non_powers_of_two(bad):
    with pytest.raises(ValueError):
        hadamard_matrix(bad, torch.device("cpu"))


def test_fp8_indexer_matches_reference():
    ix, rotary = _indexer()
    assert ix.use_fp8 and ix.index_topk == 8 and ix.head_dim == 16 and ix.rope_dim == 8 and ix.n_heads == 4
    x, q_latent = _inputs(seq=24)
    cos, sin = rotary(_positions(2, 0, 24))
    sel = ix(x, q_latent, cos, sin, past_len=0, key_valid=None, cache=None)
    assert isinstance(sel, IndexSelection)
    scores = _ref_scores(ix, x, q_latent, cos, sin)
    decided = _check_selection(sel, scores, ix.index_topk)
    assert decided == 2 * (24 - 8)
    # Early queries have fewer than topk causal keys: their extra picks must be flagged invalid.
    assert not sel.valid[:, 0, 1:].any() and sel.valid[:, 0, 0].all() and (sel.indices[:, 0, 0] == 0).all()
    assert sel.valid[:, 8:].all()


def _selections(scores, k):
    return [
        [set(row.argsort(descending=True)[:k].tolist()) for row in per_batch if (row > float("-inf")).sum() > k]
        for per_batch in scores
    ]


def test_reference_is_sensitive_to_fp8_and_rope_layout():
    """The inputs of the test above separate the FP8 path from full precision and half-split from interleaved
    RoPE, so a module skipping quantization or rotating the wrong pairs would fail it."""
    ix, rotary = _indexer()
    x, q_latent = _inputs(seq=24)
    cos, sin = rotary(_positions(2, 0, 24))
    fp8 = _selections(_ref_scores(ix, x, q_latent, cos, sin), 8)
    full = _selections(_ref_scores(ix, x, q_latent, cos, sin, fp8=False), 8)
    inter = _selections(_ref_scores(ix, x, q_latent, cos, sin, rope=_interleaved_rope), 8)
    assert fp8 != full
    assert fp8 != inter


@pytest.mark.parametrize("index_head_dim", [16, 24])
def test_fp32_indexer_is_full_precision_without_hadamard(index_head_dim):
    ix, rotary = _indexer(seed=3, index_fp8=False, index_head_dim=index_head_dim)
    assert not ix.use_fp8
    x, q_latent = _inputs(seq=20, seed=4)
    cos, sin = rotary(_positions(2, 0, 20))
    sel = ix(x, q_latent, cos, sin, past_len=0, key_valid=None)
    scores = _ref_scores(ix, x, q_latent, cos, sin, fp8=False)
    assert _check_selection(sel, scores, ix.index_topk) == 2 * (20 - 8)


@pytest.mark.parametrize("index_fp8", [True, False])
def test_short_sequence_returns_none_and_fills_cache(index_fp8):
    ix, rotary = _indexer(seed=5, index_fp8=index_fp8)
    x, q_latent = _inputs(seq=6, seed=6)
    cos, sin = rotary(_positions(2, 0, 6))
    cache = DeepseekV32Cache(num_layers=1)
    assert ix(x, q_latent, cos, sin, past_len=0, key_valid=None, cache=cache) is None
    layer = cache.layers[0]
    ref_k, ref_scale = _ref_keys(ix, x, cos, sin, fp8=index_fp8)
    if index_fp8:
        assert layer.index_k.dtype == E4M3 and layer.index_k.shape == (2, 6, 16)
        assert layer.index_k_scale.dtype == torch.float32 and layer.index_k_scale.shape == (2, 6, 1)
        assert torch.equal(layer.index_k_scale, ref_scale)
        # e4m3 values: identical except (at most) a rare rounding-boundary element.
        mismatch = (layer.index_k.float() != ref_k.float()).float().mean().item()
        assert mismatch <= 0.01
        torch.testing.assert_close(layer.index_k.float() * layer.index_k_scale, ref_k.float() * ref_scale,
                                   rtol=0.07, atol=1e-6)  # fmt: skip
    else:
        assert layer.index_k.dtype == torch.float32 and layer.index_k.shape == (2, 6, 16)
        assert layer.index_k_scale is None
        torch.testing.assert_close(layer.index_k, ref_k, rtol=1e-5, atol=1e-5)
    # Exactly index_topk keys still skip scoring; one more does not.
    x2, q2 = _inputs(seq=3, seed=7)
    assert ix(x2[:, :2], q2[:, :2], *rotary(_positions(2, 6, 8)), past_len=6, key_valid=None, cache=cache) is None
    assert cache.layers[0].index_k.shape[1] == 8
    sel = ix(x2[:, 2:], q2[:, 2:], *rotary(_positions(2, 8, 9)), past_len=8, key_valid=None, cache=cache)
    assert isinstance(sel, IndexSelection) and sel.indices.shape == (2, 1, 8)
    assert cache.layers[0].index_k.shape[1] == 9


@pytest.mark.parametrize("index_fp8", [True, False])
def test_left_padding_excludes_padded_keys(index_fp8):
    ix, rotary = _indexer(seed=8, index_fp8=index_fp8)
    x, q_latent = _inputs(seq=20, seed=9)
    pad = 5
    key_valid = torch.ones(2, 20, dtype=torch.bool)
    key_valid[1, :pad] = False
    position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = rotary(position_ids)
    sel = ix(x, q_latent, cos, sin, past_len=0, key_valid=key_valid)
    scores = _ref_scores(ix, x, q_latent, cos, sin, key_valid=key_valid, fp8=index_fp8)
    _check_selection(sel, scores, ix.index_topk)
    picked_valid = sel.indices[1][sel.valid[1]]
    assert picked_valid.numel() > 0 and (picked_valid >= pad).all()
    assert not sel.valid[1, :pad].any()  # padded queries see no real key
    # Without the mask the padded keys would be picked (the test is not vacuous).
    unmasked = ix(x, q_latent, cos, sin, past_len=0, key_valid=None)
    assert (unmasked.indices[1][unmasked.valid[1]] < pad).any()


@pytest.mark.parametrize("index_fp8", [True, False])
def test_decode_with_cache_matches_full_sequence(index_fp8):
    ix, rotary = _indexer(seed=10, index_fp8=index_fp8)
    total = 18
    x, q_latent = _inputs(seq=total, seed=11)
    full = ix(x, q_latent, *rotary(_positions(2, 0, total)), past_len=0, key_valid=None)

    cache = DeepseekV32Cache(num_layers=1)
    chunks = [(0, 5)] + [(i, i + 1) for i in range(5, 13)] + [(13, 16), (16, 17), (17, 18)]
    for start, stop in chunks:
        cos, sin = rotary(_positions(2, start, stop))
        sel = ix(x[:, start:stop], q_latent[:, start:stop], cos, sin, past_len=start, key_valid=None, cache=cache)
        assert cache.layers[0].index_k.shape[1] == stop
        if stop <= ix.index_topk:
            assert sel is None
            continue
        assert sel.indices.shape == (2, stop - start, ix.index_topk)
        for b in range(2):
            for s in range(start, stop):
                got = set(sel.indices[b, s - start][sel.valid[b, s - start]].tolist())
                want = set(full.indices[b, s][full.valid[b, s]].tolist())
                assert got == want, f"query {s}: decode {sorted(got)} != full {sorted(want)}"
                assert max(got) <= s
    # The cached keys equal the keys a single call would cache.
    one_shot = DeepseekV32Cache(num_layers=1)
    ix(x, q_latent, *rotary(_positions(2, 0, total)), past_len=0, key_valid=None, cache=one_shot)
    if index_fp8:
        assert torch.equal(cache.layers[0].index_k_scale, one_shot.layers[0].index_k_scale)
        mismatch = (cache.layers[0].index_k.float() != one_shot.layers[0].index_k.float()).float().mean().item()
        assert mismatch <= 0.01  # at most a rare e4m3 rounding-boundary element
    else:  # fp32 GEMMs of different batch shapes may differ in the last bit
        torch.testing.assert_close(cache.layers[0].index_k, one_shot.layers[0].index_k, rtol=1e-5, atol=1e-6)
    # And the decoded selections match the reference for the last query.
    scores = _ref_scores(ix, x[:, -1:], q_latent[:, -1:], *rotary(_positions(2, total - 1, total)),
                         key_x=x, key_cos=rotary(_positions(2, 0, total))[0],
                         key_sin=rotary(_positions(2, 0, total))[1], past_len=total - 1, fp8=index_fp8)  # fmt: skip
    _check_selection(sel, scores[:, -1:], ix.index_topk)
