"""Block-FP8 (e4m3) w8a8 linear in Triton: dynamic 1x128 activation quantization + GEMM with 128x128 weight scales.

``y = sum_kb (x_fp8[:, kb] @ w_fp8[:, kb]^T) * x_scale[:, kb] * w_scale[nb, kb] (+ bias)``, accumulated in fp32 and
returned in ``x.dtype``: DeepSeek's FP8 linear. The activation scales are ue8m0 (powers of two, the smallest one with
``amax / scale <= 448``, amax floored at 1e-4) exactly like ``quantize_blockwise_1d(..., "ue8m0")``. The twin is
``fp8_block_matmul`` in ``modeling_deepseek_v32/fp8.py``; both compute the same products, so they agree up to fp32
summation order (and the FP8 tensor cores' accumulation inside one 128-wide K block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, row_max

FP8_MAX = 448.0
_AMAX_FLOOR = 1e-4


@triton.jit
def _quantize_act_kernel(X, XQ, XS, M, K, stride_xm, n_kb, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
                         EXACT_ROUND: tl.constexpr):
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(row_max(tl.abs(x)), 1e-4)
    ratio = amax / 448.0
    bits = ratio.to(tl.int32, bitcast=True)
    exp_bits = bits & 0x7F800000
    scale_bits = tl.where((bits & 0x007FFFFF) == 0, exp_bits, exp_bits + 0x00800000)
    scale = scale_bits.to(tl.float32, bitcast=True)
    q = tl.clamp(x / scale[:, None], -448.0, 448.0)
    if EXACT_ROUND:
        # Round to the e4m3 grid in fp32 first (round-half-even through the 1.5 * 2^23 trick; powers of two are
        # exact), so the cast below is exact: Triton's interpreter casts fp32 -> e4m3 without carrying into the
        # exponent. The GPU's own cast rounds the same way and skips this.
        e = ((q.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step_exp = tl.maximum(e, -6) - 3
        step = ((step_exp + 127) << 23).to(tl.float32, bitcast=True)
        y = q / step
        y = (y + 12582912.0) - 12582912.0
        q = y * step
    tl.store(XQ + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(XQ.dtype.element_ty), mask=mask)
    tl.store(XS + rows.to(tl.int64) * n_kb + kb, scale, mask=rows < M)


@triton.jit
def _fp8_gemm_kernel(
    XQ, XS, W, WS, BIAS, Y,
    M, N, K, n_kb,
    stride_wn, stride_wsn, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = XQ + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    ws_ptr = WS + ((pid_n * BLOCK_N) // 128) * stride_wsn
    xs_ptrs = XS + offs_m.to(tl.int64) * n_kb
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for kb in range(0, n_kb):
        k_mask = (kb * BLOCK_K + offs_k) < K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            part = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(a, tl.trans(b))
        xs = tl.load(xs_ptrs + kb, mask=m_mask, other=0.0)
        ws = tl.load(ws_ptr + kb)
        acc += part * (xs * ws)[:, None]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quantize_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 [M, K]`` -> (e4m3 ``[M, K]``, fp32 ue8m0 scales ``[M, ceil(K/128)]``), like ``quantize_blockwise_1d``."""
    m, k = x2.shape
    n_kb = triton.cdiv(k, 128)
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x2.device)
    xs = torch.empty(m, n_kb, dtype=torch.float32, device=x2.device)
    rows = 4 if interpreting() else 8
    _quantize_act_kernel[(triton.cdiv(m, rows), n_kb)](x2, xq, xs, m, k, x2.stride(0), n_kb, BLOCK_K=128, ROWS=rows,
                                                        EXACT_ROUND=interpreting(), num_warps=4)  # fmt: skip
    return xq, xs


def _config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by number of tokens."""
    if interpreting():
        return 16, 128, 4, 1
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    if m <= 256:
        return 64, 128, 4, 4
    return 128, 128, 8, 3


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
               config: tuple[int, int, int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """``x [..., K]`` (bf16/fp16/fp32) times the block-FP8 weight ``w_fp8 [N, K]`` with ``scale_inv
    [ceil(N/128), ceil(K/128)]``; returns ``[..., N]`` in ``x.dtype``."""
    n, k = w_fp8.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    xq, xs = quantize_activations(x2)
    if w_fp8.stride(-1) != 1:
        w_fp8 = w_fp8.contiguous()
    scale_inv = scale_inv.float()
    block_m, block_n, warps, stages = config or _config(m)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        xq, xs, w_fp8, scale_inv, bias if bias is not None else y, y,
        m, n, k, triton.cdiv(k, 128),
        w_fp8.stride(0), scale_inv.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8,
        UPCAST=interpreting(), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


__all__ = ["fp8_linear", "quantize_activations"]
