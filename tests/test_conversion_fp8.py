"""FP8 <-> BF16 conversions on a synthetic checkpoint in the official layout: block-FP8 linears with ragged edge
blocks (hidden 160 = 128 + 32, kv_a rows 144 = 128 + 16), bf16 everything else, several shards with an index."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from modeling_deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
from modeling_deepseek_v32 import fp8 as fp8_module
from modeling_deepseek_v32.conversion.dequantize_fp8 import dequantize_checkpoint
from modeling_deepseek_v32.conversion.quantize_fp8 import main as quantize_main
from modeling_deepseek_v32.conversion.quantize_fp8 import quantize_checkpoint
from modeling_deepseek_v32.conversion.shards import CheckpointError
from modeling_deepseek_v32.conversion.verify import verify_checkpoint
from modeling_deepseek_v32.fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from modeling_deepseek_v32.testing_utils import directory_tensors, random_model, relative_error, tensor_bytes, tiny_config

FP8 = torch.float8_e4m3fn
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}




def _snapshot(directory) -> dict[str, str]:
    return {p.name: f"{p.stat().st_mtime_ns}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in sorted(directory.iterdir())}


def _vary_block_scales(model, seed: int) -> None:
    """Freshly initialized FP8 weights get one ue8m0 scale for every block (same init std everywhere); multiply each
    block's scale by its own power of two, so a tensor or block mix-up cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, fp8_module.FP8Linear):
                exponents = torch.randint(-3, 4, module.weight_scale_inv.shape, generator=generator)
                module.weight_scale_inv.mul_(torch.exp2(exponents.float()))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    model = random_model(tiny_config(hidden_size=160, kv_lora_rank=136, quantization_config=QUANT), seed=11)
    _vary_block_scales(model, seed=12)
    directory = tmp_path_factory.mktemp("fp8")
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="300KB")
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    assert len(list(directory.glob("*.safetensors"))) >= 3
    snapshot = _snapshot(directory)
    yield directory
    assert _snapshot(directory) == snapshot, "a conversion modified its input directory"


@pytest.fixture(scope="module")
def bf16_dir(fp8_dir, tmp_path_factory):
    return dequantize_checkpoint(fp8_dir, tmp_path_factory.mktemp("conv") / "bf16", max_shard_size="600KB", progress=False)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(seed))



def test_dequantized_checkpoint_is_exact_and_complete(fp8_dir, bf16_dir):
    source, result = directory_tensors(fp8_dir), directory_tensors(bf16_dir)
    fp8_names = [n for n, t in source.items() if t.dtype == FP8]
    assert fp8_names and not any(n.endswith("_scale_inv") for n in result)
    assert set(result) == {n for n in source if not n.endswith("_scale_inv")}
    for name, tensor in source.items():
        if tensor.dtype == FP8:
            expected = dequantize_weight_blockwise(tensor, source[name + "_scale_inv"], (128, 128), torch.bfloat16)
            assert result[name].dtype == torch.bfloat16 and torch.equal(result[name], expected), name
        elif not name.endswith("_scale_inv"):
            assert torch.equal(tensor_bytes(result[name]), tensor_bytes(tensor)), name
    config = json.loads((bf16_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (bf16_dir / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    assert (bf16_dir / "model.safetensors.index.json").exists() and verify_checkpoint(bf16_dir).ok


def test_dequantized_model_gives_the_fp8_models_logits(fp8_dir, bf16_dir, monkeypatch):
    """With activation quantization switched off, the FP8 model computes with exactly the dequantized weights, so
    both checkpoints loaded with from_pretrained must give the same logits."""

    def unquantized_activations(x, w_fp8, scale_inv, block_size=(128, 128), bias=None):
        return torch.nn.functional.linear(x, dequantize_weight_blockwise(w_fp8, scale_inv, block_size, x.dtype), bias)

    fp8_model = DeepseekV32ForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32).eval()
    dense_model = DeepseekV32ForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
    monkeypatch.setattr(fp8_module, "fp8_block_matmul", unquantized_activations)
    with torch.no_grad():
        assert relative_error(dense_model(_ids(0)).logits, fp8_model(_ids(0)).logits) < 1e-5


def test_fp8_bf16_fp8_round_trip_with_kept_scales_reproduces_the_bytes(fp8_dir, bf16_dir, tmp_path):
    out = quantize_checkpoint(bf16_dir, tmp_path / "fp8", scales_from=fp8_dir, max_shard_size="200KB", progress=False)
    original, again = directory_tensors(fp8_dir), directory_tensors(out)
    assert set(original) == set(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(tensor_bytes(again[name]), tensor_bytes(tensor)), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8_dir / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_quantizing_a_dense_checkpoint_matches_the_reference_quantizer(bf16_dir, tmp_path, scale_fmt):
    out = tmp_path / "q"
    # through the CLI's argument parsing (the subprocess path is covered in test_conversion_cli.py)
    assert quantize_main([str(bf16_dir), str(out), "--scale-fmt", scale_fmt, "--no-progress"]) == 0
    dense, quantized = directory_tensors(bf16_dir), directory_tensors(out)
    n_fp8 = 0
    for name, tensor in quantized.items():
        if tensor.dtype == FP8:
            n_fp8 += 1
            values, scales = quantize_weight_blockwise(dense[name], (128, 128), scale_fmt)
            assert torch.equal(tensor_bytes(tensor), tensor_bytes(values)) and torch.equal(quantized[name + "_scale_inv"], scales), name
        elif not name.endswith("_scale_inv"):
            assert torch.equal(tensor, dense[name]), name
    kv_a = quantized["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert kv_a.shape == (2, 2)  # 144 x 160: ragged blocks in both directions
    assert n_fp8 == sum(1 for n in directory_tensors(out) if n.endswith("_scale_inv"))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["weight_block_size"] == [128, 128]
    assert quant.get("scale_fmt") == ("ue8m0" if scale_fmt == "ue8m0" else None)
    assert verify_checkpoint(out).ok
    if scale_fmt == "ue8m0":
        model = DeepseekV32ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        reference = DeepseekV32ForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ours, ref = model(_ids(1)).logits, reference(_ids(1)).logits
        assert torch.corrcoef(torch.stack((ours.flatten(), ref.flatten())))[0, 1] > 0.98


def test_quantizing_an_fp8_checkpoint_is_refused(fp8_dir, tmp_path):
    with pytest.raises(CheckpointError, match="already block-FP8"):
        quantize_checkpoint(fp8_dir, tmp_path / "x", progress=False)


def test_fp8_weight_without_its_scale_is_a_clear_error(fp8_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = directory_tensors(fp8_dir)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text((fp8_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight' has no .*weight_scale_inv"):
        dequantize_checkpoint(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_dequantize_needs_a_deepseek_config(fp8_dir, tmp_path):
    broken = tmp_path / "noconfig"
    broken.mkdir()
    for path in fp8_dir.glob("*.safetensors*"):
        (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"noconfig/config\.json: not found"):
        dequantize_checkpoint(broken, tmp_path / "out", progress=False)
    (broken / "config.json").write_text(json.dumps({**json.loads((fp8_dir / "config.json").read_text()), "n_group": 3}))
    with pytest.raises(CheckpointError, match=r"(?s)not a usable DeepSeek-V3\.2 config.*n_group"):
        dequantize_checkpoint(broken, tmp_path / "out", progress=False)


def test_config_classes_agree_with_the_written_configs(bf16_dir):
    # the rewritten config.json must still be a valid config for the package (and for transformers' loader)
    config = DeepseekV32Config.from_pretrained(bf16_dir)
    assert not config.is_block_fp8 and config.hidden_size == 160
