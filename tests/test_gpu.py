"""The plain-PyTorch model on a CUDA device: same numbers as on CPU, bf16, block FP8 and device_map="auto".

Skipped without CUDA; run through the `device` tool (see README)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modeling_deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
from modeling_deepseek_v32.fp8 import FP8Linear, dequantize_weight_blockwise
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _ids(shape, seed):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def test_cuda_fp32_matches_cpu(monkeypatch):
    monkeypatch.setenv("DEEPSEEK_V32_KERNELS", "0")
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_model(tiny_config(), seed=40)
    input_ids = _ids((2, 24), 0)
    with torch.no_grad():
        cpu = model(input_ids).logits
        gpu = model.cuda()(input_ids.cuda()).logits.cpu()
    assert relative_error(gpu, cpu) < 1e-4


def test_cuda_bf16_generation_and_incremental_decode():
    model = random_model(tiny_config(), seed=41).to("cuda", torch.bfloat16)
    input_ids = _ids((2, 20), 1).cuda()
    with torch.no_grad():
        full = model(input_ids).logits.float()
        out = model(input_ids[:, :12], use_cache=True)
        steps = [out.logits.float()]
        for t in range(12, 20):
            out = model(input_ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits.float())
    incremental = torch.cat(steps, 1)
    assert (incremental - full).norm() / full.norm() < 0.05
    generated = model.generate(input_ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 28)


def test_cuda_fp8_checkpoint_matches_dequantized_twin(tmp_path):
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    fp8_model = random_model(tiny_config(hidden_size=256, kv_lora_rank=248, quantization_config=quant), seed=42)
    fp8_model.save_pretrained(tmp_path)
    model = DeepseekV32ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda").eval()
    assert isinstance(model.model.layers[1].self_attn.kv_a_proj_with_mqa, FP8Linear)
    tensors = load_file(tmp_path / "model.safetensors")
    dense = {
        name: dequantize_weight_blockwise(t, tensors[name + "_scale_inv"], dtype=torch.float32)
        if t.dtype == torch.float8_e4m3fn else t
        for name, t in tensors.items() if not name.endswith("_scale_inv")
    }  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("quantization_config")
    twin = DeepseekV32ForCausalLM(DeepseekV32Config(**config))
    twin.load_state_dict(dense)
    twin = twin.to("cuda", torch.bfloat16).eval()
    input_ids = _ids((2, 16), 2).cuda()
    with torch.no_grad():
        ours, reference = model(input_ids).logits.float(), twin(input_ids).logits.float()
    assert (ours - reference).norm() / reference.norm() < 0.2


def test_device_map_auto_on_cuda(tmp_path):
    random_model(tiny_config(), seed=43).save_pretrained(tmp_path)
    model = DeepseekV32ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto")
    assert next(model.parameters()).device.type == "cuda"
    input_ids = _ids((1, 10), 3).to(model.device)
    assert model.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0).shape == (1, 15)
