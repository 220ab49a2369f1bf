"""Prefill MLA attention in expanded form over a bitmap of selected tokens, in Triton.

At prefill the queries of a sequence select overlapping token sets, and while the sequence is short enough the
cheapest way to attend to them is not to gather each query's rows (``mla_kernel.py``: 16 heads x 1088 latent dims
per selected token, bound by the gather) but a flash-attention pass over every causal key with the selection as a
mask: the keys are expanded per head once (``kv_b_proj``), 192 score + 128 value dims per head, a third of the
absorbed FLOPs, read as contiguous tiles on the tensor cores. Per query ``(b, s)`` and head ``h``::

    score_t = (q_nope[b, s, h] . k_nope[b, t, h] + q_rope[b, s, h] . k_rope[b, t]) * scale
    out[b, s, h] = sum_t softmax(score)_t * v[b, t, h]         over t selected (bit t of mask_words[b, s])

Without a bitmap every causal key ``t <= past_len + s`` (and ``key_valid``) is selected: the model's dense regime
(``T <= index_topk``). A query with no selected token gets zeros. The plain-PyTorch twin is
``DeepseekV32Attention._expanded`` / ``_attend`` in ``modeling_deepseek_v32/attention.py`` (gathers the same set;
the order of summation differs). Every causal tile is computed, selected bits or not: skipping empty tiles costs
a block-wide reduction per tile, which measured slower (benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype_for, interpreting, row_max, row_sum

_LOG2E = 1.4426950408889634


@triton.jit
def _masked_mla_kernel(
    QN, QR, KN, KR, V, WORDS, KVALID, O,
    stride_qnb, stride_qns, stride_qnh,
    stride_qrb, stride_qrs, stride_qrh,
    stride_knb, stride_knt, stride_knh,
    stride_krb, stride_krt,
    stride_vb, stride_vt, stride_vh,
    stride_wb, stride_ws,
    stride_kvalb,
    stride_ob, stride_os, stride_oh,
    S, T, DN, DR, DV, past_len, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WORDS: tl.constexpr, HAS_KVALID: tl.constexpr,
    CDTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < S
    rows = offs_m.to(tl.int64)

    qn = tl.load(QN + b * stride_qnb + rows[:, None] * stride_qns + h * stride_qnh + offs_dn[None, :],
                 mask=m_mask[:, None] & (offs_dn < DN)[None, :], other=0.0).to(CDTYPE)  # fmt: skip
    qr = tl.load(QR + b * stride_qrb + rows[:, None] * stride_qrs + h * stride_qrh + offs_dr[None, :],
                 mask=m_mask[:, None] & (offs_dr < DR)[None, :], other=0.0).to(CDTYPE)  # fmt: skip
    query_pos = past_len + offs_m
    # Keys past the block's last query are in everyone's future.
    k_end = tl.minimum(T, past_len + tl.minimum((pid_m + 1) * BLOCK_M, S))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for start in range(0, k_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_end
        allowed = (offs_n[None, :] <= query_pos[:, None]) & n_mask[None, :] & m_mask[:, None]
        if HAS_WORDS:
            word_cols = start // 32 + tl.arange(0, BLOCK_N // 32)
            words = tl.load(WORDS + b * stride_wb + rows[:, None] * stride_ws + word_cols[None, :],
                            mask=m_mask[:, None] & (word_cols * 32 < T)[None, :], other=0)  # fmt: skip
            bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
            allowed = allowed & (tl.reshape(bits, [BLOCK_M, BLOCK_N]) != 0)
        if HAS_KVALID:
            kval = tl.load(KVALID + b * stride_kvalb + offs_n, mask=n_mask, other=0)
            allowed = allowed & (kval != 0)[None, :]
        cols = offs_n.to(tl.int64)
        kn = tl.load(KN + b * stride_knb + cols[:, None] * stride_knt + h * stride_knh + offs_dn[None, :],
                     mask=n_mask[:, None] & (offs_dn < DN)[None, :], other=0.0).to(CDTYPE)  # fmt: skip
        kr = tl.load(KR + b * stride_krb + cols[:, None] * stride_krt + offs_dr[None, :],
                     mask=n_mask[:, None] & (offs_dr < DR)[None, :], other=0.0).to(CDTYPE)  # fmt: skip
        qk = tl.dot(qn, tl.trans(kn), input_precision=PRECISION)
        qk = tl.dot(qr, tl.trans(kr), acc=qk, input_precision=PRECISION)
        qk = tl.where(allowed, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, row_max(qk))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + row_sum(p)
        v = tl.load(V + b * stride_vb + cols[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                    mask=n_mask[:, None] & (offs_dv < DV)[None, :], other=0.0).to(CDTYPE)  # fmt: skip
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(CDTYPE), v, acc=acc, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = O + b * stride_ob + rows[:, None] * stride_os + h * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & (offs_dv < DV)[None, :])


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def masked_mla_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    values: torch.Tensor,
    mask_words: torch.Tensor | None,
    scale: float,
    *,
    past_len: int = 0,
    key_valid: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Expanded-form attention; returns ``[B, S, H, v_head_dim]`` in ``q_nope.dtype``.

    ``q_nope [B, S, H, nope]``, ``q_rope [B, S, H, rope]`` (RoPE applied), ``k_nope [B, T, H, nope]``, ``k_rope
    [B, T, rope]`` (shared by the heads), ``values [B, T, H, v]``; ``mask_words [B, S, ceil(T / 32)]`` int32 with bit
    ``t % 32`` of word ``t // 32`` set when query ``s`` attends to token ``t``, or None for causal attention to
    ``t <= past_len + s`` (and ``key_valid [B, T]``). Last dims must be contiguous; other strides are free.
    """
    batch, seq, heads, dn = q_nope.shape
    dr, dv = q_rope.shape[-1], values.shape[-1]
    total = k_nope.shape[1]
    for name, t in (("q_nope", q_nope), ("q_rope", q_rope), ("k_nope", k_nope), ("k_rope", k_rope), ("values", values)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    has_words = mask_words is not None
    if has_words:
        if mask_words.dtype != torch.int32 or mask_words.shape != (batch, seq, triton.cdiv(total, 32)):
            raise ValueError(f"mask_words must be int32 [{batch}, {seq}, {triton.cdiv(total, 32)}], got "
                             f"{mask_words.dtype} {tuple(mask_words.shape)}")  # fmt: skip
        if mask_words.stride(-1) != 1:
            mask_words = mask_words.contiguous()
        words, stride_w = mask_words, (mask_words.stride(0), mask_words.stride(1))
    else:
        words, stride_w = q_nope, (0, 0)  # placeholder, never read
    has_kvalid = key_valid is not None and not has_words  # a bitmap already leaves padding out
    if has_kvalid:
        kvalid = key_valid.to(torch.bool).contiguous().view(torch.uint8)
        stride_kval = kvalid.stride(0)
    else:
        kvalid, stride_kval = q_nope, 0

    cdtype, precision = compute_dtype_for(q_nope.dtype)
    # Measured on an H100 (benchmarks/bench_kernels.py --only masked --sweep).
    if interpreting():
        block_m, block_n = block_m or 16, block_n or 32
    block_m = block_m or 128
    block_n = block_n or 64
    num_warps = num_warps or 8
    num_stages = num_stages or 3
    if block_n % 32:
        raise ValueError("block_n must be a multiple of 32 (one mask word)")

    out = torch.empty(batch, seq, heads, dv, dtype=q_nope.dtype, device=q_nope.device)
    grid = (triton.cdiv(seq, block_m), heads, batch)
    _masked_mla_kernel[grid](
        q_nope, q_rope, k_nope, k_rope, values, words, kvalid, out,
        q_nope.stride(0), q_nope.stride(1), q_nope.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        k_nope.stride(0), k_nope.stride(1), k_nope.stride(2),
        k_rope.stride(0), k_rope.stride(1),
        values.stride(0), values.stride(1), values.stride(2),
        stride_w[0], stride_w[1],
        stride_kval,
        out.stride(0), out.stride(1), out.stride(2),
        seq, total, dn, dr, dv, past_len, float(scale) * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DN=_pow2(dn), BLOCK_DR=_pow2(dr), BLOCK_DV=_pow2(dv),
        HAS_WORDS=has_words, HAS_KVALID=has_kvalid, CDTYPE=cdtype, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def flops(batch: int, seq: int, heads: int, pairs: float, dn: int = 128, dr: int = 64, dv: int = 128) -> float:
    """FLOPs of ``pairs`` (query, key) pairs computed densely, for benchmark reports."""
    return 2.0 * batch * heads * pairs * (dn + dr + dv)


__all__ = ["masked_mla_attention", "flops"]
