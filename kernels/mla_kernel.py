"""Sparse MLA attention in latent space (absorbed form), in Triton.

For every query ``(b, s)`` and head ``h``, over the tokens ``t`` the indexer selected for that query::

    score_t = (q_latent[b, s, h] . latent[b, t] + q_rope[b, s, h] . k_rope[b, t]) * scale
    out[b, s, h] = sum_t softmax(score)_t * latent[b, t]                      # [kv_lora_rank]

Invalid selections (causal/padding) are masked; a query with no valid token gets zeros. The plain-PyTorch twin is
``DeepseekV32Attention._absorbed`` / ``_attend`` in ``modeling_deepseek_v32/attention.py``.

One program handles one query, a block of heads (all 16 of the bench preset) and a slice of its selected tokens:
the selected latent rows (``kv_lora_rank + rope`` values, contiguous) are gathered once per block of tokens and
serve both the score product and the value product, as in FlashMLA's sparse kernels. Softmax is online (base-2,
fp32 statistics, fp32 accumulator). When there are few queries (decode, MTP verification) the token list is split
across programs (flash-decoding) and a second small kernel merges the partial results by their log-sum-exp.

``dense=True`` attends causally to every token ``t <= past_len + s`` (and ``key_valid``), which is what the model
does while the sequence is no longer than ``index_topk``; no index list is materialized then.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype_for, num_sms, row_max, row_sum

_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_mla_kernel(
    Q, QR, KV, KR, IDX, VALID, KVALID, O, OPART, LSEPART,
    stride_qb, stride_qs, stride_qh,
    stride_qrb, stride_qrs, stride_qrh,
    stride_kvb, stride_kvt,
    stride_krb, stride_krt,
    stride_ib, stride_is,
    stride_vb, stride_vs,
    stride_kvalb,
    stride_ob, stride_os, stride_oh,
    S, H, T, K, C, R, past_len, k_per_split, qk_scale,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, HAS_KVALID: tl.constexpr, SPLIT: tl.constexpr,
    CDTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = pid_q // S
    s = pid_q % S
    b64 = b.to(tl.int64)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask = offs_h < H
    c_mask = offs_c < C
    r_mask = offs_r < R

    q_ptrs = Q + b64 * stride_qb + s * stride_qs + offs_h[:, None] * stride_qh + offs_c[None, :]
    q = tl.load(q_ptrs, mask=h_mask[:, None] & c_mask[None, :], other=0.0).to(CDTYPE)
    qr_ptrs = QR + b64 * stride_qrb + s * stride_qrs + offs_h[:, None] * stride_qrh + offs_r[None, :]
    qr = tl.load(qr_ptrs, mask=h_mask[:, None] & r_mask[None, :], other=0.0).to(CDTYPE)

    if DENSE:
        k_end = tl.minimum(T, past_len + s + 1)
    else:
        k_end = K
    k_start = pid_split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, k_end)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_C], 0.0, tl.float32)
    for start in range(k_start, k_stop, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_stop
        if DENSE:
            idx = offs_n
            ok = n_mask
            if HAS_KVALID:
                kval = tl.load(KVALID + b64 * stride_kvalb + idx, mask=n_mask, other=0)
                ok = ok & (kval != 0)
        else:
            idx = tl.load(IDX + b64 * stride_ib + s * stride_is + offs_n, mask=n_mask, other=0)
            sel = tl.load(VALID + b64 * stride_vb + s * stride_vs + offs_n, mask=n_mask, other=0)
            ok = n_mask & (sel != 0) & (idx >= 0) & (idx < T)
            idx = tl.where(ok, idx, 0)
        idx = idx.to(tl.int64)
        kv = tl.load(
            KV + b64 * stride_kvb + idx[:, None] * stride_kvt + offs_c[None, :],
            mask=ok[:, None] & c_mask[None, :], other=0.0,
        ).to(CDTYPE)
        kr = tl.load(
            KR + b64 * stride_krb + idx[:, None] * stride_krt + offs_r[None, :],
            mask=ok[:, None] & r_mask[None, :], other=0.0,
        ).to(CDTYPE)
        qk = tl.dot(q, tl.trans(kv), input_precision=PRECISION)
        qk = tl.dot(qr, tl.trans(kr), acc=qk, input_precision=PRECISION)
        qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, row_max(qk))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + row_sum(p)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(CDTYPE), kv, acc=acc, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:
        n_splits = tl.num_programs(2)
        row = (pid_q * n_splits + pid_split).to(tl.int64) * H + offs_h
        tl.store(OPART + row[:, None] * C + offs_c[None, :], out, mask=h_mask[:, None] & c_mask[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSEPART + row, lse, mask=h_mask)
    else:
        o_ptrs = O + b64 * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_c[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=h_mask[:, None] & c_mask[None, :])


@triton.jit
def _merge_splits_kernel(
    OPART, LSEPART, O, S, H, C, n_splits,
    stride_ob, stride_os, stride_oh,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid_q // S
    s = pid_q % S
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    h_mask = offs_h < H
    c_mask = offs_c < C
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for i in range(n_splits):
        lse = tl.load(LSEPART + (pid_q * n_splits + i).to(tl.int64) * H + offs_h, mask=h_mask, other=float("-inf"))
        m = tl.maximum(m, lse)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_C], 0.0, tl.float32)
    for i in range(n_splits):
        row = (pid_q * n_splits + i).to(tl.int64) * H + offs_h
        lse = tl.load(LSEPART + row, mask=h_mask, other=float("-inf"))
        w = tl.exp2(lse - m_use)
        part = tl.load(OPART + row[:, None] * C + offs_c[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
        acc += w[:, None] * part
        total += w
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_c[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=h_mask[:, None] & c_mask[None, :])


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def sparse_mla_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    indices: torch.Tensor | None,
    valid: torch.Tensor | None,
    scale: float,
    *,
    past_len: int = 0,
    key_valid: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Absorbed sparse MLA attention; returns ``[B, S, H, kv_lora_rank]`` in ``q_latent.dtype``.

    ``q_latent [B, S, H, C]`` (``q_nope @ W_UK``), ``q_rope [B, S, H, R]``, ``latent [B, T, C]``, ``k_rope [B, T, R]``;
    ``indices [B, S, K]`` (int32/int64 token positions) and ``valid [B, S, K]`` (bool) from the indexer, or both
    None for dense causal attention over ``t <= past_len + s`` (and ``key_valid [B, T]``). Last dims must be
    contiguous; other strides are free.
    """
    batch, seq, heads, c_dim = q_latent.shape
    r_dim = q_rope.shape[-1]
    total = latent.shape[1]
    dense = indices is None
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("latent", latent), ("k_rope", k_rope)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    if dense:
        width = total
        indices = valid = latent  # placeholders, never read
        stride_i = stride_v = (0, 0)
    else:
        width = indices.shape[-1]
        if indices.stride(-1) != 1:
            indices = indices.contiguous()
        if valid.dtype != torch.bool or valid.stride(-1) != 1:
            valid = valid.to(torch.bool).contiguous()
        valid = valid.view(torch.uint8)
        stride_i = (indices.stride(0), indices.stride(1))
        stride_v = (valid.stride(0), valid.stride(1))
    has_kvalid = dense and key_valid is not None
    if has_kvalid:
        kvalid = key_valid.to(torch.bool).contiguous().view(torch.uint8)
        stride_kval = kvalid.stride(0)
    else:
        kvalid, stride_kval = latent, 0

    cdtype, precision = compute_dtype_for(q_latent.dtype)
    block_h = min(_pow2(heads), 32 if c_dim > 256 else 64)
    block_c, block_r = _pow2(c_dim), _pow2(r_dim)
    if block_n is None:
        block_n = 32 if block_c >= 512 else 64
    if num_warps is None:
        num_warps = 4 if block_h <= 16 else 8
    if num_stages is None:
        num_stages = 2
    n_hblocks = triton.cdiv(heads, block_h)
    programs = batch * seq * n_hblocks
    if num_splits is None:
        target = 2 * num_sms(q_latent.device)
        num_splits = 1 if programs >= target else min(triton.cdiv(target, programs), triton.cdiv(width, 2 * block_n))
    num_splits = max(1, min(num_splits, triton.cdiv(width, block_n)))
    k_per_split = triton.cdiv(triton.cdiv(width, num_splits), block_n) * block_n
    num_splits = triton.cdiv(width, k_per_split)

    out = torch.empty(batch, seq, heads, c_dim, dtype=q_latent.dtype, device=q_latent.device)
    split = num_splits > 1
    if split:
        opart = torch.empty(batch * seq * num_splits * heads, c_dim, dtype=torch.float32, device=q_latent.device)
        lsepart = torch.empty(batch * seq * num_splits * heads, dtype=torch.float32, device=q_latent.device)
    else:
        opart = lsepart = out
    grid = (batch * seq, n_hblocks, num_splits)
    _sparse_mla_kernel[grid](
        q_latent, q_rope, latent, k_rope, indices, valid, kvalid, out, opart, lsepart,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        latent.stride(0), latent.stride(1),
        k_rope.stride(0), k_rope.stride(1),
        stride_i[0], stride_i[1],
        stride_v[0], stride_v[1],
        stride_kval,
        out.stride(0), out.stride(1), out.stride(2),
        seq, heads, total, width, c_dim, r_dim, past_len, k_per_split, float(scale) * _LOG2E,
        BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_N=block_n,
        DENSE=dense, HAS_KVALID=has_kvalid, SPLIT=split, CDTYPE=cdtype, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split:
        _merge_splits_kernel[(batch * seq, n_hblocks)](
            opart, lsepart, out, seq, heads, c_dim, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_H=block_h, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return out


def flops_and_bytes(batch: int, seq: int, heads: int, width: int, c_dim: int = 512, r_dim: int = 64, elem: int = 2):
    """FLOPs and minimum bytes of one call (each selected row read once per query), for benchmark reports."""
    flops = 2 * batch * seq * heads * width * (2 * c_dim + r_dim)
    bytes_ = batch * seq * (width * ((c_dim + r_dim) * elem + 8 + 1) + heads * (2 * c_dim + r_dim) * elem)
    return flops, bytes_


__all__ = ["sparse_mla_attention", "flops_and_bytes"]
