"""Tensor parallelism with attention split by heads: ``from_pretrained(tp_plan="auto")`` on 2 CPU processes (gloo,
real subprocesses through torchrun) gives the unsharded logits for a prefill and a decode step, and the head-local
attention math on weight slices, summed like o_proj's all-reduce, equals the whole module in one process."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from modeling_deepseek_v32.testing_utils import random_model, tiny_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tp_inference_check.py"
ATTENTION_SHARDS = {"model.layers.*.self_attn.kv_b_proj", "model.layers.*.self_attn.o_proj"}
REPLICATED = ("q_a_proj", "kv_a_proj_with_mqa", "indexer", "layernorm", "mlp.experts.")

distributed = pytest.mark.skipif(
    not torch.distributed.is_available() or shutil.which("torchrun") is None, reason="needs torch.distributed"
)


def _launch(tmp_path: Path, *extra: str) -> dict:
    output = tmp_path / "result.json"
    command = ["torchrun", "--standalone", "--nproc-per-node", "2", str(EXAMPLE), "--cpu", "--output", str(output),
               *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(output.read_text())


@distributed
@pytest.mark.parametrize("q_proj", [False, True], ids=["q_lora", "q_proj"])
def test_tp_plan_auto_matches_one_process_for_prefill_and_decode(tmp_path, q_proj):
    result = _launch(tmp_path, *(["--no-q-lora"] if q_proj else []))
    print("TP on 2 CPU processes:", result)
    assert result["world_size"] == 2
    sharded = set(result["sharded_modules"])
    query = "model.layers.*.self_attn." + ("q_proj" if q_proj else "q_b_proj")
    assert ATTENTION_SHARDS | {query} <= sharded
    assert not [name for name in sharded if any(part in name for part in REPLICATED)]
    # Float32 logits of size ~0.7: only the order of the all-reduced sums differs.
    assert result["max_abs_logit_diff_prefill"] < 1e-5
    assert result["max_abs_logit_diff_decode"] < 1e-5  # one new token on the cache: the absorbed path
    assert result["local_param_elements"] < result["full_param_elements"]


def _head_shard(attention: nn.Module, rank: int, size: int) -> nn.Module:
    """Copy of ``attention`` holding heads ``rank``-th of ``size`` equal parts, as colwise/rowwise TP leaves it."""
    shard = copy.deepcopy(attention)
    query = "q_proj" if attention.q_lora_rank is None else "q_b_proj"
    for name, dim in ((query, 0), ("kv_b_proj", 0), ("o_proj", 1)):
        weight = getattr(attention, name).weight
        part = weight.chunk(size, dim=dim)[rank]
        linear = nn.Linear(part.shape[1], part.shape[0], bias=False)
        linear.weight = nn.Parameter(part.clone())
        setattr(shard, name, linear)
    return shard


@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "q_proj"])
def test_head_local_attention_summed_over_shards_equals_whole_module(absorb, q_lora_rank):
    model = random_model(tiny_config(q_lora_rank=q_lora_rank), seed=0)
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 12, model.config.hidden_size, generator=generator)
    cos, sin = model.model.rotary_emb(torch.arange(12).expand(2, -1))
    with torch.no_grad():
        expected = attention(hidden, cos, sin, absorb=absorb)
        # o_proj is rowwise: each shard's output is a partial sum that the all-reduce adds up.
        summed = sum(_head_shard(attention, rank, 2)(hidden, cos, sin, absorb=absorb) for rank in range(2))
    torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-6)


def test_heads_not_splitting_evenly_raise_a_clear_error():
    model = random_model(tiny_config(), seed=0)
    attention = copy.deepcopy(model.model.layers[0].self_attn)
    # 4 heads of 24 query features cut in the middle of a head, as an uneven TP split would.
    attention.q_b_proj.weight = nn.Parameter(attention.q_b_proj.weight[:36].clone())
    cos, sin = model.model.rotary_emb(torch.arange(4).expand(1, -1))
    with pytest.raises(ValueError, match="must divide by the TP size"):
        attention(torch.randn(1, 4, model.config.hidden_size), cos, sin)
