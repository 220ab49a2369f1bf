"""Deriving smaller models: fewer layers (MTP layer renumbered), fewer experts (router rows and bias selected), MTP
dropped; checked tensor by tensor and, for expert subsets, against the original model's own routing."""

from __future__ import annotations

import json

import pytest
import torch

from modeling_deepseek_v32 import DeepseekV32ForCausalLM
from modeling_deepseek_v32.conversion.derive import derive_checkpoint, main as derive_main, select_experts
from modeling_deepseek_v32.conversion.shards import CheckpointError
from modeling_deepseek_v32.conversion.verify import verify_checkpoint
from modeling_deepseek_v32.fp8 import FP8Linear
from modeling_deepseek_v32.testing_utils import directory_tensors, random_model, relative_error, tensor_bytes, tiny_config

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}


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
def fp8_dir(tmp_path_factory):
    # 3 layers, the first two dense, so cutting to 1 layer must move first_k_dense_replace for the MTP block
    config = tiny_config(hidden_size=160, kv_lora_rank=136, first_k_dense_replace=2, quantization_config=QUANT)
    directory = tmp_path_factory.mktemp("fp8")
    model = random_model(config, seed=31)
    _vary_block_scales(model, seed=33)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="400KB")
    return directory


@pytest.fixture(scope="module")
def grouped_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("grouped")
    random_model(tiny_config(n_group=2, topk_group=2), seed=32).save_pretrained(directory)
    return directory


def test_fewer_layers_keep_tensors_bit_exact_and_renumber_the_mtp_layer(fp8_dir, tmp_path):
    out = derive_checkpoint(fp8_dir, tmp_path / "d", num_layers=1, num_experts=4, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["num_nextn_predict_layers"] == 1
    assert config["first_k_dense_replace"] == 1 and config["n_routed_experts"] == 4 and config["n_group"] == 4
    source, derived = directory_tensors(fp8_dir), directory_tensors(out)
    kept = select_experts(8, 4, 4)
    assert kept == [0, 2, 4, 6]
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.")) for n in derived)
    for name, tensor in derived.items():
        origin = name.replace("model.layers.1.", "model.layers.3.")  # the MTP layer moved from 3 to 1
        if ".mlp.experts." in origin:
            parts = origin.split(".")
            parts[5] = str(kept[int(parts[5])])
            origin = ".".join(parts)
        expected = source[origin]
        if origin.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            expected = expected[kept]
        assert tensor.dtype == expected.dtype and torch.equal(tensor_bytes(tensor), tensor_bytes(expected.contiguous())), name
    assert "model.layers.1.eh_proj.weight" in derived and "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in derived
    model = DeepseekV32ForCausalLM.from_pretrained(out)
    assert len(model.model.mtp_layers) == 1 and type(model.model.mtp_layers[0].mlp).__name__ == "DeepseekV32MoE"


def test_expert_subset_routes_like_the_original_with_the_dropped_experts_disabled(grouped_dir, tmp_path):
    """Selecting router rows and bias entries is all the renormalization routing needs: the derived model must equal
    the original one whose dropped experts can never be selected (bias -1e4), main logits and MTP logits alike."""
    out = derive_checkpoint(grouped_dir, tmp_path / "d", num_experts=4, progress=False)  # keeps 0, 1, 4, 5
    derived = DeepseekV32ForCausalLM.from_pretrained(out).eval()
    original = DeepseekV32ForCausalLM.from_pretrained(grouped_dir).eval()
    dropped = torch.tensor([2, 3, 6, 7])
    with torch.no_grad():
        for layer in list(original.model.layers)[original.config.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias[dropped] = -1e4
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(1, 12)[None]
    with torch.no_grad():
        results = []
        for model in (derived, original):
            out_ = model(ids, output_hidden_states=True)
            mtp_logits, _ = model.model.mtp_forward(out_.hidden_states[-1][:, :-1], ids[:, 1:], positions)
            results.append((out_.logits, mtp_logits))
    assert relative_error(results[0][0], results[1][0]) < 1e-5
    assert relative_error(results[0][1], results[1][1]) < 1e-5


def test_drop_mtp_and_explicit_expert_lists(grouped_dir, tmp_path):
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"default": [7, 1, 3], "2": [0, 1, 2]}))
    code = derive_main([str(grouped_dir), str(tmp_path / "d"), "--drop-mtp", "--experts-file",
                        str(experts), "--n-group", "1", "--topk-group", "1", "--no-progress"])  # fmt: skip
    assert code == 0
    out = tmp_path / "d"
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == 3 and config["num_experts_per_tok"] == 2
    source, derived = directory_tensors(grouped_dir), directory_tensors(out)
    assert not any(n.startswith("model.layers.3.") for n in derived)
    assert torch.equal(derived["model.layers.1.mlp.gate.weight"], source["model.layers.1.mlp.gate.weight"][[1, 3, 7]])
    assert torch.equal(derived["model.layers.2.mlp.gate.e_score_correction_bias"], source["model.layers.2.mlp.gate.e_score_correction_bias"][:3])
    assert torch.equal(derived["model.layers.1.mlp.experts.2.down_proj.weight"], source["model.layers.1.mlp.experts.7.down_proj.weight"])
    assert verify_checkpoint(out).ok


def test_bad_requests_are_clear_errors(grouped_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"--num-layers must be between 1 and num_hidden_layers \(3\), got 0"):
        derive_checkpoint(grouped_dir, tmp_path / "a", num_layers=0, progress=False)
    with pytest.raises(CheckpointError, match="must be a multiple of 2, got 3"):
        derive_checkpoint(grouped_dir, tmp_path / "b", num_experts=3, progress=False)
    uneven = tmp_path / "uneven.json"
    uneven.write_text(json.dumps({"default": [0, 1], "2": [0, 1, 2]}))
    with pytest.raises(CheckpointError, match="same number of experts"):
        derive_checkpoint(grouped_dir, tmp_path / "c", experts_file=uneven, progress=False)
    with pytest.raises(CheckpointError, match="not a usable DeepSeek-V3.2 config"):
        derive_checkpoint(grouped_dir, tmp_path / "e", num_experts=4, num_experts_per_tok=5, progress=False)
    uneven.write_text(json.dumps({"7": [0, 1]}))
    with pytest.raises(CheckpointError, match=r"layers \[7\] are not kept MoE layers"):
        derive_checkpoint(grouped_dir, tmp_path / "f", experts_file=uneven, progress=False)
    assert not any((tmp_path / name).exists() for name in "abcef")
