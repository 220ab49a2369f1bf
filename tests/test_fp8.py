import math

import pytest
import torch
from torch import nn

from modeling_deepseek_v32 import fp8
from modeling_deepseek_v32.fp8 import (
    FP8_DTYPE,
    FP8_E4M3_MAX,
    FP8Linear,
    dequantize_blockwise_1d,
    dequantize_weight_blockwise,
    fp8_block_matmul,
    quantize_blockwise_1d,
    quantize_weight_blockwise,
    ue8m0_scale,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "amax, expected",
    [
        (448.0, 1.0),
        (449.0, 2.0),
        (224.0, 0.5),
        (224.5, 1.0),
        (896.0, 2.0),
        (897.0, 4.0),
        (1.0, 2.0**-8),  # 1/448 = 2**-8.81
        (0.0, 2.0 ** math.ceil(math.log2(1e-4 / 448))),
        (1e-9, 2.0**-22),
    ],
)
def test_ue8m0_scale_hand_cases(amax, expected):
    s = ue8m0_scale(torch.tensor([amax]))
    assert s.dtype == torch.float32
    assert s.item() == expected


def test_ue8m0_scale_is_smallest_power_of_two_that_fits():
    amax = torch.rand(10_000, generator=_gen()) * 1e4 + 1e-3
    s = ue8m0_scale(amax).double()
    assert torch.all(torch.log2(s) == torch.round(torch.log2(s)))
    assert torch.all(amax.double() / s <= FP8_E4M3_MAX)
    assert torch.all(amax.double() / (s / 2) > FP8_E4M3_MAX)


def test_activation_roundtrip_within_e4m3_error():
    x = torch.randn(4, 7, 300, generator=_gen(1)) * torch.logspace(-3, 3, 300)
    q, s = quantize_blockwise_1d(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.shape == (4, 7, 3) and s.dtype == torch.float32
    xd = dequantize_blockwise_1d(q, s)
    s_full = s.repeat_interleave(128, dim=-1)[..., :300]
    # Normal e4m3: 3 mantissa bits -> relative error <= 2**-4; subnormal step is 2**-9, so half of it absolute.
    bound = 2.0**-4 * x.abs() + 2.0**-10 * s_full
    assert torch.all((xd - x).abs() <= bound)
    # The block's amax lands in the top binade of e4m3 (otherwise the scale was not the smallest).
    qmax = q.float().abs().reshape(4, 7, -1)
    for b in range(3):
        blk = qmax[..., b * 128 : (b + 1) * 128].amax(-1)
        assert torch.all(blk >= 224) and torch.all(blk <= 448)  # amax/s in (224, 448], may round to 224


def test_activation_ragged_block_and_scale_of_zero_block():
    x = torch.zeros(2, 130)
    x[0, 129] = 3.0
    q, s = quantize_blockwise_1d(x)
    assert s.shape == (2, 2)
    floor_scale = 2.0 ** math.ceil(math.log2(1e-4 / 448))
    assert s[1].tolist() == [floor_scale, floor_scale]
    assert s[0, 1].item() == 2.0**-7  # 3/448 = 2**-7.2
    assert q[0, 129].float().item() == 384.0  # 3 / 2**-7 = 384, representable exactly


def test_float_scale_fmt_maps_amax_to_448():
    x = torch.randn(3, 256, generator=_gen(2))
    q, s = quantize_blockwise_1d(x, scale_fmt="float")
    amax = x.reshape(3, 2, 128).abs().amax(-1)
    torch.testing.assert_close(s, amax / 448)
    assert torch.all(q.float().abs().reshape(3, 2, 128).amax(-1) == 448)
    with pytest.raises(ValueError):
        quantize_blockwise_1d(x, scale_fmt="e8m0")


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_ragged_weight_roundtrip_bit_exact(scale_fmt):
    w = torch.randn(576, 200, generator=_gen(3)) * 0.02
    w[300:, 150:] *= 100  # different blocks get different scales
    q, s = quantize_weight_blockwise(w, scale_fmt=scale_fmt)
    assert q.dtype == FP8_DTYPE and q.shape == (576, 200)
    assert s.shape == (5, 2) and s.dtype == torch.float32
    assert len(torch.unique(s)) > 1
    wd = dequantize_weight_blockwise(q, s, dtype=torch.float32)
    s_full = s.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :200]
    requant = (wd / s_full).clamp(-448, 448).to(FP8_DTYPE)
    assert torch.equal(requant.view(torch.uint8), q.view(torch.uint8))
    if scale_fmt == "ue8m0":
        # Power-of-two scales make dequant exact even in bf16, and requantizing recovers the same scales.
        wd16 = dequantize_weight_blockwise(q, s)
        assert wd16.dtype == torch.bfloat16
        assert torch.equal(wd16.float(), wd)
        q2, s2 = quantize_weight_blockwise(wd16)
        assert torch.equal(s2, s)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_weight_dequant_uses_block_scale():
    q = torch.ones(200, 130).to(FP8_DTYPE)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    wd = dequantize_weight_blockwise(q, s, dtype=torch.float32)
    assert wd[0, 0] == 1 and wd[127, 127] == 1 and wd[0, 128] == 2 and wd[0, 129] == 2
    assert wd[128, 0] == 3 and wd[199, 127] == 3 and wd[128, 128] == 4 and wd[199, 129] == 4


