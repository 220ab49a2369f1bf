"""Block-FP8 (e4m3) primitives in plain PyTorch.

These are the reference ("oracle") implementations of DeepSeek's FP8 scheme: 128x128 weight blocks with a float32
``weight_scale_inv`` per block, activations quantized dynamically per token per 128 channels with power-of-two
(ue8m0) scales, and GEMMs accumulated in fp32. FP8 is emulated with ``torch.float8_e4m3fn`` casts, so everything
runs on CPU and on any GPU; fused kernels are expected to match these functions up to fp32 summation order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import kernels as _kernels

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn

# Floor on a block's amax, so all-zero (or tiny) blocks still get a finite, non-zero scale.
_AMAX_FLOOR = 1e-4
# Budget for the temporary fp32 copy of a slice of the weight inside fp8_block_matmul.
_WEIGHT_CHUNK_BYTES = 64 * 1024 * 1024


def ue8m0_scale(amax: Tensor) -> Tensor:
    """Power-of-two scale ``2**ceil(log2(max(amax, 1e-4) / 448))`` in fp32."""
    ratio = amax.float().clamp_min(_AMAX_FLOOR) / FP8_E4M3_MAX
    # frexp gives ratio = m * 2**e with m in [0.5, 1); this avoids log2 rounding at exact powers of two.
    mantissa, exponent = torch.frexp(ratio)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.exp2(exponent.float())


def _scale_from_amax(amax: Tensor, scale_fmt: str) -> Tensor:
    if scale_fmt == "ue8m0":
        return ue8m0_scale(amax)
    if scale_fmt == "float":
        return amax.float().clamp_min(_AMAX_FLOOR) / FP8_E4M3_MAX
    raise ValueError(f"scale_fmt must be 'ue8m0' or 'float', got {scale_fmt!r}")


def _to_fp8(x: Tensor, scale: Tensor) -> Tensor:
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def quantize_blockwise_1d(x: Tensor, block_size: int = 128, scale_fmt: str = "ue8m0") -> tuple[Tensor, Tensor]:
    """Quantize the last dim in contiguous blocks (last one may be partial); returns (fp8 values, fp32 scales)."""
    k = x.shape[-1]
    n_blocks = math.ceil(k / block_size)
    xf = x.float()
    # Zero padding cannot change a block's amax, so the ragged tail is quantized like a full block.
    pad = n_blocks * block_size - k
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xb = xf.reshape(*x.shape[:-1], n_blocks, block_size)
    scales = _scale_from_amax(xb.abs().amax(dim=-1), scale_fmt)
    q = _to_fp8(xb, scales.unsqueeze(-1)).reshape(*x.shape[:-1], n_blocks * block_size)
    return q[..., :k].contiguous(), scales


def dequantize_blockwise_1d(
    x_fp8: Tensor, scales: Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> Tensor:
    k = x_fp8.shape[-1]
    s = scales.float().repeat_interleave(block_size, dim=-1)[..., :k]
    return (x_fp8.float() * s).to(dtype)


def _expand_weight_scale(scale_inv: Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> Tensor:
    rows, cols = shape
    s = scale_inv.float().repeat_interleave(block_size[0], dim=0)[:rows]
    return s.repeat_interleave(block_size[1], dim=1)[:, :cols]


def _check_fp8_weight(w_fp8: Tensor, scale_inv: Tensor, block_size: tuple[int, int], name: str | None) -> None:
    label = name if name is not None else "<unnamed weight>"
    if w_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"{label}: expected a {FP8_DTYPE} weight, got {w_fp8.dtype}")
    if w_fp8.dim() != 2:
        raise ValueError(f"{label}: expected a 2-D weight, got shape {tuple(w_fp8.shape)}")
    expected = (math.ceil(w_fp8.shape[0] / block_size[0]), math.ceil(w_fp8.shape[1] / block_size[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{label}: weight_scale_inv has shape {tuple(scale_inv.shape)} but weight shape {tuple(w_fp8.shape)} "
            f"with block size {tuple(block_size)} needs {expected}"
        )


def quantize_weight_blockwise(
    w: Tensor, block_size: tuple[int, int] = (128, 128), scale_fmt: str = "ue8m0"
) -> tuple[Tensor, Tensor]:
    """Quantize a 2-D [out, in] weight per (b0 x b1) block; returns (fp8 weight, fp32 weight_scale_inv)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    b0, b1 = block_size
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    wf = torch.nn.functional.pad(w.float(), (0, nc * b1 - cols, 0, nr * b0 - rows))
    wb = wf.reshape(nr, b0, nc, b1)
    scale_inv = _scale_from_amax(wb.abs().amax(dim=(1, 3)), scale_fmt)
    q = _to_fp8(wb, scale_inv[:, None, :, None]).reshape(nr * b0, nc * b1)
    return q[:rows, :cols].contiguous(), scale_inv


def dequantize_weight_blockwise(
    w_fp8: Tensor,
    scale_inv: Tensor,
    block_size: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
    name: str | None = None,
) -> Tensor:
    """Dense weight = fp8 value x scale of its block; ``name`` is only used in error messages."""
    _check_fp8_weight(w_fp8, scale_inv, block_size, name)
    return (w_fp8.float() * _expand_weight_scale(scale_inv, tuple(w_fp8.shape), block_size)).to(dtype)


