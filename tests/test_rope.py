"""RoPE/YaRN frequencies against the formula written out by hand and against transformers' own YaRN; the two pair
layouts against hand-rotated pairs; norm preservation and the relative-position property."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_v32.configuration import DeepseekV32Config, load_preset_dict
from modeling_deepseek_v32.rope import (
    DeepseekV32RotaryEmbedding,
    apply_rope_half_split,
    apply_rope_interleaved,
    yarn_inverse_frequencies,
)


def _hand_yarn(dim, theta, factor, original, beta_fast, beta_slow) -> list[float]:
    """The notes' formula, one frequency at a time, in Python floats (double precision)."""

    def correction(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = min(max(math.floor(correction(beta_fast)), 0), dim - 1)
    high = min(max(math.ceil(correction(beta_slow)), 0), dim - 1)
    out = []
    for i in range(dim // 2):
        base = theta ** (-2 * i / dim)
        ramp = (i - low) / (high - low) if high != low else (1.0 if i >= low else 0.0)
        ramp = min(max(ramp, 0.0), 1.0)
        out.append(base / factor * ramp + base * (1 - ramp))
    return out


def _hand_default(dim, theta) -> list[float]:
    return [theta ** (-2 * i / dim) for i in range(dim // 2)]


@pytest.mark.parametrize("preset", ["official", "tiny", "bench"])
def test_yarn_inverse_frequencies_match_hand_formula(preset):
    config = DeepseekV32Config.from_preset(preset)
    raw = load_preset_dict(preset)["rope_scaling"]
    expected = torch.tensor(
        _hand_yarn(config.qk_rope_head_dim, 10000.0, raw["factor"], raw["original_max_position_embeddings"],
                   raw["beta_fast"], raw["beta_slow"]),
        dtype=torch.float64,
    )  # fmt: skip
    got = yarn_inverse_frequencies(config)
    assert got.dtype == torch.float32
    assert got.shape == (config.qk_rope_head_dim // 2,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    # The frequency table really is scaled: lowest frequency divided by the factor, highest untouched.
    plain = torch.tensor(_hand_default(config.qk_rope_head_dim, 10000.0), dtype=torch.float64)
    assert got[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert got[-1].item() == pytest.approx(plain[-1].item() / raw["factor"], rel=1e-6)


def test_yarn_tiny_ramp_values_by_hand():
    # dim 8, theta 1e4, original 64: low = floor(8 ln(64/(64 pi)) / (2 ln 1e4)) = floor(-0.497) -> 0,
    # high = ceil(8 ln(64/(2 pi)) / (2 ln 1e4)) = ceil(1.008) = 2, so ramp = [0, 0.5, 1, 1].
    config = DeepseekV32Config.from_preset("tiny")
    plain = [10000.0 ** (-2 * i / 8) for i in range(4)]
    ramp = [0.0, 0.5, 1.0, 1.0]
    expected = [f / 4 * r + f * (1 - r) for f, r in zip(plain, ramp)]
    torch.testing.assert_close(yarn_inverse_frequencies(config).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=0)  # fmt: skip


@pytest.mark.parametrize("preset", ["official", "tiny"])
def test_yarn_matches_transformers_rope_init(preset):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v32 import DeepseekV32Config as NativeConfig

    raw = load_preset_dict(preset)
    scaling = {k: v for k, v in raw["rope_scaling"].items() if k != "type"}
    native_kwargs = {
        k: v for k, v in raw.items()
        if k in ("hidden_size", "num_attention_heads", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                 "max_position_embeddings", "num_hidden_layers", "first_k_dense_replace")
    }  # fmt: skip
    native = NativeConfig(
        **native_kwargs, rope_parameters={"rope_type": "yarn", "rope_theta": float(raw["rope_theta"]), **scaling}
    )
    assert native.head_dim == raw["qk_rope_head_dim"]
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](native, torch.device("cpu"))
    ours = yarn_inverse_frequencies(DeepseekV32Config.from_preset(preset))
    assert inv_freq.shape == ours.shape
    torch.testing.assert_close(ours.float(), inv_freq.float(), rtol=1e-5, atol=0)
    # mscale == mscale_all_dim -> transformers puts no extra factor on cos/sin; DeepSeek scales the softmax instead.
    assert attention_factor == pytest.approx(1.0)


@pytest.mark.parametrize("theta, dim", [(10000.0, 8), (500000.0, 64)])
def test_default_rope_is_plain_theta_power(theta, dim):
    config = DeepseekV32Config.from_preset("tiny", rope_scaling=None, rope_theta=theta, qk_rope_head_dim=dim,
                                           index_head_dim=64)  # fmt: skip
    expected = torch.tensor(_hand_default(dim, theta), dtype=torch.float64)
    torch.testing.assert_close(yarn_inverse_frequencies(config).double(), expected, rtol=1e-6, atol=0)


def test_rotary_embedding_cos_sin():
    config = DeepseekV32Config.from_preset("tiny")
    rotary = DeepseekV32RotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 5, 200], [3, 3, 7, 9]])
    cos, sin = rotary(positions)
    assert cos.shape == sin.shape == (2, 4, 4)
    assert cos.dtype == sin.dtype == torch.float32
    freqs = yarn_inverse_frequencies(config).double()
    for b in range(2):
        for s in range(4):
            for i in range(4):
                angle = positions[b, s].item() * freqs[i].item()
                assert cos[b, s, i].item() == pytest.approx(math.cos(angle), abs=2e-5)
                assert sin[b, s, i].item() == pytest.approx(math.sin(angle), abs=2e-5)


# ------------------------------------------------------------------------------------------------------------------
# Pair layouts
# ------------------------------------------------------------------------------------------------------------------
def _angles(seed=0, batch=2, seq=3, half=4):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(batch, seq, half, generator=g) * 6.0 - 3.0
    return theta.cos(), theta.sin()


def _hand_rotate(x, cos, sin, pair_of):
    """x [B, S, H, d]; pair_of(i, d) -> (a, b) indices of the i-th pair; loops over every element."""
    out = torch.empty_like(x, dtype=torch.float64)
    batch, seq, heads, d = x.shape
    for b in range(batch):
        for s in range(seq):
            for h in range(heads):
                for i in range(d // 2):
                    ia, ib = pair_of(i, d)
                    xa, xb = x[b, s, h, ia].item(), x[b, s, h, ib].item()
                    c, sn = cos[b, s, i].item(), sin[b, s, i].item()
                    out[b, s, h, ia] = xa * c - xb * sn
                    out[b, s, h, ib] = xa * sn + xb * c
    return out


def test_interleaved_rotates_adjacent_pairs():
    x = torch.randn(2, 3, 2, 8, generator=torch.Generator().manual_seed(1))
    cos, sin = _angles()
    got = apply_rope_interleaved(x, cos, sin)
    expected = _hand_rotate(x, cos, sin, lambda i, d: (2 * i, 2 * i + 1))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # The other layout gives a different answer (so the test distinguishes them).
    wrong = _hand_rotate(x, cos, sin, lambda i, d: (i, i + d // 2))
    assert (got.double() - wrong).abs().max() > 1e-2


def test_half_split_rotates_i_with_i_plus_half():
    x = torch.randn(2, 3, 2, 8, generator=torch.Generator().manual_seed(2))
    cos, sin = _angles(seed=3)
    got = apply_rope_half_split(x, cos, sin)
    expected = _hand_rotate(x, cos, sin, lambda i, d: (i, i + d // 2))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    wrong = _hand_rotate(x, cos, sin, lambda i, d: (2 * i, 2 * i + 1))
    assert (got.double() - wrong).abs().max() > 1e-2


def test_tiny_hand_example_one_pair():
    # d = 2: both layouts rotate (x0, x1) by the angle.
    x = torch.tensor([[[1.0, 2.0]]])  # [B=1, S=1, d=2]
    cos, sin = torch.tensor([[[0.0]]]), torch.tensor([[[1.0]]])  # 90 degrees
    for fn in (apply_rope_interleaved, apply_rope_half_split):
        torch.testing.assert_close(fn(x, cos, sin), torch.tensor([[[-2.0, 1.0]]]))
    # d = 4, angles (90deg, 0): interleaved rotates (x0,x1), half-split rotates (x0,x2).
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    cos, sin = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
    torch.testing.assert_close(apply_rope_interleaved(x, cos, sin), torch.tensor([[[-2.0, 1.0, 3.0, 4.0]]]))
    torch.testing.assert_close(apply_rope_half_split(x, cos, sin), torch.tensor([[[-3.0, 2.0, 1.0, 4.0]]]))


def test_rope_keeps_dtype_and_shape_without_head_dim():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4))
    cos, sin = _angles()
    for fn in (apply_rope_interleaved, apply_rope_half_split):
        y = fn(x, cos, sin)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("fn", [apply_rope_interleaved, apply_rope_half_split])
def test_rope_preserves_norm(fn):
    x = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(5))
    cos, sin = _angles(seed=6)
    y = fn(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [apply_rope_interleaved, apply_rope_half_split])
@pytest.mark.parametrize("preset", ["tiny", "official"])
def test_rope_relative_position_property(fn, preset):
    config = DeepseekV32Config.from_preset(preset)
    dim = config.qk_rope_head_dim
    rotary = DeepseekV32RotaryEmbedding(config)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, dim, generator=g, dtype=torch.float64).float()
    k = torch.randn(1, 1, dim, generator=g, dtype=torch.float64).float()

    def dot(m, n):
        cq, sq = rotary(torch.tensor([[m]]))
        ck, sk = rotary(torch.tensor([[n]]))
        return (fn(q, cq, sq) * fn(k, ck, sk)).sum().item()

    base = dot(5, 2)
    for shift in (1, 10, 37):
        assert dot(5 + shift, 2 + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
    # ... and it does depend on the difference.
    assert abs(dot(5, 3) - base) > 1e-3
    assert abs(dot(9, 2) - base) > 1e-3
