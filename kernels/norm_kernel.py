"""RMSNorm in one Triton pass: ``y = (x * rsqrt(mean(x^2) + eps)) * w`` in fp32, rounded once to ``x.dtype``.

The twin, ``DeepseekV32RMSNorm.forward`` (layers.py), runs the same fp32 arithmetic as ~6 separate PyTorch
kernels over the row (upcast, square, mean, rsqrt, two products, downcast); only the order of the squares'
summation differs. Prefill of 8K tokens runs 25 norms of up to 2048 x 8192 values; decode saves the launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, row_sum


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, n_rows, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt_rn(row_sum(x * x) / D + eps)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = (x * inv_rms[:, None]) * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape, last dim contiguous) with ``weight [D]``."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)  # a view for the model's inputs (rows of a wider projection output included)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_d = triton.next_power_of_2(dim)
    # Several rows per program when rows are short, so a program still moves a few KB.
    rows = 1 if interpreting() else max(1, min(16, 4096 // block_d))
    warps = 4 if block_d * rows <= 4096 else 8
    _rms_norm_kernel[(triton.cdiv(x2.shape[0], rows),)](
        x2, weight, out, x2.stride(0), dim, x2.shape[0], dim, float(eps), ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


__all__ = ["rms_norm"]
