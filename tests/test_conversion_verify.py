"""``verify``: a sound checkpoint passes; each kind of damage is reported, naming the tensor or file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_deepseek_v32.conversion.verify import verify_checkpoint
from modeling_deepseek_v32.testing_utils import random_model, tiny_config

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    model = random_model(tiny_config(hidden_size=160, kv_lora_rank=136, quantization_config=QUANT), seed=41)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="400KB")
    return directory


def _copy(good_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(good_dir, target)
    return target


def _shard_of(directory, name) -> str:
    return json.loads((directory / INDEX).read_text())["weight_map"][name]


def _edit_shard(directory, name, edit) -> None:
    """Apply ``edit(tensors)`` to the shard holding ``name``."""
    path = directory / _shard_of(directory, name)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_index(directory, edit) -> None:
    index = json.loads((directory / INDEX).read_text())
    edit(index["weight_map"])
    (directory / INDEX).write_text(json.dumps(index))


def _problems(directory) -> str:
    report = verify_checkpoint(directory)
    assert not report.ok
    return "\n".join(report.problems)


KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"


def test_a_sound_checkpoint_passes_with_a_summary(good_dir):
    report = verify_checkpoint(good_dir, check_data=True)
    assert report.ok, report.problems
    assert report.summary["files"] >= 3 and report.summary["tensors"] == report.summary["expected tensors"]
    assert "float8_e4m3fn" in report.summary["dtypes"] and "block-FP8" in report.summary["config"]
    assert "OK" in report.format()


def test_missing_unexpected_and_misshapen_tensors(good_dir, tmp_path):
    ckpt = _copy(good_dir, tmp_path)
    _edit_shard(ckpt, KV_A, lambda t: t.pop(KV_A + "_scale_inv"))
    _edit_index(ckpt, lambda m: m.pop(KV_A + "_scale_inv"))
    gate = "model.layers.2.mlp.gate.weight"
    _edit_shard(ckpt, gate, lambda t: t.update({gate: torch.zeros(7, 160, dtype=torch.bfloat16), "model.layers.2.extra": torch.zeros(2)}))
    _edit_index(ckpt, lambda m: m.update({"model.layers.2.extra": m[gate]}))
    problems = _problems(ckpt)
    assert f"1 expected tensor(s) missing: {KV_A}_scale_inv" in problems
    assert "1 unexpected tensor(s): model.layers.2.extra" in problems
    assert f"tensor {gate} has shape [7, 160], config implies [8, 160]" in problems


def test_wrong_dtypes_and_fp8_scale_shapes(good_dir, tmp_path):
    ckpt = _copy(good_dir, tmp_path)
    head = "lm_head.weight"
    _edit_shard(ckpt, head, lambda t: t.update({head: t[head].to(torch.float8_e4m3fn)}))
    _edit_shard(ckpt, KV_A, lambda t: t.update({KV_A: t[KV_A].float(), KV_A + "_scale_inv": torch.ones(1, 2)}))
    problems = _problems(ckpt)
    assert "lm_head.weight is torch.float8_e4m3fn, expected a floating dtype (FP8 where the model keeps a dense weight)" in problems
    assert f"{KV_A} is torch.float32, expected torch.float8_e4m3fn" in problems
    assert f"FP8 scale {KV_A}_scale_inv has shape [1, 2], config implies [2, 2]" in problems


def test_scales_without_quantization_config_get_a_hint(good_dir, tmp_path):
    ckpt = _copy(good_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "FP8 scales, but the config has no quantization_config" in _problems(ckpt)


def test_index_and_shard_inconsistencies(good_dir, tmp_path):
    ckpt = _copy(good_dir, tmp_path)
    norm, dup = "model.norm.weight", "model.layers.0.input_layernorm.weight"
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    other = next(f for f in shards if f not in (_shard_of(ckpt, norm), _shard_of(ckpt, dup)))
    _edit_index(ckpt, lambda m: m.update({norm: other}))
    value = load_file(ckpt / _shard_of(ckpt, dup))[dup]
    path = ckpt / other
    tensors = load_file(path)
    tensors[dup] = value
    save_file(tensors, path, metadata={"format": "pt"})
    save_file({"stray": torch.zeros(1)}, ckpt / "model-extra.safetensors")
    problems = _problems(ckpt)
    assert f"maps '{norm}' to {other}, which does not hold it" in problems
    assert f"tensor '{dup}' is stored more than once" in problems
    assert "model-extra.safetensors: safetensors file not listed in model.safetensors.index.json" in problems


def test_truncated_shard_and_bad_values(good_dir, tmp_path):
    ckpt = _copy(good_dir, tmp_path)
    victim = ckpt / _shard_of(ckpt, KV_A)
    victim.write_bytes(victim.read_bytes()[:-64])
    problems = _problems(ckpt)
    assert f"{victim}: truncated" in problems and "expected tensor(s) missing" in problems

    ckpt2 = _copy(good_dir, tmp_path / "nan")
    norm = "model.norm.weight"
    _edit_shard(ckpt2, norm, lambda t: t[norm].__setitem__(3, float("nan")))
    assert verify_checkpoint(ckpt2).ok  # values are only read on request
    report = verify_checkpoint(ckpt2, check_data=True)
    assert f"tensor(s) with NaN or infinite values: {norm}" in "\n".join(report.problems)


def test_missing_or_invalid_config(good_dir, tmp_path):
    ckpt = _copy(good_dir, tmp_path)
    (ckpt / "config.json").unlink()
    assert "config.json: not found" in _problems(ckpt)
    (ckpt / "config.json").write_text("{not json")
    assert "config.json: not a readable JSON config" in _problems(ckpt)
