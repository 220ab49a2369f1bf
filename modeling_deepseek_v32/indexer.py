"""DSA lightning indexer: picks, per query, the ``index_topk`` tokens that sparse MLA attends to.

Scores follow DeepSeek's code: ``score(t) = sum_h w_h * ReLU(q_h . k_t)`` with ``w = weights_proj(x) * H^-0.5 *
D^-0.5``, RoPE (half-split) on the first ``qk_rope_head_dim`` dims, and, with ``index_fp8``, a Hadamard rotation and
e4m3 quantization of q and k in 128-blocks with power-of-two scales. Multiplying by a power of two is exact, so scoring
the dequantized values equals DeepSeek's ``k_scale * sum_h (w_h * q_scale_h) * ReLU(q_fp8 . k_fp8)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels as _kernels
from .configuration import DeepseekV32Config
from .fp8 import dequantize_blockwise_1d, quantize_blockwise_1d
from .layers import make_linear
from .rope import apply_rope_half_split, apply_rope_interleaved

INDEX_FP8_BLOCK = 128
# Upper bound on the [batch, queries, heads, keys] fp32 scores alive at once while scoring.
_SCORE_BUDGET_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=8)
def hadamard_matrix(dim: int, device: torch.device) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size ``dim`` (a power of two), fp32."""
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two size, got {dim}")
    matrix = torch.ones(1, 1, dtype=torch.float32)
    while matrix.shape[0] < dim:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return (matrix * dim**-0.5).to(device)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim by the orthonormal Hadamard matrix; the result keeps ``x``'s dtype as DeepSeek's does."""
    return (x.float() @ hadamard_matrix(x.shape[-1], x.device)).to(x.dtype)


class IndexSelection:
    """The tokens each query attends to, as index lists or as a bitmap, each built from the other on demand.

    * ``indices`` ``[batch, queries, k]`` and ``valid`` (which of them are real: causal, not padding), what the
      gathering paths and the indexer losses read;
    * ``mask_words(total)`` ``[batch, queries, ceil(total / 32)]`` int32, bit ``t % 32`` of word ``t // 32`` set when
      token ``t`` is selected, what the masked prefill kernel reads (the indexer kernel writes it directly).

    Both describe the same set; a bitmap lists its tokens in position order, not by score.
    """

    def __init__(self, indices: torch.Tensor | None = None, valid: torch.Tensor | None = None, *,
                 mask_words: torch.Tensor | None = None, topk: int | None = None):  # fmt: skip
        if (indices is None) == (mask_words is None) or (indices is None) != (valid is None):
            raise ValueError("IndexSelection takes indices with valid, or mask_words with topk")
        if mask_words is not None and topk is None:
            raise ValueError("a bitmap selection needs its topk (the width of the index lists it stands for)")
        self._indices, self._valid, self._words = indices, valid, mask_words
        self.topk = indices.shape[-1] if indices is not None else topk

    @property
    def indices(self) -> torch.Tensor:
        if self._indices is None:
            self._indices, self._valid = words_to_indices(self._words, self.topk)
        return self._indices

    @property
    def valid(self) -> torch.Tensor:
        self.indices  # noqa: B018 - materializes both
        return self._valid

    def mask_words(self, total: int) -> torch.Tensor:
        if self._words is None:
            self._words = indices_to_words(self._indices, self._valid, total)
        if self._words.shape[-1] != -(-total // 32):
            raise ValueError(f"the selection bitmap covers {self._words.shape[-1] * 32} tokens, not {total}")
        return self._words


_BIT_VALUES = [1 << bit for bit in range(32)]


def indices_to_words(indices: torch.Tensor, valid: torch.Tensor, total: int) -> torch.Tensor:
    """Bitmap ``[B, S, ceil(total / 32)]`` int32 of the valid ``indices`` (plain-PyTorch twin of the indexer kernel's
    bitmap output)."""
    batch, seq, _ = indices.shape
    width = -(-total // 32) * 32
    # Invalid entries land in one spare column that is dropped.
    mask = torch.zeros(batch, seq, width + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices.masked_fill(~valid, width), True)
    bits = torch.tensor(_BIT_VALUES, dtype=torch.int64, device=indices.device)
    words = (mask[..., :width].view(batch, seq, -1, 32).to(torch.int64) * bits).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # bit 31 is the sign bit


def words_to_mask(words: torch.Tensor, total: int) -> torch.Tensor:
    """Bool ``[B, S, total]`` of a selection bitmap."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[..., None] >> shifts) & 1).flatten(-2)[..., :total].bool()


