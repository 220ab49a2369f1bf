"""Configuration of DeepSeek-V3.2 (MLA + DSA lightning indexer + DeepSeekMoE + MTP + block FP8).

The class reads the official Hugging Face ``config.json`` unchanged and writes it back in the same form, so a
checkpoint saved by this package loads in transformers' native model, vLLM and SGLang.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

__all__ = ["DeepseekV32Config", "BLOCK_FP8_QUANT_METHOD"]

BLOCK_FP8_QUANT_METHOD = "fp8"
_SCORING_FUNCS = ("sigmoid", "softmax")
_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
_ROPE_TYPES = ("default", "yarn")
_INDEXER_TRAINING_STAGES = (None, "dense_warmup", "sparse")
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


class DeepseekV32Config(PretrainedConfig):
    r"""Configuration of a DeepSeek-V3.2 model. Defaults are those of the official 671B checkpoint.

    Besides the official keys (see the official ``config.json``), two keys choose how the indexer scores:

    Args:
        index_fp8 (`bool`, defaults to `True`):
            Score the lightning indexer exactly like DeepSeek's code: Hadamard rotation, then e4m3 quantization of
            queries and keys in 128-blocks with power-of-two (ue8m0) scales. Emulated where there is no FP8
            hardware. `False` scores in full precision (what transformers' native model does).
        indexer_rope_interleave (`bool`, defaults to `False`):
            Rotate interleaved pairs in the indexer. DeepSeek's fixed indexer (2025-11-18) rotates half-split pairs
            while MLA rotates interleaved pairs; the first V3.2-Exp release rotated pairs in both.
        mtp_loss_weight (`float`, defaults to `0.0`):
            Weight of the MTP head's loss (cross-entropy on the token two ahead) added to the LM loss when labels
            are given. DeepSeek trained with 0.3, then 0.1; 0 (off) suits plain fine-tuning.
        moe_aux_loss_alpha (`float`, defaults to `0.0`):
            Weight of DeepSeek-V3's sequence-wise balance loss, computed by every MoE layer in training mode, reported
            as `aux_loss` and added to the loss with this weight. DeepSeek-V3 used 1e-4 next to the
            auxiliary-loss-free bias update (`training.DeepseekV32BiasUpdateCallback`); 0 turns it off.
        indexer_training (`str`, *optional*):
            Training stage of the lightning indexer (DeepSeek-V3.2 report). `None`: inference behaviour, no indexer
            loss. `"dense_warmup"`: main attention runs dense over all causal tokens and, in training mode, the indexer
            learns KL(main attention || softmax(index scores)) over all of them (freeze the rest with
            `indexer_training.freeze_for_indexer_warmup`). `"sparse"`: attention stays sparse and the KL is restricted
            to the selected tokens. In both stages the indexer sees detached inputs, so only its own loss trains it.
        indexer_loss_coef (`float`, defaults to `1.0`):
            Weight of that KL loss (reported as `indexer_loss`) in the total loss.
        quantization_config (`dict`, *optional*):
            The official block-FP8 description (``quant_method="fp8"``, ``weight_block_size=[128, 128]``). It is
            handled by this package's own `FP8Linear` (stored as `fp8_quantization_config`, so transformers'
            quantizers stay out of the way) and written back under its official name on save.

    Example:

    ```python
    >>> from modeling_deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
    >>> config = DeepseekV32Config.from_preset("tiny")
    >>> model = DeepseekV32ForCausalLM(config)
    ```
    """

    model_type = "deepseek_v32"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
    # Tensor parallelism (`from_pretrained(tp_plan="auto")`). Attention splits by heads: the per-head projections
    # (q_b_proj, or q_proj without a query LoRA, and kv_b_proj) colwise, o_proj rowwise (one all-reduce); the
    # attention module takes its head count from their local outputs and its absorbed path reads kv_b_proj's local
    # shard. The latent projections (q_a_proj, kv_a_proj_with_mqa), their norms and the indexer stay replicated: all
    # heads share them, and the indexer's weighted sum over its heads needs every head. num_attention_heads must
    # divide by the TP size. The dense MLP and the shared experts split colwise/rowwise (one all-reduce each).
    # Routed experts are split by expert (expert parallelism, our own style: transformers' EP styles shard fused
    # 3-D expert tensors, ours are per-expert modules): rank r keeps and loads experts [r*E/W, (r+1)*E/W), routing
    # stays replicated, and the routed partial sums are all-reduced (modeling_deepseek_v32/expert_parallel.py);
    # n_routed_experts must divide by the TP size. examples/tp_inference_check.py compares logits with one device.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "deepseek_v32_local_experts",
    }

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 7168,
        intermediate_size: int = 18432,
        moe_intermediate_size: int = 2048,
        num_hidden_layers: int = 61,
        num_nextn_predict_layers: int = 1,
        num_attention_heads: int = 128,
        num_key_value_heads: int | None = None,
        n_shared_experts: int = 1,
        n_routed_experts: int = 256,
        routed_scaling_factor: float = 2.5,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = 1536,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        qk_nope_head_dim: int = 128,
        topk_method: str = "noaux_tc",
        n_group: int = 8,
        topk_group: int = 4,
        num_experts_per_tok: int = 8,
        moe_layer_freq: int = 1,
        first_k_dense_replace: int = 3,
        norm_topk_prob: bool = True,
        scoring_func: str = "sigmoid",
        hidden_act: str = "silu",
        max_position_embeddings: int = 163840,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        index_n_heads: int = 64,
        index_head_dim: int = 128,
        index_topk: int = 2048,
        index_fp8: bool = True,
        indexer_rope_interleave: bool = False,
        mtp_loss_weight: float = 0.0,
        moe_aux_loss_alpha: float = 0.0,
        indexer_training: str | None = None,
        indexer_loss_coef: float = 1.0,
        quantization_config: dict | None = None,
        fp8_quantization_config: dict | None = None,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.num_attention_heads = num_attention_heads
        # MLA has no grouped K/V; the key is kept because the official config carries it.
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        # DeepSeek-V2-Lite style configs write 0 or null for "no q LoRA".
        self.q_lora_rank = q_lora_rank or None
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        # transformers' rotary helpers read `head_dim`; only the rope slice is rotated.
        self.head_dim = qk_rope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.index_n_heads = index_n_heads
        self.index_head_dim = index_head_dim
        self.index_topk = index_topk
        self.index_fp8 = index_fp8
        self.indexer_rope_interleave = indexer_rope_interleave
        self.mtp_loss_weight = mtp_loss_weight
        self.moe_aux_loss_alpha = moe_aux_loss_alpha
        self.indexer_training = indexer_training
        self.indexer_loss_coef = indexer_loss_coef
        self.rope_parameters = _standardize_rope(rope_parameters, rope_scaling, rope_theta)
        self.fp8_quantization_config = _take_block_fp8(quantization_config, fp8_quantization_config, kwargs)
        kwargs.pop("head_dim", None)
        kwargs.pop("qk_head_dim", None)
        # Our checks first: transformers' own (run by the base __init__) name derived fields like `head_dim`.
        self.validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------------------
    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @property
    def is_block_fp8(self) -> bool:
        """Whether linear weights are stored as block-scaled FP8 (official checkpoint format)."""
        return self.fp8_quantization_config is not None

    @property
    def fp8_block_size(self) -> tuple[int, int]:
        return tuple(self.fp8_quantization_config.get("weight_block_size", (128, 128)))

    @property
    def softmax_scale(self) -> float:
        """Attention scale of MLA: qk_head_dim^-0.5 times the YaRN mscale squared (official formula)."""
        scale = self.qk_head_dim**-0.5
        rope = self.rope_parameters
        if rope["rope_type"] == "yarn" and rope.get("mscale_all_dim"):
            mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0 if rope["factor"] > 1 else 1.0
            scale = scale * mscale * mscale
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        return self._official_keys(output)

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        return self._official_keys(output)

    def _official_keys(self, output: dict[str, Any]) -> dict[str, Any]:
        """Write the keys the way the official config.json and other runtimes spell them."""
        for derived in ("qk_head_dim", "head_dim"):
            output.pop(derived, None)
        fp8 = output.pop("fp8_quantization_config", None)
        if fp8 is not None and output.get("quantization_config") is None:
            output["quantization_config"] = dict(fp8)
        rope = dict(self.rope_parameters)
        output["rope_parameters"] = rope
        # vLLM, SGLang and DeepSeek's own tools read the legacy spelling.
        output["rope_theta"] = rope["rope_theta"]
        if rope["rope_type"] != "default":
            legacy = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
            output["rope_scaling"] = {"type": rope["rope_type"], **legacy}
        else:
            output.pop("rope_scaling", None)
        return output

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DeepseekV32Config":
        """Build a config from a preset shipped in ``modeling_deepseek_v32.configuration.presets``
        (``"official"``, ``"bench"``, ``"tiny"``); keyword arguments override preset values."""
        from . import load_preset_dict

        return cls(**{**load_preset_dict(name), **overrides})

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message when the shapes or routing options cannot work."""
        errors = []

        def positive(*names: str) -> None:
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    errors.append(f"`{name}` must be a positive integer, got {value!r}")

        positive(
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "max_position_embeddings", "index_n_heads", "index_head_dim",
        )  # fmt: skip
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0):
            errors.append(f"`q_lora_rank` must be a positive integer, 0 or null, got {self.q_lora_rank!r}")
        if isinstance(self.qk_rope_head_dim, int) and self.qk_rope_head_dim % 2:
            errors.append(f"`qk_rope_head_dim` must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if not isinstance(self.index_topk, int) or self.index_topk < 1:
            errors.append(f"`index_topk` must be an integer >= 1, got {self.index_topk!r}")
        if isinstance(self.index_head_dim, int) and isinstance(self.qk_rope_head_dim, int):
            if self.index_head_dim < self.qk_rope_head_dim:
                errors.append(
                    f"`index_head_dim` ({self.index_head_dim}) must be >= `qk_rope_head_dim` ({self.qk_rope_head_dim}): "
                    "the indexer rotates its first qk_rope_head_dim dims"
                )
            if self.index_fp8 and self.index_head_dim & (self.index_head_dim - 1):
                errors.append(
                    f"`index_head_dim` must be a power of two for the Hadamard rotation of the FP8 indexer, got "
                    f"{self.index_head_dim} (set `index_fp8=False` to score without it)"
                )
            if self.index_fp8 and self.index_head_dim > 128 and self.index_head_dim % 128:
                errors.append(f"`index_head_dim` ({self.index_head_dim}) must split into 128-wide FP8 blocks")
        if self.scoring_func not in _SCORING_FUNCS:
            errors.append(f"unknown `scoring_func` {self.scoring_func!r}; expected one of {_SCORING_FUNCS}")
        if self.topk_method not in _TOPK_METHODS:
            errors.append(f"unknown `topk_method` {self.topk_method!r}; expected one of {_TOPK_METHODS}")
        if self.hidden_act not in ("silu", "swish"):
            errors.append(f"`hidden_act` must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        if self.moe_layer_freq != 1:
            errors.append(f"`moe_layer_freq` other than 1 is not supported, got {self.moe_layer_freq!r}")
        if not isinstance(self.first_k_dense_replace, int) or not 0 <= self.first_k_dense_replace:
            errors.append(f"`first_k_dense_replace` must be an integer >= 0, got {self.first_k_dense_replace!r}")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            errors.append(f"`num_nextn_predict_layers` must be an integer >= 0, got {self.num_nextn_predict_layers!r}")
        if not isinstance(self.mtp_loss_weight, (int, float)) or self.mtp_loss_weight < 0:
            errors.append(f"`mtp_loss_weight` must be a number >= 0, got {self.mtp_loss_weight!r}")
        for name in ("moe_aux_loss_alpha", "indexer_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                errors.append(f"`{name}` must be a number >= 0, got {value!r}")
        if self.indexer_training not in _INDEXER_TRAINING_STAGES:
            errors.append(
                f"unknown `indexer_training` {self.indexer_training!r}; expected one of {_INDEXER_TRAINING_STAGES}"
            )
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            errors.append(f"`n_shared_experts` must be an integer >= 0, got {self.n_shared_experts!r}")
        errors.extend(self._routing_errors())
        errors.extend(_rope_errors(self.rope_parameters))
        if self.is_block_fp8:
            errors.extend(_block_fp8_errors(self.fp8_quantization_config))
        if errors:
            raise ValueError("Invalid DeepseekV32Config:\n  - " + "\n  - ".join(errors))

    def _routing_errors(self) -> list[str]:
        has_moe = self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0
        if not has_moe:
            return []
        errors = []
        for name in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                errors.append(f"`{name}` must be a positive integer, got {value!r}")
        if errors:
            return errors
        if self.n_routed_experts % self.n_group:
            errors.append(f"`n_routed_experts` ({self.n_routed_experts}) must be divisible by `n_group` ({self.n_group})")
        if self.topk_group > self.n_group:
            errors.append(f"`topk_group` ({self.topk_group}) must be <= `n_group` ({self.n_group})")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > min(reachable, self.n_routed_experts):
            errors.append(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) exceeds the {reachable} experts reachable in "
                f"the {self.topk_group} kept groups of {self.n_routed_experts // self.n_group} experts"
            )
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            errors.append("`topk_method='noaux_tc'` needs `scoring_func='sigmoid'` (bias-corrected sigmoid routing)")
        return errors


def _standardize_rope(rope_parameters: dict | None, rope_scaling: dict | None, rope_theta: float | None) -> dict:
    """Merge the v5 `rope_parameters` and the legacy `rope_theta` / `rope_scaling` keys into one dict."""
    params = dict(rope_parameters or {})
    if rope_scaling:
        legacy = dict(rope_scaling)
        kind = legacy.pop("type", None) or legacy.pop("rope_type", None)
        params.setdefault("rope_type", kind)
        for key, value in legacy.items():
            params.setdefault(key, value)
    if rope_theta is not None:
        params.setdefault("rope_theta", rope_theta)
    params.setdefault("rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
    if params["rope_type"] == "yarn":
        for key, value in _YARN_DEFAULTS.items():
            params.setdefault(key, value)
    return params


def _rope_errors(rope: dict) -> list[str]:
    if rope["rope_type"] not in _ROPE_TYPES:
        return [f"unsupported rope type {rope['rope_type']!r}; expected one of {_ROPE_TYPES}"]
    if rope["rope_type"] != "yarn":
        return []
    errors = []
    for key in ("factor", "original_max_position_embeddings"):
        value = rope.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            errors.append(f"YaRN `rope_scaling.{key}` must be a positive number, got {value!r}")
    if rope["beta_fast"] <= rope["beta_slow"]:
        errors.append(f"YaRN needs beta_fast > beta_slow, got {rope['beta_fast']} and {rope['beta_slow']}")
    return errors


def _take_block_fp8(quantization_config: Any, fp8_quantization_config: dict | None, kwargs: dict) -> dict | None:
    """Keep the official block-FP8 description to ourselves; hand any other quantization to transformers."""
    if fp8_quantization_config is not None:
        return dict(fp8_quantization_config)
    if quantization_config is None:
        return None
    as_dict = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    if as_dict.get("quant_method") == BLOCK_FP8_QUANT_METHOD and not as_dict.get("dequantize", False):
        return dict(as_dict)
    kwargs["quantization_config"] = quantization_config
    return None


def _block_fp8_errors(fp8: dict) -> list[str]:
    errors = []
    if list(fp8.get("weight_block_size", [128, 128])) != [128, 128]:
        errors.append(f"block FP8 needs `weight_block_size` [128, 128], got {fp8.get('weight_block_size')!r}")
    if fp8.get("fmt", "e4m3") != "e4m3":
        errors.append(f"block FP8 supports `fmt` 'e4m3' only, got {fp8.get('fmt')!r}")
    if fp8.get("activation_scheme", "dynamic") != "dynamic":
        errors.append(f"block FP8 supports `activation_scheme` 'dynamic' only, got {fp8.get('activation_scheme')!r}")
    return errors
