"""HF layout <-> DeepSeek's inference-demo layout (``model{rank}-mp{N}.safetensors``) for several rank counts, dense and
block-FP8, with the split rules checked tensor by tensor and round trips checked byte for byte."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modeling_deepseek_v32 import DeepseekV32ForCausalLM
from modeling_deepseek_v32.conversion.common import expected_tensors
from modeling_deepseek_v32.conversion.demo_format import from_demo, to_demo
from modeling_deepseek_v32.conversion.demo_names import demo_to_hf_name, hf_to_demo_name, layer_index, split_rule
from modeling_deepseek_v32.conversion.shards import CheckpointError
from modeling_deepseek_v32.fp8 import FP8Linear
from modeling_deepseek_v32.testing_utils import directory_tensors, random_model, relative_error, tensor_bytes, tiny_config

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
# Every tensor-parallel split of this config falls on 128-block boundaries for mp=2 (q_b and kv_b rows 512,
# o_proj columns 256, dense MLP 256, shared experts 2 x 128), while hidden 160 and kv_a rows 168 stay ragged.
ALIGNED_FP8 = dict(
    hidden_size=160, kv_lora_rank=136, num_attention_heads=8, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
    intermediate_size=256, moe_intermediate_size=128, n_shared_experts=2, index_head_dim=32, quantization_config=QUANT,
)  # fmt: skip


def _vary_block_scales(model, seed: int) -> None:
    """Fresh FP8 weights share one ue8m0 scale for every block; give each block its own power of two so that a
    misplaced scale slice cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FP8Linear):
                exponents = torch.randint(-3, 4, module.weight_scale_inv.shape, generator=generator)
                module.weight_scale_inv.mul_(torch.exp2(exponents.float()))





@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense")
    random_model(tiny_config(), seed=21).save_pretrained(directory, max_shard_size="400KB")
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture(scope="module")
def aligned_fp8_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fp8")
    model = random_model(tiny_config(**ALIGNED_FP8), seed=22)
    _vary_block_scales(model, seed=23)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="1MB")
    return directory


@pytest.mark.parametrize("overrides", [{}, ALIGNED_FP8], ids=["dense", "fp8"])
def test_names_map_both_ways_for_every_tensor(overrides):
    config = tiny_config(**overrides)
    names = [n for n in expected_tensors(config) if (layer_index(n) or 0) < config.num_hidden_layers]
    demo = [hf_to_demo_name(n) for n in names]
    assert len(set(demo)) == len(demo)
    assert [demo_to_hf_name(d) for d in demo] == names
    assert not any(d.startswith("model.") or "self_attn" in d or "mlp" in d for d in demo)


def test_official_demo_names():
    pairs = {
        "model.embed_tokens.weight": "embed.weight",
        "lm_head.weight": "head.weight",
        "model.norm.weight": "norm.weight",
        "model.layers.0.input_layernorm.weight": "layers.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "layers.0.ffn_norm.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv": "layers.0.attn.wkv_a.scale",
        "model.layers.0.self_attn.q_a_layernorm.weight": "layers.0.attn.q_norm.weight",
        "model.layers.0.self_attn.q_b_proj.weight": "layers.0.attn.wq_b.weight",
        "model.layers.0.self_attn.indexer.wq_b.weight": "layers.0.attn.indexer.wq_b.weight",
        "model.layers.0.self_attn.indexer.k_norm.bias": "layers.0.attn.indexer.k_norm.bias",
        "model.layers.0.mlp.down_proj.weight": "layers.0.ffn.w2.weight",
        "model.layers.5.mlp.gate.e_score_correction_bias": "layers.5.ffn.gate.bias",
        "model.layers.5.mlp.experts.200.up_proj.weight": "layers.5.ffn.experts.200.w3.weight",
        "model.layers.5.mlp.shared_experts.gate_proj.weight_scale_inv": "layers.5.ffn.shared_experts.w1.scale",
    }
    for hf, demo in pairs.items():
        assert hf_to_demo_name(hf) == demo and demo_to_hf_name(demo) == hf
    assert split_rule("model.layers.0.self_attn.q_b_proj.weight") == ("split", 0)
    assert split_rule("model.layers.0.self_attn.indexer.wq_b.weight") == ("replicate", None)
    assert split_rule("model.layers.0.self_attn.o_proj.weight_scale_inv") == ("split", 1)
    assert split_rule("model.layers.5.mlp.shared_experts.down_proj.weight") == ("split", 1)
    assert split_rule("model.layers.5.mlp.experts.200.down_proj.weight") == ("expert", 200)
    for mtp_name in ("model.layers.61.eh_proj.weight", "model.layers.61.shared_head.head.weight"):
        with pytest.raises(CheckpointError, match="no counterpart in the demo format"):
            hf_to_demo_name(mtp_name)


def test_demo_layout_splits_and_partitions_like_deepseeks_convert(dense_dir, tmp_path):
    out = to_demo(dense_dir, tmp_path / "mp2", mp=2, progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    assert not (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    hf = directory_tensors(dense_dir)
    ranks = [load_file(out / f"model{r}-mp2.safetensors") for r in range(2)]
    for r, rank in enumerate(ranks):
        assert not any(name.startswith("layers.3.") for name in rank)  # the MTP layer is not part of the format
        assert torch.equal(rank["embed.weight"], hf["model.embed_tokens.weight"].chunk(2, 0)[r])
        assert torch.equal(rank["head.weight"], hf["lm_head.weight"].chunk(2, 0)[r])
        assert torch.equal(rank["layers.1.attn.wq_b.weight"], hf["model.layers.1.self_attn.q_b_proj.weight"].chunk(2, 0)[r])
        assert torch.equal(rank["layers.1.attn.wkv_b.weight"], hf["model.layers.1.self_attn.kv_b_proj.weight"].chunk(2, 0)[r])
        assert torch.equal(rank["layers.1.attn.wo.weight"], hf["model.layers.1.self_attn.o_proj.weight"].chunk(2, 1)[r])
        assert torch.equal(rank["layers.0.ffn.w1.weight"], hf["model.layers.0.mlp.gate_proj.weight"].chunk(2, 0)[r])
        assert torch.equal(rank["layers.0.ffn.w2.weight"], hf["model.layers.0.mlp.down_proj.weight"].chunk(2, 1)[r])
        assert torch.equal(rank["layers.2.ffn.shared_experts.w3.weight"], hf["model.layers.2.mlp.shared_experts.up_proj.weight"].chunk(2, 0)[r])
        for replicated in ("layers.1.attn.wkv_a.weight", "layers.1.attn.indexer.wq_b.weight", "layers.1.ffn.gate.bias", "norm.weight"):
            assert torch.equal(rank[replicated], hf[demo_to_hf_name(replicated)]), replicated
        experts = sorted({int(n.split(".")[4]) for n in rank if n.startswith("layers.1.ffn.experts.")})
        assert experts == list(range(4 * r, 4 * r + 4))


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_round_trip_through_any_number_of_ranks_is_exact(dense_dir, tmp_path, mp):
    demo = to_demo(dense_dir, tmp_path / "demo", mp=mp, progress=False)
    back = from_demo(demo, tmp_path / "hf", mtp_from=dense_dir, max_shard_size="300KB", progress=False)
    original, again = directory_tensors(dense_dir), directory_tensors(back)
    assert set(again) == set(original)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    assert json.loads((back / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_without_mtp_source_the_layer_is_dropped_and_logits_are_unchanged(dense_dir, tmp_path):
    demo = to_demo(dense_dir, tmp_path / "demo", mp=2, progress=False)
    back = from_demo(demo, tmp_path / "hf", progress=False)
    assert json.loads((back / "config.json").read_text())["num_nextn_predict_layers"] == 0
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = DeepseekV32ForCausalLM.from_pretrained(back).eval()(ids).logits
        reference = DeepseekV32ForCausalLM.from_pretrained(dense_dir).eval()(ids).logits
    assert relative_error(ours, reference) < 1e-6


def test_block_fp8_ranks_split_weights_and_scales_together(aligned_fp8_dir, tmp_path):
    demo = to_demo(aligned_fp8_dir, tmp_path / "demo", mp=2, progress=False)
    hf = directory_tensors(aligned_fp8_dir)
    rank1 = load_file(demo / "model1-mp2.safetensors")
    wq_b, scale = rank1["layers.1.attn.wq_b.weight"], rank1["layers.1.attn.wq_b.scale"]
    assert wq_b.dtype == torch.float8_e4m3fn and wq_b.shape == (256, 32) and scale.shape == (2, 1)
    assert torch.equal(tensor_bytes(wq_b), tensor_bytes(hf["model.layers.1.self_attn.q_b_proj.weight"][256:]))
    assert torch.equal(scale, hf["model.layers.1.self_attn.q_b_proj.weight_scale_inv"][2:])
    assert rank1["layers.1.attn.wo.scale"].shape == (2, 1)  # 160 x 128 of the 160 x 256 o_proj
    back = from_demo(demo, tmp_path / "hf", mtp_from=aligned_fp8_dir, progress=False)
    again = directory_tensors(back)
    assert set(again) == set(hf)
    for name, tensor in hf.items():
        assert again[name].dtype == tensor.dtype and torch.equal(tensor_bytes(again[name]), tensor_bytes(tensor)), name


def test_impossible_splits_and_incomplete_rank_sets_are_clear_errors(dense_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"--mp must .* divide n_routed_experts \(8\), got 3"):
        to_demo(dense_dir, tmp_path / "x", mp=3, progress=False)
    ragged = tmp_path / "ragged"
    random_model(tiny_config(hidden_size=160, kv_lora_rank=136, quantization_config=QUANT), seed=3).save_pretrained(ragged)
    with pytest.raises(CheckpointError, match=r"cannot split block-FP8 weight '.*' .* multiple of the 128-wide scale blocks"):
        to_demo(ragged, tmp_path / "y", mp=2, progress=False)
    demo = to_demo(dense_dir, tmp_path / "demo", mp=4, progress=False)
    (demo / "model2-mp4.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"demo checkpoint for mp=4 lacks ranks \[2\]"):
        from_demo(demo, tmp_path / "hf", progress=False)
