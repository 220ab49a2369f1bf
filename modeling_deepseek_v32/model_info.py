"""Sizes of a DeepSeek-V3.2 config without building its weights: parameters (total / active per token) and cache
bytes per token against a dense-attention cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration import DeepseekV32Config
from .indexer import INDEX_FP8_BLOCK


@dataclass
class ModelSizes:
    total_params: int
    mtp_params: int
    active_params: int
    cache_bytes_per_token: int
    dense_cache_bytes_per_token: int


def _expert_params(config: DeepseekV32Config) -> int:
    return 3 * config.hidden_size * config.moe_intermediate_size


def cache_bytes_per_token(config: DeepseekV32Config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes ``DeepseekV32Cache`` holds per token over the decoder layers: latent + rope key in ``dtype``, and the
    indexer key (e4m3 + one fp32 scale per 128-block with ``index_fp8``, else ``dtype``)."""
    width = torch.empty((), dtype=dtype).element_size()
    mla = (config.kv_lora_rank + config.qk_rope_head_dim) * width
    if config.index_fp8:
        blocks = -(-config.index_head_dim // min(INDEX_FP8_BLOCK, config.index_head_dim))
        index = config.index_head_dim + 4 * blocks
    else:
        index = config.index_head_dim * width
    return (mla + index) * config.num_hidden_layers


def dense_cache_bytes_per_token(config: DeepseekV32Config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes per token of a cache holding expanded per-head K and V, as dense multi-head attention would."""
    width = torch.empty((), dtype=dtype).element_size()
    per_layer = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * width
    return per_layer * config.num_hidden_layers


def model_sizes(config: DeepseekV32Config, dtype: torch.dtype = torch.bfloat16) -> ModelSizes:
    """Parameter counts from a meta-device model (no memory), so this works for the 671B config too."""
    from .modeling_deepseek_v32 import DeepseekV32ForCausalLM

    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for layer in model.model.mtp_layers for p in layer.parameters())
    moe_layers = sum(1 for idx in range(config.num_hidden_layers) if config.is_moe_layer(idx))
    idle_experts = max(0, config.n_routed_experts - config.num_experts_per_tok)
    active = total - mtp - moe_layers * idle_experts * _expert_params(config)
    return ModelSizes(
        total_params=total,
        mtp_params=mtp,
        active_params=active,
        cache_bytes_per_token=cache_bytes_per_token(config, dtype),
        dense_cache_bytes_per_token=dense_cache_bytes_per_token(config, dtype),
    )
