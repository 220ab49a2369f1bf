"""Grouped MoE experts in Triton: every routed expert of a layer in three launches, without a host sync.

The experts stay separate modules (one ``nn.Linear`` / ``FP8Linear`` per projection, official checkpoint names), so
their weights are not one stacked tensor: the kernels read each expert's matrix through a device table of data
pointers (int64, one entry per expert) and cast the entry to a pointer in the kernel.

Routing is sorted on the device: slots (token, choice) are ordered by expert, and ``tile_end[e]`` (the cumulative
number of BLOCK_M-row tiles of experts ``0..e``) lets each program find its expert and rows with one vector compare.
The grid is sized for the worst case (``cdiv(slots, BLOCK_M) + experts`` row tiles); spare programs return at once,
so the host never needs the per-expert counts.

* ``_gate_up_kernel``: ``h = silu(bf(x @ Wg^T)) * bf(x @ Wu^T)`` for the sorted slots, gathering token rows on load;
  ``bf`` rounds to the activation dtype exactly where the twin's linears return it.
* ``_down_kernel``: ``y = h @ Wd^T`` written at each slot's original position (token-major).
* ``_combine_kernel``: ``out[t] = sum_j w[t, j] * y[t, j]`` in fp32, in a fixed order (deterministic, no atomics).

Block-FP8 weights (128x128 ``weight_scale_inv``) take the same kernels with activations quantized per token and 128
channels (ue8m0, ``fp8_gemm.quantize_activations``) and the scales applied per K block, like ``fp8_block_matmul``.
The twin is ``DeepseekV32MoE.run_experts``'s per-expert loop; results agree up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype_for, interpreting
from .fp8_gemm import quantize_activations


@triton.jit
def _to_act(x, DTYPE: tl.constexpr, FIX_BF16: tl.constexpr):
    """Cast fp32 to the activation dtype; under the interpreter (which truncates fp32 -> bf16) round to nearest
    even on the bits first, so the cast is exact and matches the GPU and PyTorch."""
    if FIX_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _find_tile(TileEnd, SegStart, SegEnd, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Expert and row range of this program's row tile; ``expert == E`` for a spare program."""
    pid_m = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    ends = tl.load(TileEnd + experts, mask=experts < E, other=2147483647)
    expert = tl.reduce((ends <= pid_m).to(tl.int32), 0, tl.standard._sum_combine)
    safe = tl.minimum(expert, E - 1)
    tiles_before = tl.load(TileEnd + safe - 1, mask=safe > 0, other=0)
    row_start = tl.load(SegStart + safe) + (pid_m - tiles_before) * BLOCK_M
    row_end = tl.load(SegEnd + safe)
    return expert, safe, row_start, row_end


