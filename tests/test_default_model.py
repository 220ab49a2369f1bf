"""The trained nano model shipped in the package, and the README's main command that runs it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_deepseek_v32 import DeepseekV32ForCausalLM, default_model_path

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPTS = ["def read_config(path):\n    ", "class Stack:\n    def __init__(self):\n        ", "import os\nimport sys\n\n"]


@pytest.fixture(scope="module")
def nano():
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    return model, tokenizer


def test_shipped_checkpoint_is_small_and_complete():
    files = {path.name: path.stat().st_size for path in Path(default_model_path()).iterdir()}
    assert sum(files.values()) <= 25 * 2**20, files
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md", "training_log.json"):
        assert name in files, name
    assert any(name.endswith(".safetensors") for name in files)


def test_every_architectural_feature_is_on(nano):
    model, _ = nano
    config = model.config
    assert isinstance(model, DeepseekV32ForCausalLM)
    assert config.q_lora_rank and config.index_topk < config.rope_parameters["original_max_position_embeddings"]
    assert config.n_group > 1 and config.n_shared_experts >= 1 and config.num_nextn_predict_layers == 1
    assert config.rope_parameters["rope_type"] == "yarn" and config.topk_method == "noaux_tc"


def test_generates_python_looking_text(nano):
    model, tokenizer = nano
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = "\n".join(tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    keywords = {"self", "return", "def", "if", "import", "None", "for", "in", "="}
    assert len(keywords & set(re.findall(r"[A-Za-z_]+|=", text))) >= 4, text


def test_mtp_head_is_trained_and_drafting_is_exact(nano):
    model, tokenizer = nano
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**inputs, **kwargs)
    out = model.generate(**inputs, use_mtp=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, plain)
    # A random MTP head is accepted almost never; the trained one most of the time.
    assert out.mtp_acceptance[0] > 0.5, out.mtp_acceptance
    assert out.tokens_per_forward > 1.4


def _readme_main_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), flags=re.S)
    return blocks[0].split("&&")[-1].strip()


def test_readme_main_command_runs(tmp_path):
    """Runs the model part of the README's first command (the installs before it are what CI does)."""
    command = shlex.split(_readme_main_command())
    assert command[0] == "deepseek-v32"
    result = subprocess.run(
        [sys.executable, "-m", "modeling_deepseek_v32", *command[1:]],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 20
    assert "tokens/s" in result.stderr and "MTP acceptance" in result.stderr
