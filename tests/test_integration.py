"""The model through the ecosystem entry points: pipeline with the real DeepSeek tokenizer, bf16, device_map, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_deepseek_v32 import DeepseekV32ForCausalLM
from modeling_deepseek_v32.cli import bundled_tokenizer_dir
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir())


@pytest.fixture(scope="module")
def real_vocab_checkpoint(tmp_path_factory, tokenizer):
    """Tiny model with the official vocabulary, saved with the tokenizer, as a user's checkpoint directory."""
    model = random_model(tiny_config(vocab_size=129280, num_nextn_predict_layers=0), seed=30)
    directory = tmp_path_factory.mktemp("real_vocab")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_text_generation_pipeline_with_real_tokenizer(real_vocab_checkpoint, tokenizer):
    generator = pipeline("text-generation", model=str(real_vocab_checkpoint), dtype=torch.float32)
    assert isinstance(generator.model, DeepseekV32ForCausalLM)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    tokenizer.padding_side = "left"
    batched = generator(prompts, max_new_tokens=6, do_sample=False, batch_size=2, return_full_text=False)
    single = [generator(prompt, max_new_tokens=6, do_sample=False, return_full_text=False) for prompt in prompts]
    # Left-padded batched generation gives each prompt the text it gets alone.
    assert [out[0]["generated_text"] for out in batched] == [out[0]["generated_text"] for out in single]
    assert all(out[0]["generated_text"] for out in single)


def test_bfloat16_model_generates_and_tracks_fp32(real_vocab_checkpoint, tokenizer):
    fp32 = AutoModelForCausalLM.from_pretrained(real_vocab_checkpoint, dtype=torch.float32)
    bf16 = AutoModelForCausalLM.from_pretrained(real_vocab_checkpoint, dtype=torch.bfloat16)
    assert bf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    inputs = tokenizer("Sparse attention reads", return_tensors="pt")
    with torch.no_grad():
        reference = fp32(**inputs).logits
        low = bf16(**inputs).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).norm() / reference.norm() < 0.05
    assert bf16.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] == inputs.input_ids.shape[1] + 4


def test_device_map_auto_loads_and_matches(real_vocab_checkpoint, tokenizer):
    pytest.importorskip("accelerate")
    reference = AutoModelForCausalLM.from_pretrained(real_vocab_checkpoint, dtype=torch.float32)
    mapped = AutoModelForCausalLM.from_pretrained(real_vocab_checkpoint, dtype=torch.float32, device_map="auto")
    inputs = tokenizer("Mixture of experts", return_tensors="pt")
    with torch.no_grad():
        assert relative_error(mapped(**inputs).logits, reference(**inputs).logits) < 1e-6


def test_cli_generates_with_the_bundled_tokenizer(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_deepseek_v32", "generate", "--prompt", "Hello", "--max-new-tokens", "5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5 tokens in" in result.stderr and "bytes/token" in result.stderr
    assert result.stdout.strip()


def test_cli_reports_a_missing_model_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_deepseek_v32", "generate", "--prompt", "Hi", "--model", str(tmp_path / "no")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_no_split_modules_keep_each_block_on_one_device(tiny_model):
    """What device_map="auto" plans across devices: whole decoder / MTP blocks, never a split block."""
    from accelerate import infer_auto_device_map

    sizes = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    plan = infer_auto_device_map(
        tiny_model, max_memory={0: sizes // 3, 1: sizes // 3, "cpu": sizes * 2},
        no_split_module_classes=tiny_model._no_split_modules,
    )  # fmt: skip
    assert len(set(plan.values())) > 1
    for name in plan:
        assert not name.startswith("model.layers.") or name.count(".") == 2, f"block split by the plan: {name}"


def test_cli_info_reports_sizes_of_the_official_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_deepseek_v32", "info", "--preset", "official"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # 61 x ((512 + 64) x 2 bytes + 128 FP8 index bytes + 4 scale bytes), and 671B + 14B MTP parameters.
    assert "78,324 bytes/token" in result.stdout and "685.4" in result.stdout


def test_cli_generate_with_mtp_reports_acceptance(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_deepseek_v32", "generate", "--prompt", "Hi", "--max-new-tokens", "4", "--mtp"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "MTP acceptance" in result.stderr and "tokens/forward" in result.stderr
