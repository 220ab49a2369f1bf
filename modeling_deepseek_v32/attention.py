"""Multi-head latent attention (MLA) with DeepSeek sparse attention, in plain PyTorch.

Two mathematically identical forms:

* expanded (prefill, training): ``kv_b_proj`` turns the latents into per-head K/V once, then each query chunk
  gathers only its indexer-selected keys, so memory stays O(S * topk) rather than O(S * T);
* absorbed (decode, verification): ``q_nope`` is projected into latent space through W_UK, scores are taken against
  the cached latents and the output leaves latent space through W_UV; no per-token K/V ever exists.

These are the oracles for the Triton kernels in ``modeling_deepseek_v32.kernels``.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed: nothing can be sharded, and isinstance(x, ()) is False
    DTensor = ()

from . import kernels as _kernels
from .configuration import DeepseekV32Config
from .fp8 import FP8Linear
from .indexer import DeepseekV32Indexer, IndexSelection
from .indexer_training import record_indexer_loss
from .layers import DeepseekV32RMSNorm, make_linear
from .rope import apply_rope_interleaved

# Upper bound on gathered/score elements alive at once per query chunk.
_ATTENTION_BUDGET_ELEMENTS = 1 << 25
# Continuation steps with at most this many new queries take the absorbed path.
ABSORB_MAX_QUERIES = 16


class DeepseekV32Attention(nn.Module):
    def __init__(self, config: DeepseekV32Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.scaling = config.softmax_scale
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = make_linear(config, config.hidden_size, self.num_heads * self.qk_head_dim)
        else:
            self.q_a_proj = make_linear(config, config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV32RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = make_linear(config, self.q_lora_rank, self.num_heads * self.qk_head_dim)
        self.kv_a_proj_with_mqa = make_linear(config, config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = DeepseekV32RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = make_linear(config, self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_head_dim))
        self.o_proj = make_linear(config, self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)
        self.indexer = DeepseekV32Indexer(config, layer_idx)
        self._absorb_weight_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # Indexer training (indexer_training.py) reads `config.indexer_training` live, so a run can switch stages.
        self.config = config
        self.indexer_loss: torch.Tensor | None = None
        self.indexer_metrics: dict | None = None
        self._head_prob_sink: list[torch.Tensor] | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        past_key_values=None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` [B, S, hidden]; ``cos``/``sin`` [B, S, rope/2]; ``key_valid`` [B, T] bool padding mask
        over cached + new tokens. ``absorb`` forces a path (None: absorbed for short continuation steps)."""
        batch, seq, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q_latent = hidden_states
            q = self.q_proj(hidden_states)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(hidden_states))
            q = self.q_b_proj(q_latent)
        # Under tensor parallelism (`tp_plan="auto"`) q_b_proj/q_proj and kv_b_proj are split by heads and return
        # this rank's heads only, so every head count below comes from the tensors, not from the config.
        heads = self._local_heads(q.shape[-1])
        q = q.view(batch, seq, heads, self.qk_head_dim)
        q_nope, q_rope = q.split((self.nope_dim, self.rope_dim), dim=-1)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)

        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rope_interleaved(k_rope, cos, sin)
        past_len = 0
        if past_key_values is not None:
            past_len = past_key_values.get_seq_length(self.layer_idx)
            latent, k_rope = past_key_values.update_mla(latent, k_rope, self.layer_idx)

        if absorb is None:
            absorb = past_len > 0 and seq <= ABSORB_MAX_QUERIES
        stage = self.config.indexer_training
        # While the indexer trains, `_attend` hands over its head-summed probabilities: the indexer's KL target.
        sink = self._head_prob_sink = [] if stage is not None and self.training and past_len == 0 else None
        # The masked prefill kernel reads the selection as a bitmap, which the indexer kernel writes directly.
        as_mask = not absorb and sink is None and _kernels.masked_mla_supported(q_nope, q_rope, latent.shape[1])
        selection = self.indexer(hidden_states, q_latent, cos, sin, past_len, key_valid, past_key_values, as_mask)
        attend = self._absorbed if absorb else self._expanded
        attended = None if stage == "dense_warmup" else selection  # warm-up: main attention stays dense
        output = attend(q_nope, q_rope, latent, k_rope, attended, past_len, key_valid)
        self._head_prob_sink = None
        if sink is not None and heads != self.num_heads:
            # The indexer's KL target sums probabilities over all heads: add the other ranks' heads (no gradient).
            group = _tp_group(self.o_proj.weight)
            for probs in sink:
                torch.distributed.all_reduce(probs, group=group)
        if sink is not None:
            record_indexer_loss(self, hidden_states, q_latent, cos, sin, key_valid, selection, sink, stage)
        return self.o_proj(output.flatten(2).to(hidden_states.dtype))

    # ----------------------------------------------------------------------------------------------------------
    # Each form supplies, per query chunk, scores [B, C, H, K] and the values with the einsum that combines them.
    def _expanded(self, q_nope, q_rope, latent, k_rope, selection, past_len, key_valid) -> torch.Tensor:
        # The kernels compute this function too; not while indexer training needs `_attend`'s probabilities.
        kernels_may_run = self._head_prob_sink is None
        expanded = None
        if kernels_may_run and _kernels.masked_mla_supported(q_nope, q_rope, latent.shape[1]):
            expanded = self._expand_kv(latent, q_nope.shape[2])
            output = _kernels.masked_mla(q_nope, q_rope, expanded[0], k_rope, expanded[1], selection, past_len,
                                         key_valid, self.scaling)  # fmt: skip
            if output is not None:
                return output
        if kernels_may_run and _kernels.sparse_mla_supported(q_rope, latent):
            if isinstance(self.kv_b_proj, FP8Linear):  # as kv_b_proj's input, the latent is quantized to FP8
                latent = _kernels.fp8_round_trip(latent)
            return self._absorbed(q_nope, q_rope, latent, k_rope, selection, past_len, key_valid)
        heads = q_nope.shape[2]
        k_nope, values = expanded or self._expand_kv(latent, heads)
        keys = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, heads, -1)), dim=-1)
        queries = torch.cat((q_nope, q_rope), dim=-1)

        def chunk_terms(start: int, stop: int, indices: torch.Tensor | None):
            if indices is None:
                return torch.einsum("bshd,bthd->bsht", queries[:, start:stop], keys), values, "bsht,bthd->bshd"
            k_sel, v_sel = _gather_tokens(keys, indices), _gather_tokens(values, indices)
            scores = torch.einsum("bshd,bskhd->bshk", queries[:, start:stop], k_sel)
            return scores, v_sel, "bshk,bskhd->bshd"

        width = latent.shape[1] if selection is None else selection.indices.shape[-1]
        gathered = 0 if selection is None else (self.qk_head_dim + self.v_head_dim)
        return self._attend(chunk_terms, queries.shape[1], width * heads * (1 + gathered), selection,
                            past_len, key_valid, latent.shape[1])  # fmt: skip

    def _expand_kv(self, latent: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head ``(k_nope, values)`` ``[B, T, heads, dim]`` of the latents, through ``kv_b_proj``."""
        kv = self.kv_b_proj(latent)
        self._check_kv_b_heads(kv.shape[-1], heads)
        kv = kv.view(*latent.shape[:2], heads, self.nope_dim + self.v_head_dim)
        k_nope, values = kv.split((self.nope_dim, self.v_head_dim), dim=-1)
        return k_nope, values

    def _absorbed(self, q_nope, q_rope, latent, k_rope, selection, past_len, key_valid) -> torch.Tensor:
        w_uk, w_uv = self._absorb_weights(latent.dtype)
        self._check_kv_b_heads(w_uk.shape[0] * (self.nope_dim + self.v_head_dim), q_nope.shape[2])
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        out_latent = None
        if self._head_prob_sink is None:  # indexer training reads `_attend`'s probabilities
            out_latent = _kernels.sparse_mla(q_latent, q_rope, latent, k_rope, selection, past_len, key_valid, self.scaling)
        if out_latent is not None:
            return torch.einsum("bshc,hvc->bshv", out_latent, w_uv)

        def chunk_terms(start: int, stop: int, indices: torch.Tensor | None):
            q_lat, q_pe = q_latent[:, start:stop], q_rope[:, start:stop]
            if indices is None:
                scores = torch.einsum("bshc,btc->bsht", q_lat, latent) + torch.einsum("bshr,btr->bsht", q_pe, k_rope)
                return scores, latent, "bsht,btc->bshc"
            lat_sel, rope_sel = _gather_tokens(latent, indices), _gather_tokens(k_rope, indices)
            scores = torch.einsum("bshc,bskc->bshk", q_lat, lat_sel) + torch.einsum("bshr,bskr->bshk", q_pe, rope_sel)
            return scores, lat_sel, "bshk,bskc->bshc"

        width = latent.shape[1] if selection is None else selection.indices.shape[-1]
        gathered = 0 if selection is None else self.kv_lora_rank + self.rope_dim
        out_latent = self._attend(chunk_terms, q_latent.shape[1], width * (q_latent.shape[2] + gathered), selection,
                                  past_len, key_valid, latent.shape[1])  # fmt: skip
        return torch.einsum("bshc,hvc->bshv", out_latent, w_uv)

    def _attend(self, chunk_terms, seq, elements_per_query, selection, past_len, key_valid, total) -> torch.Tensor:
        """Masked softmax attention over query chunks sized so about ``_ATTENTION_BUDGET_ELEMENTS`` are alive."""
        chunk = max(1, _ATTENTION_BUDGET_ELEMENTS // max(1, elements_per_query))
        outputs = []
        for start in range(0, seq, chunk):
            stop = min(seq, start + chunk)
            if selection is None:
                scores, values, equation = chunk_terms(start, stop, None)
                allowed = _causal_allowed(start, stop, past_len, total, key_valid, scores.device)
            else:
                scores, values, equation = chunk_terms(start, stop, selection.indices[:, start:stop])
                allowed = selection.valid[:, start:stop]
            allowed = allowed[:, :, None, :]
            scores = (scores.float() * self.scaling).masked_fill(~allowed, torch.finfo(torch.float32).min)
            # Multiplying by `allowed` zeroes rows with no visible key (left-padding queries) instead of NaN.
            probs = scores.softmax(dim=-1) * allowed
            if self._head_prob_sink is not None:
                self._head_prob_sink.append(probs.detach().sum(dim=2))
            outputs.append(torch.einsum(equation, probs.to(values.dtype), values))
        return torch.cat(outputs, dim=1)

    def _absorb_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, C] and W_UV [H, v, C] from ``kv_b_proj`` (dequantized once for FP8 at inference); under
        tensor parallelism only this rank's heads, the rows of its shard of ``kv_b_proj``."""
        if isinstance(self.kv_b_proj, FP8Linear):
            if self._absorb_weight_cache is None or self._absorb_weight_cache[0].device != self.kv_b_proj.weight.device:
                weight = self.kv_b_proj.dequantize_weight(dtype)
                self._absorb_weight_cache = self._split_kv_b(weight)
            return self._absorb_weight_cache
        return self._split_kv_b(_applied_weight(self.kv_b_proj).to(dtype))

    def _split_kv_b(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.view(-1, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return weight[:, : self.nope_dim], weight[:, self.nope_dim :]

    def _local_heads(self, q_width: int) -> int:
        """Heads in a query projection output ``q_width`` wide: all of them, or this rank's share under TP."""
        heads, rest = divmod(q_width, self.qk_head_dim)
        if rest or not 0 < heads <= self.num_heads:
            raise ValueError(
                f"the query projection gave {q_width} features, not a whole number of heads of {self.qk_head_dim}: "
                f"with tensor parallelism, num_attention_heads ({self.num_heads}) must divide by the TP size"
            )
        return heads

    def _check_kv_b_heads(self, kv_width: int, heads: int) -> None:
        # A colwise kv_b_proj whose rows do not split at head boundaries would silently mix heads.
        if kv_width != heads * (self.nope_dim + self.v_head_dim):
            raise ValueError(
                f"kv_b_proj holds {kv_width} output features but the queries have {heads} heads of "
                f"{self.nope_dim}+{self.v_head_dim}: q_b_proj/q_proj and kv_b_proj must be split by heads alike"
            )


def _applied_weight(linear: nn.Module) -> torch.Tensor:
    """The matrix a linear module applies, unmerged PEFT LoRA deltas included: the absorbed path reads the weight
    instead of calling the module, so it would otherwise decode without the adapters that prefill used."""
    weight = linear.weight
    if isinstance(weight, DTensor):
        # Tensor parallelism (transformers 5.17 and 5.23 both hold sharded weights as DTensors): kv_b_proj is split
        # colwise by heads, so the local shard is this rank's heads' W_UK/W_UV, which the local queries need.
        weight = weight.to_local()
    delta = getattr(linear, "get_delta_weight", None)
    if delta is None or getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return weight
    for adapter in linear.active_adapters:
        if adapter in getattr(linear, "lora_A", {}):
            update = delta(adapter)
            if update.shape != weight.shape:
                raise NotImplementedError(
                    f"LoRA adapter {adapter!r} on a tensor-parallel kv_b_proj: its update {tuple(update.shape)} does "
                    f"not match the local weight {tuple(weight.shape)}; merge the adapter before sharding"
                )
            weight = weight + update
    return weight


def _tp_group(weight: torch.Tensor):
    """The process group a tensor-parallel weight is sharded over (its DTensor mesh)."""
    if not isinstance(weight, DTensor):
        raise RuntimeError("attention heads are split but o_proj's weight is no DTensor: cannot find the TP group")
    return weight.device_mesh.get_group()


def _gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tokens`` [B, T, *rest], ``indices`` [B, S, K] -> [B, S, K, *rest]."""
    batch, seq, k = indices.shape
    flat = indices.reshape(batch, seq * k)
    gathered = tokens[torch.arange(batch, device=tokens.device)[:, None], flat]
    return gathered.view(batch, seq, k, *tokens.shape[2:])


def _causal_allowed(start, stop, past_len, total, key_valid, device) -> torch.Tensor:
    query_pos = past_len + torch.arange(start, stop, device=device)
    allowed = torch.arange(total, device=device)[None, None, :] <= query_pos[None, :, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed
