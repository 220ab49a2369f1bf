"""DeepseekV32Config: official JSON in and out unchanged, block-FP8 kept away from transformers' quantizers,
both RoPE spellings, round trips (ours, AutoConfig, transformers' native class) and every validation error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig

import modeling_deepseek_v32  # noqa: F401  (registers the classes with the Auto* factories)
from modeling_deepseek_v32.configuration import DeepseekV32Config, load_preset_dict

# The official DeepSeek-V3.2 quantization block, spelled out here rather than read from the preset.
OFFICIAL_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}
OFFICIAL_YARN = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
}
# Keys the loaded JSON is stored under a different (transformers v5) name or as a derived structure.
_RENAMED = ("torch_dtype", "rope_scaling", "rope_theta", "quantization_config")


def _official_raw() -> dict:
    return load_preset_dict("official")


# ------------------------------------------------------------------------------------------------------------------
# Official preset: every key survives loading
# ------------------------------------------------------------------------------------------------------------------
def test_official_preset_is_the_official_config():
    raw = _official_raw()
    # Spot-check the preset itself against the notes (so a corrupted preset is caught, not only a lossy loader).
    expected = {
        "model_type": "deepseek_v32", "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3,
        "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "n_group": 8, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "norm_topk_prob": True, "moe_intermediate_size": 2048, "intermediate_size": 18432, "vocab_size": 129280,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
    }  # fmt: skip
    for key, value in expected.items():
        assert raw[key] == value, key
    assert raw["rope_scaling"] == {**OFFICIAL_YARN, "type": "yarn"}
    assert raw["quantization_config"] == OFFICIAL_QUANT


def test_official_preset_carries_every_key_listed_in_the_notes():
    raw = _official_raw()
    assert raw.get("topk_group") == 4
    assert raw.get("v_head_dim") == 128


def test_official_json_loads_unchanged():
    raw = _official_raw()
    config = DeepseekV32Config(**raw)
    for key, value in raw.items():
        if key in _RENAMED:
            continue
        assert hasattr(config, key), f"official key {key!r} lost"
        assert getattr(config, key) == value, f"{key}: {getattr(config, key)!r} != {value!r}"
    # Keys without their own attribute: the dtype (renamed by transformers v5), RoPE and the FP8 description.
    assert config.dtype == torch.bfloat16
    assert config.rope_theta == 10000
    assert config.rope_parameters == {"rope_type": "yarn", "rope_theta": 10000, **OFFICIAL_YARN}
    # Official values the file leaves to the defaults.
    assert config.topk_group == 4
    assert config.v_head_dim == 128
    assert config.qk_head_dim == 192


def test_block_fp8_kept_out_of_transformers_quantizers():
    config = DeepseekV32Config(**_official_raw())
    assert config.is_block_fp8
    assert config.fp8_block_size == (128, 128)
    assert config.fp8_quantization_config == OFFICIAL_QUANT
    # transformers' from_pretrained dispatches on `config.quantization_config`: it must not see one.
    assert getattr(config, "quantization_config", None) is None
    # A config without quantization is not FP8.
    assert not DeepseekV32Config.from_preset("tiny").is_block_fp8


def test_quantization_config_written_back_verbatim(tmp_path):
    raw = _official_raw()
    config = DeepseekV32Config(**raw)
    as_dict = config.to_dict()
    assert as_dict["quantization_config"] == OFFICIAL_QUANT
    assert "fp8_quantization_config" not in as_dict
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == OFFICIAL_QUANT
    assert "fp8_quantization_config" not in saved
    # Every official key is written back with its official value (torch_dtype is spelled `dtype` by v5).
    for key, value in raw.items():
        if key == "torch_dtype":
            assert saved["dtype"] == value
            continue
        assert key in saved, f"official key {key!r} missing from the saved config.json"
        assert saved[key] == value, f"{key}: saved {saved[key]!r} != official {value!r}"
    for derived in ("head_dim", "qk_head_dim"):
        assert derived not in saved


# ------------------------------------------------------------------------------------------------------------------
# RoPE spellings
# ------------------------------------------------------------------------------------------------------------------
def test_legacy_and_v5_rope_spellings_agree():
    legacy = DeepseekV32Config.from_preset(
        "tiny", rope_theta=50000.0, rope_scaling={"type": "yarn", **OFFICIAL_YARN}, rope_parameters=None
    )
    v5 = DeepseekV32Config.from_preset(
        "tiny", rope_theta=None, rope_scaling=None,
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, **OFFICIAL_YARN},
    )  # fmt: skip
    assert legacy.rope_parameters == v5.rope_parameters
    assert legacy.rope_parameters == {"rope_type": "yarn", "rope_theta": 50000.0, **OFFICIAL_YARN}
    assert legacy.rope_theta == v5.rope_theta == 50000.0
    assert legacy.softmax_scale == v5.softmax_scale
    # Legacy dict spelled with `rope_type` instead of `type`.
    legacy2 = DeepseekV32Config.from_preset(
        "tiny", rope_theta=50000.0, rope_scaling={"rope_type": "yarn", **OFFICIAL_YARN}
    )
    assert legacy2.rope_parameters == v5.rope_parameters
    # Both forms written by to_dict agree with each other.
    out = v5.to_dict()
    assert out["rope_theta"] == 50000.0
    assert out["rope_scaling"] == {"type": "yarn", **OFFICIAL_YARN}
    assert out["rope_parameters"] == v5.rope_parameters


def test_no_scaling_spellings_agree():
    legacy = DeepseekV32Config.from_preset("tiny", rope_scaling=None, rope_theta=123456.0)
    v5 = DeepseekV32Config.from_preset(
        "tiny", rope_scaling=None, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 123456.0}
    )
    assert legacy.rope_parameters == v5.rope_parameters == {"rope_type": "default", "rope_theta": 123456.0}
    # No YaRN -> plain 1/sqrt(qk_head_dim), and no legacy rope_scaling written.
    assert legacy.softmax_scale == pytest.approx((16 + 8) ** -0.5, rel=1e-15)
    assert "rope_scaling" not in legacy.to_dict()


def test_softmax_scale_official_hand_computed():
    config = DeepseekV32Config(**_official_raw())
    # qk_head_dim = 128 + 64 = 192; mscale = 0.1 * 1.0 * ln(40) + 1 = 1.368887945411394
    # 192^-0.5 = 0.07216878364870323; 1.368887945411394^2 = 1.873854...; product = 0.13523377886088...
    assert config.softmax_scale == pytest.approx(0.1352337788608801, rel=1e-12)
    assert config.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)


def test_softmax_scale_tiny_hand_computed():
    config = DeepseekV32Config.from_preset("tiny")
    # qk_head_dim = 16 + 8 = 24, factor 4, mscale_all_dim 1
    assert config.softmax_scale == pytest.approx(24**-0.5 * (0.1 * math.log(4) + 1) ** 2, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# q_lora_rank
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, None])
def test_q_lora_rank_zero_or_null_means_none(value):
    config = DeepseekV32Config.from_preset("tiny", q_lora_rank=value)
    assert config.q_lora_rank is None


def test_q_lora_rank_kept_when_positive():
    assert DeepseekV32Config.from_preset("tiny", q_lora_rank=48).q_lora_rank == 48


# ------------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------------
def _comparable(config) -> dict:
    out = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path"):
        out.pop(volatile, None)
    return out


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("official", {}),
        ("tiny", {}),
        ("tiny", {"index_fp8": False, "indexer_rope_interleave": True, "q_lora_rank": None, "index_head_dim": 24}),
        ("tiny", {"rope_scaling": None, "rope_theta": 5e5, "topk_method": "greedy", "scoring_func": "softmax"}),
    ],
)
def test_save_load_round_trip(tmp_path, preset, overrides):
    config = DeepseekV32Config.from_preset(preset, **overrides)
    config.save_pretrained(tmp_path)
    loaded = DeepseekV32Config.from_pretrained(tmp_path)
    assert _comparable(loaded) == _comparable(config)
    assert loaded.rope_parameters == config.rope_parameters
    assert loaded.fp8_quantization_config == config.fp8_quantization_config
    assert loaded.softmax_scale == config.softmax_scale
    for key, value in overrides.items():
        if key in ("rope_scaling", "rope_theta"):
            continue
        assert getattr(loaded, key) == value
    assert getattr(loaded, "quantization_config", None) is None

    auto = AutoConfig.from_pretrained(tmp_path)
    assert type(auto) is DeepseekV32Config
    assert _comparable(auto) == _comparable(config)


@pytest.mark.parametrize("preset", ["official", "tiny", "bench"])
def test_saved_config_loads_in_transformers_native_class(tmp_path, preset):
    from transformers.models.deepseek_v32 import DeepseekV32Config as NativeConfig

    config = DeepseekV32Config.from_preset(preset)
    config.save_pretrained(tmp_path)
    native = NativeConfig.from_pretrained(tmp_path)
    assert type(native) is NativeConfig
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
        "num_experts_per_tok", "norm_topk_prob", "max_position_embeddings", "rms_norm_eps", "first_k_dense_replace",
        "index_topk", "index_head_dim", "index_n_heads", "tie_word_embeddings",
    ):  # fmt: skip
        assert getattr(native, key) == getattr(config, key), key
    assert native.head_dim == config.qk_rope_head_dim
    rope = native.rope_parameters
    for key in ("rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim"):  # fmt: skip
        assert rope[key] == config.rope_parameters[key], key


# ------------------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------------------
def test_bench_preset():
    config = DeepseekV32Config.from_preset("bench")
    assert config.hidden_size == 2048
    assert config.num_hidden_layers == 6
    assert config.num_attention_heads == 16
    assert config.q_lora_rank == 1536
    assert config.kv_lora_rank == 512
    assert config.n_routed_experts == 64
    assert config.num_experts_per_tok == 6
    assert config.n_shared_experts == 2
    assert config.n_group == 8
    assert config.topk_group == 4
    assert config.index_n_heads == 64
    assert config.index_head_dim == 128
    assert config.index_topk == 2048
    assert config.vocab_size == 129280


def test_tiny_preset():
    config = DeepseekV32Config.from_preset("tiny")
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts, config.index_topk) == (64, 3, 8, 8)
    assert config.qk_head_dim == 24
    assert config.dtype == torch.float32
    assert config.is_moe_layer(1) and not config.is_moe_layer(0)


def test_from_preset_overrides_and_unknown_preset():
    assert DeepseekV32Config.from_preset("tiny", index_topk=4).index_topk == 4
    with pytest.raises(ValueError, match="nope"):
        DeepseekV32Config.from_preset("nope")


# ------------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------------
# (overrides on the tiny preset: 8 experts in 4 groups of 2, topk_group 2, top-2, qk_rope 8, index_head_dim 16)
_INVALID = [
    pytest.param({"n_routed_experts": 10}, "n_routed_experts", id="experts-not-divisible-by-groups"),
    pytest.param({"topk_group": 5}, "topk_group", id="topk_group-gt-n_group"),
    pytest.param({"num_experts_per_tok": 5}, "num_experts_per_tok", id="top-k-unreachable"),
    pytest.param({"index_head_dim": 24}, "index_head_dim", id="index_head_dim-not-pow2-fp8"),
    pytest.param({"index_topk": 0}, "index_topk", id="index_topk-0"),
    pytest.param({"scoring_func": "tanh", "topk_method": "greedy"}, "scoring_func", id="unknown-scoring"),
    pytest.param({"topk_method": "top_p"}, "topk_method", id="unknown-topk_method"),
    pytest.param({"topk_method": "noaux_tc", "scoring_func": "softmax"}, "noaux_tc", id="noaux_tc-softmax"),
    pytest.param(
        {"quantization_config": {**OFFICIAL_QUANT, "weight_block_size": [64, 64]}}, "weight_block_size",
        id="bad-weight_block_size",
    ),
    pytest.param(
        {"qk_rope_head_dim": 7},
        "qk_rope_head_dim",
        id="odd-qk_rope_head_dim",
    ),
    pytest.param({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers", id="negative-mtp-layers"),
    pytest.param({"hidden_act": "gelu"}, "hidden_act", id="gelu"),
]


@pytest.mark.parametrize("overrides, field", _INVALID)
def test_invalid_config_raises_value_error_naming_field(overrides, field):
    with pytest.raises(ValueError) as info:
        DeepseekV32Config.from_preset("tiny", **overrides)
    assert field in str(info.value)


def test_odd_qk_rope_head_dim_is_rejected_somehow():
    """An odd rope dim never produces a config."""
    with pytest.raises(Exception):
        DeepseekV32Config.from_preset("tiny", qk_rope_head_dim=7)


def test_non_power_of_two_index_head_dim_allowed_without_fp8():
    config = DeepseekV32Config.from_preset("tiny", index_head_dim=24, index_fp8=False)
    assert config.index_head_dim == 24 and not config.index_fp8


@pytest.mark.parametrize(
    "overrides",
    [
        {"topk_method": "greedy", "scoring_func": "softmax"},
        {"topk_method": "group_limited_greedy", "scoring_func": "softmax"},
        {"topk_method": "group_limited_greedy", "scoring_func": "sigmoid"},
        {"num_experts_per_tok": 4},  # exactly the 2 kept groups x 2 experts
        {"topk_group": 4},
    ],
)
def test_valid_routing_options_accepted(overrides):
    config = DeepseekV32Config.from_preset("tiny", **overrides)
    for key, value in overrides.items():
        assert getattr(config, key) == value