def words_to_indices(words: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [B, S, topk], valid)`` of a selection bitmap: its tokens in position order, then invalid slots."""
    mask = words_to_mask(words, words.shape[-1] * 32)
    order = mask.to(torch.uint8).sort(dim=-1, descending=True, stable=True)
    return order.indices[..., :topk].contiguous(), order.values[..., :topk].bool()


class DeepseekV32Indexer(nn.Module):
    """The lightning indexer of one layer. Its keys live in the layer's cache so decode scores only new queries."""

    def __init__(self, config: DeepseekV32Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.index_topk = config.index_topk
        self.use_fp8 = config.index_fp8
        self.rope_interleave = config.indexer_rope_interleave
        q_input = config.q_lora_rank or config.hidden_size
        self.wq_b = make_linear(config, q_input, self.n_heads * self.head_dim)
        self.wk = make_linear(config, config.hidden_size, self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotate = apply_rope_interleaved if self.rope_interleave else apply_rope_half_split
        return torch.cat((rotate(x[..., : self.rope_dim], cos, sin), x[..., self.rope_dim :]), dim=-1)

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_fp8:
            return x, None
        rotated = hadamard_rotate(x)
        # The kernel's 128-wide blocks equal the twin's min(128, head_dim) ones: a shorter row is one block either way.
        fused = _kernels.fp8_quantize_rows(rotated)
        if fused is not None:
            return fused
        return quantize_blockwise_1d(rotated, min(INDEX_FP8_BLOCK, self.head_dim), scale_fmt="ue8m0")

    def _dequantize(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is None:
            return x.float()
        return dequantize_blockwise_1d(x, scale, min(INDEX_FP8_BLOCK, self.head_dim), dtype=torch.float32)

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,
        q_latent: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_len: int,
        key_valid: torch.Tensor | None,
        cache=None,
        as_mask: bool = False,
    ) -> IndexSelection | None:
        """Select tokens for ``S`` new queries against all ``T = past_len + S`` keys.

        Returns None when ``T <= index_topk``: every causal token is selected and scoring is skipped.
        ``key_valid``: ``[batch, T]`` bool padding mask or None. ``as_mask``: the caller reads the selection as a
        bitmap, which the indexer kernel then writes directly (cheaper than sorted index lists).
        """
        batch, seq, _ = hidden_states.shape
        norm = self.k_norm
        k = F.layer_norm(self.wk(hidden_states).float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        k = k.to(hidden_states.dtype)
        k_stored, k_scale = self._quantize(self._rope(k, cos, sin))
        if cache is not None:
            k_stored, k_scale = cache.update_index_keys(k_stored, k_scale, self.layer_idx)
        total = k_stored.shape[1]
        if total <= self.index_topk:
            return None

        q = self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim))
        q_stored, q_scale = self._quantize(self._rope(q, cos, sin))
        weights = F.linear(hidden_states.float(), self.weights_proj.weight.float())
        weights = weights * (self.n_heads**-0.5 * self.head_dim**-0.5)
        topk = min(self.index_topk, total)
        fused = _kernels.lightning_indexer(q_stored, q_scale, k_stored, k_scale, weights, past_len, key_valid, topk,
                                           as_mask=as_mask)  # fmt: skip
        if fused is not None:
            return IndexSelection(mask_words=fused, topk=topk) if as_mask else IndexSelection(*fused)
        queries = self._dequantize(q_stored, q_scale)
        keys = self._dequantize(k_stored, k_scale)

        indices = torch.empty(batch, seq, topk, dtype=torch.long, device=hidden_states.device)
        valid = torch.empty(batch, seq, topk, dtype=torch.bool, device=hidden_states.device)
        chunk = max(1, _SCORE_BUDGET_ELEMENTS // max(1, batch * self.n_heads * total))
        key_pos = torch.arange(total, device=hidden_states.device)
        for start in range(0, seq, chunk):
            stop = min(seq, start + chunk)
            logits = torch.einsum("bshd,btd->bsht", queries[:, start:stop], keys).relu_()
            scores = torch.einsum("bsh,bsht->bst", weights[:, start:stop], logits)
            query_pos = past_len + torch.arange(start, stop, device=hidden_states.device)
            allowed = key_pos[None, None, :] <= query_pos[None, :, None]
            if key_valid is not None:
                allowed = allowed & key_valid[:, None, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
            # ReLU makes exact ties (often at 0) common; a stable sort breaks them towards the earlier token so
            # a query selects the same tokens whether scored in prefill or in decode.
            values, chosen = scores.sort(dim=-1, descending=True, stable=True)
            values, chosen = values[..., :topk], chosen[..., :topk]
            indices[:, start:stop] = chosen
            valid[:, start:stop] = values > float("-inf")
        return IndexSelection(indices, valid)
