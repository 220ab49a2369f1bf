"""Lightning indexer scoring + top-k in Triton.

For a block of queries against all cached index keys (FP8 e4m3 with one power-of-two scale per token and head, or
bf16/fp32)::

    score[b, s, t] = k_scale[t] * sum_h (w[b, s, h] * q_scale[b, s, h]) * ReLU(q[b, s, h] . k[b, t])

masked to ``-inf`` where ``t > past_len + s`` or ``key_valid[b, t]`` is False. The twin is
``DeepseekV32Indexer.forward`` in ``modeling_deepseek_v32/indexer.py``, which dequantizes and scores in fp32; the
scales are powers of two, so both compute the same values up to fp32 summation order. FP8 operands are upcast to
bf16 in registers (exact), so every product is exact and accumulated in fp32.

The kernel never holds S x T scores for the whole sequence: queries go in chunks sized so the chunk's scores stay
under a budget, and only keys a chunk can see (``t < past_len + chunk end``) are scored. Each score is written
as one int64 sort key ``(orderable fp32 bits << 32) | (2^31 - 1 - t)``: keys are unique, order by score and
then by *earlier* token, so ``torch.topk(sorted=True)`` over them returns exactly what the twin's stable
descending sort returns (same tokens, same order; -0.0 is folded into +0.0 as the sort treats them equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype_for, interpreting, row_sum, vector_cumsum, vector_sum

# Upper bound on score keys (int64) alive at once per chunk of queries: 2^27 keys = 1 GiB.
SCORE_BUDGET_ELEMENTS = 1 << 27
_LOW_MASK = 0x7FFFFFFF


def _orderable_hi(value: float) -> int:
    bits = int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())
    return bits ^ _LOW_MASK if bits < 0 else bits


NEG_INF_HI = _orderable_hi(float("-inf"))


@triton.jit
def _indexer_scores_kernel(
    Q, QS, K, KS, W, KVALID, OUT,
    stride_qb, stride_qs, stride_qh,
    stride_qsb, stride_qss,
    stride_kb, stride_kt,
    stride_ksb,
    stride_wb, stride_ws,
    stride_kvalb,
    stride_ob, stride_os,
    s_begin, n_queries, n_keys, H, D, past_len,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_QS: tl.constexpr, HAS_KS: tl.constexpr, HAS_KVALID: tl.constexpr, SORT_KEYS: tl.constexpr,
    CDTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_queries
    n_mask = offs_n < n_keys
    d_mask = offs_d < D
    s_abs = s_begin + offs_m
    out_ptrs = OUT + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_os + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    low = (0x7FFFFFFF - offs_n).to(tl.int64)

    last_pos = past_len + s_begin + tl.minimum((pid_m + 1) * BLOCK_M, n_queries) - 1
    if pid_n * BLOCK_N > last_pos:
        # every key of this tile is in the future of every query of the block
        neg_inf = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        if SORT_KEYS:
            neg_hi = neg_inf.to(tl.int32, bitcast=True) ^ 0x7FFFFFFF
            tl.store(out_ptrs, (neg_hi.to(tl.int64) << 32) | low[None, :], mask=out_mask)
        else:
            tl.store(out_ptrs, neg_inf, mask=out_mask)
    else:
        k = tl.load(
            K + b * stride_kb + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        ).to(CDTYPE)
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        q_base = Q + b * stride_qb + s_abs[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
        w_base = W + b * stride_wb + s_abs.to(tl.int64) * stride_ws
        qs_base = QS + b * stride_qsb + s_abs.to(tl.int64) * stride_qss
        for h in range(H):
            q = tl.load(q_base + h * stride_qh, mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(CDTYPE)
            w = tl.load(w_base + h, mask=m_mask, other=0.0)
            if HAS_QS:
                w = w * tl.load(qs_base + h, mask=m_mask, other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            acc += tl.maximum(logits, 0.0) * w[:, None]
        if HAS_KS:
            ks = tl.load(KS + b * stride_ksb + offs_n, mask=n_mask, other=0.0)
            acc = acc * ks[None, :]
        allowed = (offs_n[None, :] <= (past_len + s_abs)[:, None]) & n_mask[None, :]
        if HAS_KVALID:
            kval = tl.load(KVALID + b * stride_kvalb + offs_n, mask=n_mask, other=0)
            allowed = allowed & (kval != 0)[None, :]
        score = tl.where(allowed, acc, float("-inf"))
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0
        if SORT_KEYS:
            bits = score.to(tl.int32, bitcast=True)
            bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            tl.store(out_ptrs, (bits.to(tl.int64) << 32) | low[None, :], mask=out_mask)
        else:
            tl.store(out_ptrs, score, mask=out_mask)


def indexer_score_keys(
    q: torch.Tensor,
    q_scale: torch.Tensor | None,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    weights: torch.Tensor,
    past_len: int,
    key_valid: torch.Tensor | None,
    s_begin: int,
    s_end: int,
    n_keys: int,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """int64 sort keys ``[B, s_end - s_begin, n_keys]`` of queries ``s_begin:s_end`` against keys ``0:n_keys``, or,
    when ``out`` is float32, the masked scores themselves."""
    batch, _, heads, dim = q.shape
    n_queries = s_end - s_begin
    if out is None:
        out = torch.empty(batch, n_queries, n_keys, dtype=torch.int64, device=q.device)
    if out.dtype not in (torch.int64, torch.float32):
        raise ValueError(f"out must be int64 (sort keys) or float32 (scores), got {out.dtype}")
    src_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    cdtype, precision = compute_dtype_for(src_dtype)
    block_d = max(16, triton.next_power_of_2(dim))
    if interpreting():
        block_m = block_m or 16
        block_n = block_n or 16
    # Measured on an H100 (benchmarks/bench_kernels.py --sweep): fp8 operands (upcast in registers) run best with 4
    # warps, bf16 with 8; a decode step (a few queries) takes 16-row query tiles.
    block_m = block_m or (16 if n_queries <= 16 else 64)
    block_n = block_n or 128
    num_warps = num_warps or (4 if q.dtype == torch.float8_e4m3fn or block_m == 16 else 8)
    num_stages = num_stages or 3
    has_qs, has_ks, has_kvalid = q_scale is not None, k_scale is not None, key_valid is not None
    qs = q_scale if has_qs else weights
    ks = k_scale if has_ks else weights
    kvalid = key_valid.to(torch.bool).contiguous().view(torch.uint8) if has_kvalid else weights
    grid = (triton.cdiv(n_keys, block_n), triton.cdiv(n_queries, block_m), batch)
    _indexer_scores_kernel[grid](
        q, qs, k, ks, weights, kvalid, out,
        q.stride(0), q.stride(1), q.stride(2),
        qs.stride(0) if has_qs else 0, qs.stride(1) if has_qs else 0,
        k.stride(0), k.stride(1),
        ks.stride(0) if has_ks else 0,
        weights.stride(0), weights.stride(1),
        kvalid.stride(0) if has_kvalid else 0,
        out.stride(0), out.stride(1),
        s_begin, n_queries, n_keys, heads, dim, past_len,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_QS=has_qs, HAS_KS=has_ks, HAS_KVALID=has_kvalid, SORT_KEYS=out.dtype == torch.int64,
        CDTYPE=cdtype, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def _score_chunks(q, q_scale, k, k_scale, weights, past_len, key_valid, topk, budget, dtype, launch):
    """Yield ``(start, stop, scores)`` for query chunks whose ``[B, chunk, n_keys]`` scores (sort keys or fp32)
    stay under ``budget`` elements; ``n_keys`` covers only the keys the chunk can see (at least ``topk``)."""
    batch, seq, heads, dim = q.shape
    total = k.shape[1]
    if total < topk:
        raise ValueError(f"top-{topk} of {total} keys")
    if q_scale is not None:
        if q_scale.shape[-1] != 1 or k_scale is None or k_scale.shape[-1] != 1:
            raise ValueError("the fused indexer supports one FP8 scale block per head (index_head_dim <= 128)")
        q_scale = q_scale.reshape(batch, seq, heads)
        k_scale = k_scale.reshape(batch, total)
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    weights = weights.float()
    chunk = max(1, min(seq, budget // max(1, batch * total)))
    buffer = None
    for start in range(0, seq, chunk):
        stop = min(seq, start + chunk)
        n_keys = min(total, max(topk, past_len + stop))
        needed = batch * (stop - start) * n_keys
        if buffer is None or buffer.numel() < needed:
            buffer = torch.empty(batch * chunk * min(total, max(topk, past_len + seq)), dtype=dtype, device=q.device)
        scores = buffer[:needed].view(batch, stop - start, n_keys)
        indexer_score_keys(q, q_scale, k, k_scale, weights, past_len, key_valid, start, stop, n_keys, scores, **launch)
        yield start, stop, scores


def lightning_indexer_topk(
    q: torch.Tensor,
    q_scale: torch.Tensor | None,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    weights: torch.Tensor,
    past_len: int,
    key_valid: torch.Tensor | None,
    topk: int,
    *,
    budget: int = SCORE_BUDGET_ELEMENTS,
    **launch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``topk`` tokens per query: ``(indices [B, S, topk] int64, valid [B, S, topk] bool)``, ordered like the
    twin (score descending, earlier token first among equal scores).

    ``q [B, S, H, D]`` (e4m3 / bf16 / fp32, last dim contiguous), ``q_scale [B, S, H, 1]`` fp32 or None,
    ``k [B, T, D]``, ``k_scale [B, T, 1]`` or None, ``weights [B, S, H]`` fp32 (``weights_proj(x) * H^-0.5 *
    D^-0.5``), ``key_valid [B, T]`` bool or None; needs ``T >= topk``.
    """
    batch, seq = q.shape[:2]
    indices = torch.empty(batch, seq, topk, dtype=torch.long, device=q.device)
    valid = torch.empty(batch, seq, topk, dtype=torch.bool, device=q.device)
    chunks = _score_chunks(q, q_scale, k, k_scale, weights, past_len, key_valid, topk, budget, torch.int64, launch)
    for start, stop, keys in chunks:
        values, chosen = keys.topk(topk, dim=-1, largest=True, sorted=True)
        indices[:, start:stop] = chosen
        valid[:, start:stop] = (values >> 32) != NEG_INF_HI
    return indices, valid


