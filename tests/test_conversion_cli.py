"""The conversion CLIs as users run them, in fresh processes: ``python -m modeling_deepseek_v32.conversion.verify``
literally, the others as ``__main__`` modules of one driver process (the same code path as ``python -m``; one import
of torch and transformers instead of five), plus ``--help`` of each."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modeling_deepseek_v32 import DeepseekV32ForCausalLM
from modeling_deepseek_v32.conversion.verify import verify_checkpoint
from modeling_deepseek_v32.testing_utils import random_model, tiny_config

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
CLIS = ("dequantize_fp8", "quantize_fp8", "demo_format", "derive", "verify")


@pytest.mark.parametrize("name", CLIS)
def test_every_cli_has_help(name, capsys):
    module = importlib.import_module(f"modeling_deepseek_v32.conversion.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m modeling_deepseek_v32.conversion.{name}" in text and "usage:" in text


# Runs each CLI module as `__main__` in one fresh interpreter, exactly as `python -m` does (runpy, sys.argv set), so
# the import of torch and transformers (most of a CLI's runtime on a tiny model) is paid once, not once per command.
_DRIVER = """
import contextlib, io, json, runpy, sys
results = {}
for name, args in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [name] + args
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("modeling_deepseek_v32.conversion." + name, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    results[name] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every CLI on its own input in fresh processes and hand the results to the tests."""
    root = tmp_path_factory.mktemp("cli")
    fp8, dense, broken = root / "fp8", root / "dense", root / "broken"
    random_model(tiny_config(hidden_size=160, kv_lora_rank=136, quantization_config=QUANT), seed=51).to(torch.bfloat16).save_pretrained(fp8, max_shard_size="400KB")
    random_model(tiny_config(), seed=52).save_pretrained(dense)
    shutil.copytree(fp8, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.layers.2.self_attn.o_proj.weight_scale_inv")
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    commands = {
        "dequantize_fp8": [str(fp8), str(root / "bf16"), "--max-shard-size", "500KB"],
        "quantize_fp8": [str(dense), str(root / "q"), "--scale-fmt", "float"],
        "demo_format": ["to-demo", str(dense), str(root / "demo"), "--mp", "2"],
        "derive": [str(fp8), str(root / "small"), "--num-layers", "2", "--num-experts", "4", "--drop-mtp"],
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    popen = dict(cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The literal `python -m` form, run alongside the driver.
    verify = subprocess.Popen([sys.executable, "-m", "modeling_deepseek_v32.conversion.verify", str(broken), "--no-progress"], **popen)
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(commands)], **popen)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    results = {name: tuple(value) for name, value in json.loads(out.strip().splitlines()[-1]).items()}
    out, err = verify.communicate(timeout=300)
    results["verify"] = (verify.returncode, out, err)
    return root, results


def _ok(runs, name):
    code, out, err = runs[1][name]
    assert code == 0, f"{name} failed:\n{out}\n{err}"
    return out, err


def test_dequantize_cli(runs):
    root = runs[0]
    out, err = _ok(runs, "dequantize_fp8")
    assert f"wrote {root / 'bf16'}" in out and "writing bf16" in err  # the progress bar
    assert not any(t.dtype == torch.float8_e4m3fn for p in (root / "bf16").glob("*.safetensors") for t in load_file(p).values())
    assert verify_checkpoint(root / "bf16").ok


def test_quantize_cli(runs):
    root = runs[0]
    _ok(runs, "quantize_fp8")
    config = json.loads((root / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and "scale_fmt" not in config["quantization_config"]
    assert verify_checkpoint(root / "q").ok


def test_demo_format_cli(runs):
    root = runs[0]
    _ok(runs, "demo_format")
    assert {p.name for p in (root / "demo").glob("*.safetensors")} == {"model0-mp2.safetensors", "model1-mp2.safetensors"}
    assert "layers.1.ffn.experts.7.w2.weight" in load_file(root / "demo" / "model1-mp2.safetensors")


def test_derive_cli(runs):
    root = runs[0]
    _, err = _ok(runs, "derive")
    assert "derived: 2 layers + 0 MTP, 4 experts per MoE layer" in err
    model = DeepseekV32ForCausalLM.from_pretrained(root / "small")
    assert model.config.num_hidden_layers == 2 and model.config.n_routed_experts == 4


def test_verify_cli_fails_on_a_broken_checkpoint(runs):
    code, out, err = runs[1]["verify"]
    assert code == 1, out + err
    assert "does not list tensor 'model.layers.2.self_attn.o_proj.weight_scale_inv'" in out
    assert out.rstrip().endswith("FAILED: 1 problem(s)")
