"""DeepSeek-V3.2 decoder, causal LM head and MTP module as transformers ``PreTrainedModel`` classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .attention import DeepseekV32Attention
from .cache import DeepseekV32Cache
from .configuration import DeepseekV32Config
from .expert_parallel import has_expert_shards, without_other_ranks_experts
from .fp8 import FP8Linear, quantize_weight_blockwise
from .layers import DeepseekV32MLP, DeepseekV32RMSNorm
from .moe import DeepseekV32MoE, DeepseekV32TopkRouter
from .moe_balancing import layer_mean
from .mtp_generation import mtp_generate
from .rope import DeepseekV32RotaryEmbedding, yarn_inverse_frequencies
from .static_decode import DeepseekV32StaticCache, static_forward
from .weights import check_loading_info

logger = logging.get_logger(__name__)

__all__ = [
    "DeepseekV32PreTrainedModel",
    "DeepseekV32Model",
    "DeepseekV32ForCausalLM",
    "DeepseekV32DecoderLayer",
    "DeepseekV32MTPLayer",
]


@dataclass
class DeepseekV32CausalLMOutput(CausalLMOutputWithPast):
    """Causal LM output. Side losses are reported separately for logging, each without its weight, and are already
    added to ``loss`` with it: ``mtp_loss`` (MTP head's cross-entropy on tokens two ahead, ``config.mtp_loss_weight``),
    ``aux_loss`` (sequence-wise MoE balance loss averaged over MoE layers, ``config.moe_aux_loss_alpha``) and
    ``indexer_loss`` (the lightning indexer's KL to the main attention averaged over layers,
    ``config.indexer_loss_coef``). The last two exist only in training mode with their option on."""

    mtp_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    indexer_loss: torch.FloatTensor | None = None


class DeepseekV32DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: sparse MLA then a dense MLP (first ``first_k_dense_replace`` layers) or DeepSeekMoE."""

    def __init__(self, config: DeepseekV32Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DeepseekV32Attention(config, layer_idx)
        self.mlp = DeepseekV32MoE(config) if config.is_moe_layer(layer_idx) else DeepseekV32MLP(config)
        self.input_layernorm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        past_key_values: DeepseekV32Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(hidden_states), cos, sin, key_valid, past_key_values)
        hidden_states = hidden_states + attn_out
        normed = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, DeepseekV32MoE):
            # Padding is still routed (its output is ignored) but must not count in expert loads or the balance loss.
            token_valid = None if key_valid is None else key_valid[:, -hidden_states.shape[1] :]
            return hidden_states + self.mlp(normed, token_valid)
        return hidden_states + self.mlp(normed)