def test_misshaped_scale_raises_with_name():
    q, s = quantize_weight_blockwise(torch.randn(576, 200, generator=_gen(4)))
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa") as exc:
        dequantize_weight_blockwise(q, s[:4], name=name)
    msg = str(exc.value)
    assert "(4, 2)" in msg and "(576, 200)" in msg and "(5, 2)" in msg
    with pytest.raises(ValueError):
        fp8_block_matmul(torch.randn(3, 200), q, s.t().contiguous())


def test_non_fp8_weight_raises():
    w = torch.randn(256, 128)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_weight_blockwise(w, torch.ones(2, 1), name="w")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_block_matmul(torch.randn(2, 128), w, torch.ones(2, 1))


def _hand_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Independent re-derivation: per-token per-128 ue8m0 activation quantization, fp32 sum over K blocks."""
    m, k = x.shape
    n = q.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float32)
    w_row_scale = s.repeat_interleave(128, 0)[:n]  # [n, n_kblocks]
    for kb in range(math.ceil(k / 128)):
        lo, hi = kb * 128, min(k, (kb + 1) * 128)
        xb = x[:, lo:hi].float()
        sx = torch.tensor(
            [2.0 ** math.ceil(math.log2(max(xb[i].abs().max().item(), 1e-4) / 448)) for i in range(m)]
        )
        xq = (xb / sx[:, None]).clamp(-448, 448).to(FP8_DTYPE)
        acc += (xq.float() @ q[:, lo:hi].float().t()) * sx[:, None] * w_row_scale[:, kb][None, :]
    return acc


def test_fp8_block_matmul_matches_hand_derivation_and_full_precision():
    x = torch.randn(9, 300, generator=_gen(5))
    x[3] *= 1e-3  # rows with very different scales
    w = torch.randn(200, 300, generator=_gen(6)) * 0.05
    q, s = quantize_weight_blockwise(w)
    y = fp8_block_matmul(x, q, s)
    assert y.shape == (9, 200) and y.dtype == torch.float32
    ref = _hand_matmul(x, q, s)
    assert _rel(y, ref) < 1e-6
    for i in range(9):  # per row too, so the tiny row is checked on its own scale
        assert _rel(y[i], ref[i]) < 1e-6
    exact = x.double() @ w.double().t()
    err = _rel(y, exact)
    assert 1e-4 < err < 0.06  # FP8 error is visible but small


def test_fp8_block_matmul_chunked_equals_unchunked(monkeypatch):
    x = torch.randn(2, 5, 260, generator=_gen(7))
    q, s = quantize_weight_blockwise(torch.randn(600, 260, generator=_gen(8)))
    bias = torch.randn(600, generator=_gen(9))
    y_one = fp8_block_matmul(x, q, s, bias=bias)
    monkeypatch.setattr(fp8, "_WEIGHT_CHUNK_BYTES", 1)  # forces 128-row chunks: 5 chunks, ragged last
    y_many = fp8_block_matmul(x, q, s, bias=bias)
    assert y_one.shape == (2, 5, 600)
    torch.testing.assert_close(y_many, y_one, rtol=1e-6, atol=1e-6)
    ref = _hand_matmul(x.reshape(10, 260), q, s) + bias
    assert _rel(y_many.reshape(10, 600), ref) < 1e-6
    xg = x.clone().requires_grad_()
    g = torch.randn(2, 5, 600, generator=_gen(15))
    fp8_block_matmul(xg, q, s).backward(g)
    wd = dequantize_weight_blockwise(q, s, dtype=torch.float32)
    # Summed over 600 outputs in a different order (chunks vs one GEMM): compare norms, not elements at 1e-5.
    assert _rel(xg.grad, g @ wd) < 1e-6


def test_fp8linear_meta_construction():
    m = FP8Linear(200, 576, bias=True, device="meta", dtype=torch.bfloat16)
    assert m.weight.device.type == "meta" and m.weight.dtype == FP8_DTYPE
    assert m.weight.shape == (576, 200) and not m.weight.requires_grad
    assert m.weight_scale_inv.shape == (5, 2) and m.weight_scale_inv.dtype == torch.float32
    assert not m.weight_scale_inv.requires_grad
    assert m.bias.dtype == torch.bfloat16
    assert set(dict(m.named_parameters())) == {"weight", "weight_scale_inv", "bias"}
    assert "block_size=(128, 128)" in repr(m)
    # The transformers path: materialise, then load checkpoint tensors.
    src = FP8Linear.from_linear(nn.Linear(200, 576, bias=True))
    m = m.to_empty(device="cpu")
    assert m.weight.dtype == FP8_DTYPE and m.weight_scale_inv.dtype == torch.float32
    m.load_state_dict(src.state_dict())
    x = torch.randn(3, 200, generator=_gen(10))
    ref = fp8_block_matmul(x, src.weight, src.weight_scale_inv, bias=src.bias.bfloat16())
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()])
def test_fp8linear_dtype_casts_keep_weight_and_scales(cast):
    src = FP8Linear.from_linear(nn.Linear(200, 300, bias=True), scale_fmt="float")
    w8, s = src.weight.clone(), src.weight_scale_inv.clone()
    m = cast(src)
    assert m.weight.dtype == FP8_DTYPE and m.weight_scale_inv.dtype == torch.float32
    assert isinstance(m.weight, nn.Parameter) and not m.weight.requires_grad
    assert torch.equal(m.weight.view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(m.weight_scale_inv, s)  # "float" scales would not survive a bf16 round trip
    assert m.bias.dtype != FP8_DTYPE and m.bias.dtype.is_floating_point


def test_fp8linear_from_linear_close_to_linear():
    torch.manual_seed(0)
    lin = nn.Linear(384, 576, bias=True)
    x = torch.randn(4, 6, 384, generator=_gen(11))
    for fmt in ("ue8m0", "float"):
        m = FP8Linear.from_linear(lin, scale_fmt=fmt)
        y = m(x)
        assert y.shape == (4, 6, 576)
        assert _rel(y, lin(x).detach()) < 0.06
        torch.testing.assert_close(m.dequantize_weight(torch.float32), lin.weight.detach(), rtol=0.07, atol=1e-4)


def test_gradient_wrt_input_matches_dequantized_weight():
    torch.manual_seed(0)
    m = FP8Linear.from_linear(nn.Linear(260, 300, bias=True))
    x = torch.randn(2, 3, 260, generator=_gen(12), requires_grad=True)
    g = torch.randn(2, 3, 300, generator=_gen(13))
    m(x).backward(g)
    assert x.grad is not None and x.grad.shape == x.shape
    wd = m.dequantize_weight(torch.float32)
    torch.testing.assert_close(x.grad, g @ wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, g.reshape(-1, 300).sum(0))
    assert m.weight.grad is None and m.weight_scale_inv.grad is None


def test_bf16_input_gives_bf16_output_and_grad():
    torch.manual_seed(0)
    m = FP8Linear.from_linear(nn.Linear(256, 128))
    x = torch.randn(5, 256, generator=_gen(14)).bfloat16().requires_grad_()
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = fp8_block_matmul(x.detach().float(), m.weight, m.weight_scale_inv, bias=m.bias)
    torch.testing.assert_close(y, ref.bfloat16(), rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