@triton.jit
def _gate_up_kernel(
    X, XS, Rows, TileEnd, SegStart, SegEnd, GatePtrs, UpPtrs, GateScalePtrs, UpScalePtrs, H,
    E, N, K, stride_x, stride_xs, stride_h, n_kb_w,
    FP8: tl.constexpr, CDTYPE: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    expert, safe, row_start, row_end = _find_tile(TileEnd, SegStart, SegEnd, E, BLOCK_M, E_POW2)
    if expert < E:
        offs_m = row_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        tokens = tl.load(Rows + offs_m, mask=m_mask, other=0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        w_type = X.dtype.element_ty
        gate_w = tl.load(GatePtrs + safe).to(tl.pointer_type(w_type))
        up_w = tl.load(UpPtrs + safe).to(tl.pointer_type(w_type))
        a_ptrs = X + tokens[:, None] * stride_x + offs_k[None, :]
        w_offs = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        acc_g = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        acc_u = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        if FP8:  # BLOCK_N divides 128: one weight scale row per tile, read as a scalar per K block
            scale_row = (tl.program_id(1) * BLOCK_N // 128) * n_kb_w
            gate_s = tl.load(GateScalePtrs + safe).to(tl.pointer_type(tl.float32)) + scale_row
            up_s = tl.load(UpScalePtrs + safe).to(tl.pointer_type(tl.float32)) + scale_row
        for k0 in range(0, K, BLOCK_K):
            k_mask = ((k0 + offs_k) < K) | EVEN_K  # all-true when the tiles divide K: unmasked, vectorized loads
            a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(CDTYPE)
            wmask = n_mask[:, None] & k_mask[None, :]
            g = tl.load(gate_w + w_offs + k0, mask=wmask, other=0.0).to(CDTYPE)
            u = tl.load(up_w + w_offs + k0, mask=wmask, other=0.0).to(CDTYPE)
            part_g = tl.dot(a, tl.trans(g), input_precision=PRECISION)
            part_u = tl.dot(a, tl.trans(u), input_precision=PRECISION)
            if FP8:  # BLOCK_K == 128: one activation scale per row and one weight scale per column
                kb = k0 // 128
                xs = tl.load(XS + tokens * stride_xs + kb, mask=m_mask, other=0.0)
                # xs is a power of two, so scaling by xs * w_scale rounds exactly like scaling by each in turn
                acc_g += part_g * (xs * tl.load(gate_s + kb))[:, None]
                acc_u += part_u * (xs * tl.load(up_s + kb))[:, None]
            else:
                acc_g += part_g
                acc_u += part_u
        # The twin's linears return the activation dtype; round there before the fp32 SwiGLU.
        g = _to_act(acc_g, H.dtype.element_ty, FIX_BF16).to(tl.float32)
        u = _to_act(acc_u, H.dtype.element_ty, FIX_BF16).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u
        h_ptrs = H + offs_m[:, None].to(tl.int64) * stride_h + offs_n[None, :]
        tl.store(h_ptrs, _to_act(h, H.dtype.element_ty, FIX_BF16), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    A, AS, Slots, TileEnd, SegStart, SegEnd, DownPtrs, DownScalePtrs, Y,
    E, N, K, stride_a, stride_as, stride_y, n_kb_w,
    FP8: tl.constexpr, CDTYPE: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    expert, safe, row_start, row_end = _find_tile(TileEnd, SegStart, SegEnd, E, BLOCK_M, E_POW2)
    if expert < E:
        offs_m = row_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rows = offs_m.to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        w = tl.load(DownPtrs + safe).to(tl.pointer_type(A.dtype.element_ty))
        a_ptrs = A + rows[:, None] * stride_a + offs_k[None, :]
        w_ptrs = w + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        if FP8:  # BLOCK_N divides 128, as in _gate_up_kernel
            w_s = tl.load(DownScalePtrs + safe).to(tl.pointer_type(tl.float32)) + (tl.program_id(1) * BLOCK_N // 128) * n_kb_w
        for k0 in range(0, K, BLOCK_K):
            k_mask = ((k0 + offs_k) < K) | EVEN_K  # all-true when the tiles divide K: unmasked, vectorized loads
            a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(CDTYPE)
            b = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(CDTYPE)
            part = tl.dot(a, tl.trans(b), input_precision=PRECISION)
            if FP8:
                kb = k0 // 128
                xs = tl.load(AS + rows * stride_as + kb, mask=m_mask, other=0.0)
                acc += part * (xs * tl.load(w_s + kb))[:, None]
            else:
                acc += part
        slots = tl.load(Slots + offs_m, mask=m_mask, other=0).to(tl.int64)
        y_ptrs = Y + slots[:, None] * stride_y + offs_n[None, :]
        tl.store(y_ptrs, _to_act(acc, Y.dtype.element_ty, FIX_BF16), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(Y, W, Out, T, N, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    t64 = offs_t.to(tl.int64)
    acc = tl.full([BLOCK_T, BLOCK_N], 0.0, tl.float32)
    for j in range(TOP_K):
        w = tl.load(W + t64 * TOP_K + j, mask=offs_t < T, other=0.0)
        y = tl.load(Y + (t64 * TOP_K + j)[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += y * w[:, None]
    tl.store(Out + t64[:, None] * N + offs_n[None, :], acc, mask=mask)


def _config(slots: int, n_experts: int, fp8: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N gate/up, BLOCK_N down, num_warps, num_stages) by slots per expert."""
    if interpreting():
        return 16, 32, 32, 4, 1
    per_expert = slots / max(1, n_experts)
    if per_expert <= 16:  # decode: weight-bandwidth bound, small row tiles, many column tiles
        return 16, 64, 64, 4, 4
    if per_expert <= 64:
        return 64, 64, 128, 4, 3
    # Measured at 8K tokens on an H100 (bench_kernels.py --only moe --sweep): 128-wide gate/up tiles win for bf16
    # (5.2 vs 5.7 ms per layer), 64-wide for FP8 (5.9 vs 6.2 ms).
    return 128, 64 if fp8 else 128, 128, 8, 3


def grouped_experts(
    tokens: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    tables: dict,
    intermediate: int,
    fp8: bool,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{experts[t, j]}(tokens[t])`` in fp32 ``[T, hidden]``.

    ``tables``: int64 device tensors of data pointers, ``gate``, ``up``, ``down`` (and ``gate_scale``,
    ``up_scale``, ``down_scale`` for FP8), one entry per expert; every expert's matrices are contiguous and of one
    shape: gate/up ``[intermediate, hidden]``, down ``[hidden, intermediate]``.
    """
    n_tokens, hidden = tokens.shape
    top_k = experts.shape[1]
    n_experts = tables["gate"].shape[0]
    device = tokens.device
    out = torch.empty(n_tokens, hidden, dtype=torch.float32, device=device)
    if n_tokens == 0:
        return out
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    slots = n_tokens * top_k
    block_m, block_n_gu, block_n_down, warps, stages = config or _config(slots, n_experts, fp8)
    block_k = 128 if fp8 else (32 if interpreting() else 64)
    if fp8 and (128 % block_n_gu or 128 % block_n_down):
        raise ValueError(f"FP8 experts need column tiles that divide 128 (one weight scale each), got {block_n_gu}/{block_n_down}")

    # Sort slots by expert on the device (stable: rows of one expert keep token order).
    sorted_experts, order = experts.reshape(-1).sort(stable=True)
    bounds = torch.searchsorted(sorted_experts, torch.arange(n_experts + 1, device=device, dtype=sorted_experts.dtype))
    seg_start, seg_end = bounds[:-1], bounds[1:]
    tile_end = torch.div(seg_end - seg_start + (block_m - 1), block_m, rounding_mode="floor").cumsum(0)
    token_rows = torch.div(order, top_k, rounding_mode="floor")
    row_tiles = triton.cdiv(slots, block_m) + min(n_experts, slots)
    e_pow2 = triton.next_power_of_2(n_experts)
    cdtype, precision = compute_dtype_for(tokens.dtype)
    fix_bf16 = interpreting() and tokens.dtype == torch.bfloat16
    if fp8 and not interpreting():
        cdtype, precision = tl.float8e4nv, None  # FP8 tensor cores (the interpreter multiplies in fp32)

    if fp8:
        x, xs = quantize_activations(tokens)
    else:
        x, xs = tokens, tokens
    h = torch.empty(slots, intermediate, dtype=tokens.dtype, device=device)
    n_kb_gu = triton.cdiv(hidden, 128)
    _gate_up_kernel[(row_tiles, triton.cdiv(intermediate, block_n_gu))](
        x, xs, token_rows, tile_end, seg_start, seg_end, tables["gate"], tables["up"],
        tables.get("gate_scale", tables["gate"]), tables.get("up_scale", tables["up"]), h,
        n_experts, intermediate, hidden, x.stride(0), xs.stride(0) if fp8 else 0, h.stride(0), n_kb_gu,
        FP8=fp8, CDTYPE=cdtype, PRECISION=precision, FIX_BF16=fix_bf16,
        BLOCK_M=block_m, BLOCK_N=block_n_gu, BLOCK_K=block_k, E_POW2=e_pow2,
        EVEN_K=hidden % block_k == 0, num_warps=warps, num_stages=stages,
    )  # fmt: skip

    if fp8:
        a, a_s = quantize_activations(h)
    else:
        a, a_s = h, h
    y = torch.empty(slots, hidden, dtype=tokens.dtype, device=device)
    _down_kernel[(row_tiles, triton.cdiv(hidden, block_n_down))](
        a, a_s, order, tile_end, seg_start, seg_end, tables["down"], tables.get("down_scale", tables["down"]), y,
        n_experts, hidden, intermediate, a.stride(0), a_s.stride(0) if fp8 else 0, y.stride(0),
        triton.cdiv(intermediate, 128),
        FP8=fp8, CDTYPE=cdtype, PRECISION=precision, FIX_BF16=fix_bf16,
        BLOCK_M=block_m, BLOCK_N=block_n_down, BLOCK_K=block_k, E_POW2=e_pow2,
        EVEN_K=intermediate % block_k == 0, num_warps=warps, num_stages=stages,
    )  # fmt: skip

    block_t = 4 if n_tokens <= 4 else 16
    _combine_kernel[(triton.cdiv(n_tokens, block_t), triton.cdiv(hidden, 256))](
        y, weights.float().contiguous(), out, n_tokens, hidden, TOP_K=top_k, BLOCK_T=block_t, BLOCK_N=256,
    )  # fmt: skip
    return out


__all__ = ["grouped_experts"]