@triton.jit
def _selection_words_kernel(
    SCORES, THRESHOLD, WORDS,
    stride_sb, stride_ss, stride_wb, stride_ws,
    n_queries, n_keys, n_words, topk, s_begin,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    scores = SCORES + b * stride_sb + row.to(tl.int64) * stride_ss
    threshold = tl.load(THRESHOLD + b * n_queries + row)
    # The top-k are the scores above the k-th largest plus, among those equal to it, the earliest tokens (the
    # twin's stable sort). A -inf threshold means fewer than k visible keys: all of them are selected.
    above = 0
    for start in range(0, n_keys, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(scores + offs, mask=offs < n_keys, other=float("-inf"))
        above += vector_sum((x > threshold).to(tl.int32))
    ties_wanted = tl.where(threshold > float("-inf"), topk - above, 0)
    ties_seen = 0
    words = WORDS + b * stride_wb + (s_begin + row).to(tl.int64) * stride_ws
    for start in range(0, n_words * 32, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(scores + offs, mask=offs < n_keys, other=float("-inf"))
        tie = tl.where(x == threshold, 1, 0)
        rank = ties_seen + vector_cumsum(tie) - tie
        chosen = tl.where(x > threshold, 1, tl.where(rank < ties_wanted, tie, 0))
        ties_seen += vector_sum(tie)
        bits = tl.reshape(chosen, [BLOCK // 32, 32]) << tl.arange(0, 32)[None, :]
        offs_w = start // 32 + tl.arange(0, BLOCK // 32)
        tl.store(words + offs_w, row_sum(bits), mask=offs_w < n_words)  # distinct bits: the sum is their OR


def lightning_indexer_mask(
    q: torch.Tensor,
    q_scale: torch.Tensor | None,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    weights: torch.Tensor,
    past_len: int,
    key_valid: torch.Tensor | None,
    topk: int,
    *,
    budget: int = SCORE_BUDGET_ELEMENTS // 2,
    block: int | None = None,
    **launch,
) -> torch.Tensor:
    """The same top-``topk`` sets as :func:`lightning_indexer_topk` as a bitmap ``[B, S, ceil(T / 32)]`` int32 (bit
    ``t % 32`` of word ``t // 32``): what ``masked_mla_kernel`` reads. Cheaper than the index lists: the scores are
    fp32 (half the bytes of sort keys) and only each row's k-th largest value is searched for, unsorted."""
    batch, seq = q.shape[:2]
    total = k.shape[1]
    n_words = triton.cdiv(total, 32)
    words = torch.empty(batch, seq, n_words, dtype=torch.int32, device=q.device)
    block = block or (128 if interpreting() else 1024)
    chunks = _score_chunks(q, q_scale, k, k_scale, weights, past_len, key_valid, topk, budget, torch.float32, launch)
    for start, stop, scores in chunks:
        threshold = scores.topk(topk, dim=-1, largest=True, sorted=False).values.amin(dim=-1).contiguous()
        _selection_words_kernel[(stop - start, batch)](
            scores, threshold, words, scores.stride(0), scores.stride(1), words.stride(0), words.stride(1),
            stop - start, scores.shape[-1], n_words, topk, start, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return words


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the kernel's sort keys: ``(scores fp32, token positions)`` (for tests and debugging)."""
    hi = (keys >> 32).to(torch.int32)
    hi = torch.where(hi < 0, hi ^ _LOW_MASK, hi)
    return hi.view(torch.float32), _LOW_MASK - (keys & 0xFFFFFFFF)


__all__ = ["lightning_indexer_topk", "lightning_indexer_mask", "indexer_score_keys", "decode_keys", "NEG_INF_HI"]