class DeepseekV32SharedHead(nn.Module):
    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.norm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class DeepseekV32MTPLayer(DeepseekV32DecoderLayer):
    """Multi-token prediction module, stored as checkpoint layer ``num_hidden_layers + depth``.

    Maps the main model's final (normed) hidden state at position t and the token at t+1 to logits for t+2:
    ``shared_head(block(eh_proj([enorm(embed(token_{t+1})); hnorm(h_t)])))``.
    """

    def __init__(self, config: DeepseekV32Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = DeepseekV32SharedHead(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        next_input_ids: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        past_key_values: DeepseekV32Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits, mtp_hidden_states)``; the hidden states feed a further MTP depth if there is one."""
        embedded = self.enorm(self.embed_tokens(next_input_ids.to(self.embed_tokens.weight.device)))
        hidden_states = self.hnorm(hidden_states.to(embedded.device))
        hidden_states = self.eh_proj(torch.cat((embedded, hidden_states), dim=-1))
        hidden_states = super().forward(hidden_states, cos, sin, key_valid, past_key_values)
        return self.shared_head.head(self.shared_head.norm(hidden_states)), hidden_states


class DeepseekV32PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV32Config
    config: DeepseekV32Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV32DecoderLayer", "DeepseekV32MTPLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _supports_sdpa = False
    _supports_flash_attn = False
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, FP8Linear):
            if not getattr(module.weight, "_is_hf_initialized", False):
                weight, scale = quantize_weight_blockwise(
                    torch.randn(module.weight.shape, device=module.weight.device) * std, module.block_size
                )
                init.copy_(module.weight, weight)
                init.copy_(module.weight_scale_inv, scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DeepseekV32TopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, DeepseekV32RotaryEmbedding):
            init.copy_(module.inv_freq, yarn_inverse_frequencies(self.config))
        else:
            super()._init_weights(module)

    def routing_stats(self, accumulated: bool = False):
        """Per-expert loads of every MoE router in the last forward, as ``training.RoutingStats`` (``.loads``,
        ``.imbalance``, ``.summary()``); ``accumulated=True`` gives those summed since the last bias update."""
        from .training import routing_stats  # the Trainer machinery is imported only when asked for

        return routing_stats(self, accumulated)

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses checkpoints with missing tensors (FP8 scales included)
        or FP8 tensors without a ``quantization_config``, instead of silently initializing or mis-casting them.
        Pass ``allow_missing_weights=True`` to accept missing tensors (they are randomly initialized)."""
        wants_info = kwargs.pop("output_loading_info", False)
        # Mismatched shapes are reported by our own check, which names the tensors.
        allow_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(
            *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        check_loading_info(model, info, allow_missing_weights, allow_mismatched)
        return (model, info) if wants_info else model

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        super()._adjust_missing_and_unexpected_keys(loading_info)
        # Under expert parallelism each rank skips the other ranks' experts on purpose (expert_parallel.py).
        loading_info.unexpected_keys = without_other_ranks_experts(self, loading_info.unexpected_keys)

    def save_pretrained(self, *args, **kwargs):
        if has_expert_shards(self):
            # The gathered TP state dict would silently lack the experts other ranks hold.
            raise NotImplementedError(
                "this model's routed experts are split over the tensor-parallel ranks (expert parallelism), and "
                "saving them is not supported; save from a model loaded without tp_plan"
            )
        return super().save_pretrained(*args, **kwargs)


class DeepseekV32Model(DeepseekV32PreTrainedModel):
    """The decoder stack. ``layers`` holds the ``num_hidden_layers`` blocks followed by the MTP layers, so every
    tensor keeps its official checkpoint name (``model.layers.{num_hidden_layers}.eh_proj`` ...)."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        num_layers = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DeepseekV32DecoderLayer(config, idx) for idx in range(num_layers)]
            + [DeepseekV32MTPLayer(config, num_layers + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekV32RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.layers[self.config.num_hidden_layers :]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DeepseekV32Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DeepseekV32Cache(self.config, num_layers=len(self.layers))
        if isinstance(past_key_values, DeepseekV32StaticCache):  # fixed shapes, CUDA-graph decode (static_decode.py)
            return static_forward(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                  output_hidden_states)  # fmt: skip
        if past_key_values is not None and not isinstance(past_key_values, DeepseekV32Cache):
            raise TypeError(
                f"DeepSeek-V3.2 caches latents and indexer keys in a `DeepseekV32Cache`, got {type(past_key_values).__name__}"
            )
        positions = self.positions(hidden_states.shape[:2], attention_mask, position_ids, past_key_values)
        position_ids, key_valid = positions
        cos, sin = self.rotary_emb(position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.decoder_layers:
            hidden_states = layer(hidden_states, cos, sin, key_valid=key_valid, past_key_values=past_key_values)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    def positions(
        self,
        batch_and_seq: tuple[int, int],
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: DeepseekV32Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate the inputs' lengths and return ``(position_ids [B, S], key_valid [B, T] or None)``.

        Positions count only real tokens, so a left-padded row gets the same RoPE angles as the unpadded one.
        """
        batch, seq = batch_and_seq
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past_len + seq
        device = self.embed_tokens.weight.device
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"input of {total} tokens (cached {past_len} + new {seq}) exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        key_valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    "DeepSeek-V3.2 takes a 2-D padding mask [batch, cached + new tokens]; the causal and sparse "
                    f"masks are built internally. Got a {attention_mask.dim()}-D mask"
                )
            if attention_mask.shape != (batch, total):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {total})")
            if not bool(attention_mask.all()):
                key_valid = attention_mask.to(device=device, dtype=torch.bool)
        if position_ids is None:
            if key_valid is not None:
                position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, total, device=device).expand(batch, -1)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(batch, -1)
        return position_ids.to(device), key_valid

    def mtp_forward(
        self,
        hidden_states: torch.Tensor,
        next_input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        depth: int = 0,
        key_valid: torch.Tensor | None = None,
        past_key_values: DeepseekV32Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP depth ``depth`` on final hidden states ``h_t`` and tokens ``t+1``; returns logits for ``t+2``
        and the MTP block's hidden states. ``position_ids`` rotate the MTP block's attention; only their differences
        matter, so the positions of ``h_t`` (as vLLM uses) and of ``t+1`` give the same result."""
        if depth >= len(self.mtp_layers):
            raise ValueError(f"the model has {len(self.mtp_layers)} MTP layers; depth {depth} does not exist")
        cos, sin = self.rotary_emb(position_ids)
        return self.mtp_layers[depth](hidden_states, next_input_ids, cos, sin, key_valid, past_key_values)


def _share_of_label_tokens(labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float:
    """This batch's predicted tokens over ``num_items_in_batch`` (1 without it); counted as ``Trainer`` counts them."""
    if num_items_in_batch is None:
        return 1.0
    return labels[..., 1:].ne(-100).sum() / torch.as_tensor(num_items_in_batch, device=labels.device)


class DeepseekV32ForCausalLM(DeepseekV32PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # with config.base_model_tp_plan for tp_plan="auto"

    def __init__(self, config: DeepseekV32Config):
        super().__init__(config)
        self.model = DeepseekV32Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DeepseekV32Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> DeepseekV32CausalLMOutput:
        """Causal LM forward. ``labels`` give the shifted cross-entropy (``-100`` ignored; ``num_items_in_batch``
        from ``Trainer`` normalizes it under gradient accumulation); with ``config.mtp_loss_weight > 0`` the MTP
        loss is added (and reported as ``mtp_loss``). ``logits_to_keep`` limits logits to the last N positions (or
        the given indices). In training mode the MoE balance loss (``config.moe_aux_loss_alpha``) and the indexer loss
        (``config.indexer_training``) are added too; under ``num_items_in_batch`` each is weighted by this batch's share
        of the label tokens, so gradient accumulation sums them to a token-weighted mean like the cross-entropy."""
        self._take_side_losses()  # drop what an uncollected forward (a bare `self.model(...)`) left behind
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])
        loss = mtp_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if self.config.mtp_loss_weight and len(self.model.mtp_layers):
                mtp_loss = self.mtp_loss(hidden_states, input_ids, labels, attention_mask, position_ids, **kwargs)
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        aux_loss, indexer_loss = self._take_side_losses()
        if loss is not None and (aux_loss is not None or indexer_loss is not None):
            share = _share_of_label_tokens(labels, kwargs.get("num_items_in_batch"))
            share = share.to(loss.device) if torch.is_tensor(share) else share
            if aux_loss is not None:
                loss = loss + (self.config.moe_aux_loss_alpha * share) * aux_loss.to(loss.device)
            if indexer_loss is not None:
                loss = loss + (self.config.indexer_loss_coef * share) * indexer_loss.to(loss.device)
        return DeepseekV32CausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            mtp_loss=mtp_loss,
            aux_loss=aux_loss,
            indexer_loss=indexer_loss,
        )

    def _take_side_losses(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Collect and clear the losses that MoE layers (balance) and attention layers (indexer KL) stashed during
        this forward; each is averaged over the layers that produced one."""
        balance, indexer = [], []
        for layer in self.model.layers:
            for module, name, found in ((layer.mlp, "balance_loss", balance), (layer.self_attn, "indexer_loss", indexer)):
                value = getattr(module, name, None)
                if value is not None:
                    found.append(value)
                    setattr(module, name, None)
        return layer_mean(balance), layer_mean(indexer)

    def mtp_loss(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.LongTensor | None,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Cross-entropy of the first MTP head: from ``h_t`` and token ``t+1`` it predicts ``labels[t+2]``."""
        if input_ids is None:
            raise ValueError("the MTP loss needs `input_ids` (the MTP head embeds the next token)")
        batch, seq = input_ids.shape
        positions, key_valid = self.model.positions((batch, seq), attention_mask, position_ids, None)
        if key_valid is not None:
            # A pair (h_t, token t+1) is real only if both positions are.
            key_valid = key_valid[:, :-1] & key_valid[:, 1:]
        logits, _ = self.model.mtp_forward(hidden_states[:, :-1], input_ids[:, 1:], positions[:, :-1], 0, key_valid)
        # The loss shifts labels by one more, so position t is scored against labels[t + 2].
        return self.loss_function(logits=logits, labels=labels[:, 1:], vocab_size=self.config.vocab_size, **kwargs)

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        use_mtp: bool | None = None,
        num_mtp_draft_tokens: int | None = None,
        **kwargs,
    ):
        """``GenerationMixin.generate``, plus ``use_mtp=True``: self-speculative decoding with the MTP module
        (greedy or sampling, any batch size; ``num_mtp_draft_tokens`` drafts per step, default 1). With
        ``return_dict_in_generate=True`` the output carries ``mtp_acceptance`` and ``tokens_per_forward``."""
        base_config = generation_config if generation_config is not None else self.generation_config
        if use_mtp is None:
            use_mtp = bool(getattr(base_config, "use_mtp", False))
        if not use_mtp:
            if getattr(base_config, "use_mtp", None):
                kwargs["use_mtp"] = False  # keep transformers' own (batch-1, no-FP8-scale) MTP path out
            return super().generate(
                inputs, generation_config=generation_config, logits_processor=logits_processor,
                stopping_criteria=stopping_criteria, streamer=streamer, **kwargs,
            )  # fmt: skip
        if getattr(base_config, "cache_implementation", None) == "static" or kwargs.get("cache_implementation") == "static":
            logger.warning_once("use_mtp=True decodes with the dynamic cache; cache_implementation='static' is ignored")
            kwargs.pop("cache_implementation", None)
        if num_mtp_draft_tokens is None:
            num_mtp_draft_tokens = getattr(base_config, "num_mtp_draft_tokens", None) or 1
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("use_mtp=True needs `input_ids`")
        attention_mask = model_kwargs.pop("attention_mask", None)
        self._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device)
        if config.max_new_tokens is not None:
            config.max_length = input_ids.shape[1] + config.max_new_tokens
        processors = self._get_logits_processor(
            generation_config=config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=None, logits_processor=logits_processor or LogitsProcessorList(),
            device=input_ids.device, model_kwargs=model_kwargs,
        )  # fmt: skip
        criteria = self._get_stopping_criteria(
            config, stopping_criteria or StoppingCriteriaList(), tokenizer=model_kwargs.pop("tokenizer", None)
        )
        ignored = sorted(k for k, v in model_kwargs.items() if v is not None and k not in ("use_cache",))
        if ignored:
            logger.warning_once(f"use_mtp=True ignores these generate arguments: {ignored}")
        sequences, _, output = mtp_generate(
            self, input_ids, attention_mask, config, processors, criteria, num_mtp_draft_tokens, streamer
        )
        return output if config.return_dict_in_generate else sequences

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """Give ``generate`` a ``DeepseekV32Cache``: transformers' own caches cannot hold latents + indexer keys."""
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation == "static":
                # Fixed-capacity latent cache with CUDA-graph decode steps: greedy search and sampling only.
                if generation_mode not in ("greedy_search", "sample"):
                    raise ValueError(f"cache_implementation='static' supports greedy search and sampling, not {generation_mode}")
                model_kwargs["past_key_values"] = DeepseekV32StaticCache(self, batch_size, max_cache_length + 1)
                return
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported: DeepSeek-V3.2 "
                    "uses its own latent cache (DeepseekV32Cache) or 'static' (DeepseekV32StaticCache)"
                )
            model_kwargs["past_key_values"] = DeepseekV32Cache(self.config, num_layers=len(self.model.layers))
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