def _row_chunk(k: int, b0: int) -> int:
    # Whole scale-block rows per chunk so each chunk's scales are a contiguous slice of the grid.
    return max(b0, (_WEIGHT_CHUNK_BYTES // (4 * max(k, 1))) // b0 * b0)


def _dequant_rows(w_fp8: Tensor, scale_inv: Tensor, start: int, stop: int, b0: int, b1: int) -> Tensor:
    s = scale_inv[start // b0 : math.ceil(stop / b0)]
    return w_fp8[start:stop].float() * _expand_weight_scale(s, (stop - start, w_fp8.shape[1]), (b0, b1))


class _FP8BlockMatmul(torch.autograd.Function):
    """y = Q(x) @ W^T with W block-FP8 and Q the dynamic per-token 1x128 ue8m0 quantizer.

    DeepSeek's runtime has no backward for this. Ours is the gradient of the dense product x @ W_dequant^T,
    i.e. grad_x = grad_y @ W_dequant in fp32, ignoring the rounding of x (which has zero derivative almost
    everywhere and would otherwise kill the gradient). The weight is frozen: only x and the bias get
    gradients, which is what LoRA adapters on top of an FP8 base need.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_fp8: Tensor, scale_inv: Tensor, bias: Tensor | None, block_size: tuple[int, int]):
        b0, b1 = block_size
        n, k = w_fp8.shape
        x2 = x.reshape(-1, k)
        # Scales are powers of two, so dequantizing to fp32 is exact and the fp32 GEMM below equals the
        # per-K-block sum of (x_fp8 @ w_fp8^T) * act_scale * weight_scale up to summation order.
        xq, xs = quantize_blockwise_1d(x2, b1, "ue8m0")
        xd = dequantize_blockwise_1d(xq, xs, b1, torch.float32)
        y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x.device)
        step = _row_chunk(k, b0)
        for start in range(0, n, step):
            stop = min(start + step, n)
            y[:, start:stop] = xd @ _dequant_rows(w_fp8, scale_inv, start, stop, b0, b1).t()
        if bias is not None:
            y += bias.float()
        ctx.save_for_backward(w_fp8, scale_inv)
        ctx.block_size = block_size
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        w_fp8, scale_inv = ctx.saved_tensors
        b0, b1 = ctx.block_size
        n, k = w_fp8.shape
        g = grad_y.reshape(-1, n).float()
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(g.shape[0], k, dtype=torch.float32, device=g.device)
            step = _row_chunk(k, b0)
            for start in range(0, n, step):
                stop = min(start + step, n)
                grad_x.addmm_(g[:, start:stop], _dequant_rows(w_fp8, scale_inv, start, stop, b0, b1))
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None


def fp8_block_matmul(
    x: Tensor,
    w_fp8: Tensor,
    weight_scale_inv: Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: Tensor | None = None,
) -> Tensor:
    """DeepSeek's w8a8 linear: ``x[..., in] -> [..., out]`` in ``x.dtype``, fp32 accumulation."""
    block_size = tuple(block_size)
    _check_fp8_weight(w_fp8, weight_scale_inv, block_size, None)
    if x.shape[-1] != w_fp8.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {w_fp8.shape[1]}")
    fused = _kernels.fp8_linear(x, w_fp8, weight_scale_inv, bias, block_size)
    if fused is not None:
        return fused
    return _FP8BlockMatmul.apply(x, w_fp8, weight_scale_inv, bias, block_size)


class FP8Linear(nn.Module):
    """Linear layer holding a block-FP8 weight and its ``weight_scale_inv`` (checkpoint names)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size: tuple[int, int] = (128, 128),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = tuple(block_size)
        grid = (math.ceil(out_features / self.block_size[0]), math.ceil(in_features / self.block_size[1]))
        # torch.empty so construction on the meta device is free; real values arrive via load_state_dict.
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=FP8_DTYPE), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(torch.empty(grid, device=device, dtype=torch.float32), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype)/.half() cast every floating tensor, fp8 included, which would silently turn the
        # checkpoint into a dense copy and round the fp32 scales. Presenting both as integer views keeps
        # them byte-exact while device moves and to_empty still apply.
        keep = {id(self.weight): torch.uint8, id(self.weight_scale_inv): torch.int32}

        def wrapped(t: Tensor) -> Tensor:
            as_int = keep.get(id(t))
            return fn(t) if as_int is None else fn(t.view(as_int)).view(t.dtype)

        return super()._apply(wrapped, recurse)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_block_matmul(x, self.weight, self.weight_scale_inv, self.block_size, self.bias)

    def dequantize_weight(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        return dequantize_weight_blockwise(self.weight, self.weight_scale_inv, self.block_size, dtype)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scale_fmt: str = "ue8m0", block_size: tuple[int, int] = (128, 128)
    ) -> FP8Linear:
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, w.device, w.dtype)
        q, s = quantize_weight_blockwise(w, block_size, scale_fmt)
        with torch.no_grad():
            module.weight.copy_(q)
            module.weight_scale_inv.copy_(s)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}"
        )
