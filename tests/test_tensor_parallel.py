"""Tensor parallelism with attention split by heads and routed experts split by expert: ``from_pretrained(
tp_plan="auto")`` on 2 CPU processes (gloo, real subprocesses through torchrun) gives the unsharded logits for a
prefill and a decode step with each rank holding half of the experts; the head-local attention math on weight
slices, summed like o_proj's all-reduce, equals the whole module in one process; the expert shards' partial sums add
up to the whole MoE layer, in one process and (forward and backward) over 2 gloo processes."""

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

import modeling_deepseek_v32.kernels as kernels
from modeling_deepseek_v32 import DeepseekV32Config
from modeling_deepseek_v32.expert_parallel import STYLE, expert_shard, shard_experts, without_other_ranks_experts
from modeling_deepseek_v32.moe import DeepseekV32MoE
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tp_inference_check.py"
ATTENTION_SHARDS = {"model.layers.*.self_attn.kv_b_proj", "model.layers.*.self_attn.o_proj"}
REPLICATED = ("q_a_proj", "kv_a_proj_with_mqa", "indexer", "layernorm", "mlp.gate.")

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
    _assert_experts_split_in_halves(result)


def _assert_experts_split_in_halves(result: dict) -> None:
    """Each rank holds (has modules and parameters for) exactly its contiguous half of every MoE layer's experts."""
    ranks = result["routed_experts_per_rank"]
    per_layer = result["routed_experts_per_layer"]
    assert len(ranks) == 2 and per_layer and all(count == 8 for count in per_layer.values())
    for name, count in per_layer.items():
        held = [rank["held"][name] for rank in ranks]
        assert held == [list(range(count // 2)), list(range(count // 2, count))], name
    for rank in ranks:
        assert rank["param_elements"] * 2 == result["routed_expert_param_elements_full"]


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


# ------------------------------------------------------------------------------------------------------------------
# Expert parallelism: the routing math in one process, forward and backward over 2 gloo processes


def _moe(seed: int = 0, **overrides) -> DeepseekV32MoE:
    config = tiny_config(**{"hidden_size": 32, "moe_intermediate_size": 16, **overrides})
    torch.manual_seed(seed)
    moe = DeepseekV32MoE(config).eval()
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0.0, 0.3)
        moe.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return moe


def _shards(moe: DeepseekV32MoE, size: int) -> list[DeepseekV32MoE]:
    """Copies of ``moe``, the r-th keeping the r-th of ``size`` expert shards; no process group, so each returns
    its partial sum (what the all-reduce adds up)."""
    shards = []
    for rank in range(size):
        shard = copy.deepcopy(moe)
        shard_experts(shard.experts, rank, size)
        shards.append(shard)
    return shards


def test_expert_parallel_is_the_plan_style_for_the_routed_experts():
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    assert DeepseekV32Config.base_model_tp_plan["layers.*.mlp.experts"] == STYLE
    assert STYLE in ALL_PARALLEL_STYLES


@pytest.mark.parametrize("size", [2, 4])
def test_expert_shards_partial_sums_add_up_to_the_whole_layer(size):
    moe = _moe()
    tokens = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, weights, experts = moe.gate(tokens)
        expected = moe.run_experts(tokens, weights, experts)
        shards = _shards(moe, size)
        partials = [shard.run_experts(tokens, weights, experts) for shard in shards]
    per_rank = moe.config.n_routed_experts // size
    for rank, shard in enumerate(shards):
        held = [index for index, expert in enumerate(shard.experts) if expert is not None]
        assert held == list(range(rank * per_rank, (rank + 1) * per_rank))
        assert sum(p.numel() for p in shard.experts.parameters()) * size == sum(p.numel() for p in moe.experts.parameters())
        assert all(f"experts.{index}." not in name for name in shard.state_dict() for index in range(8) if index not in held)
    # Every rank's share is non-trivial (the tokens reach all experts), and the shares sum to the layer.
    assert all(partial.abs().max() > 0.1 for partial in partials)
    torch.testing.assert_close(sum(partials), expected, rtol=1e-6, atol=1e-6)


def test_a_swapped_expert_module_is_the_one_that_runs():
    moe = _moe()
    shard = _shards(moe, 2)[1]
    tokens = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, weights, experts = moe.gate(tokens)
        before = shard.run_experts(tokens, weights, experts)
        replacement = copy.deepcopy(shard.experts[5])
        replacement.down_proj.weight.mul_(2)
        shard.experts[5] = replacement
        after = shard.run_experts(tokens, weights, experts)
    assert expert_shard(shard.experts).local.experts[1] is replacement
    assert (after - before).abs().max() > 0.1


def test_expert_shards_through_the_grouped_kernel(kernel_switch, monkeypatch):
    """The kernel path of a shard (local slots as one-slot routing) against the loop of the whole layer."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # The kernel module is compiled for the interpreter when first imported; test_moe_kernel does the same.
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(kernels, "ALLOW_CPU_INTERPRETER", True)
    moe = _moe(hidden_size=128, moe_intermediate_size=48).to(device)
    tokens = torch.randn(24, 128, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        _, weights, experts = moe.gate(tokens)
        kernel_switch(False)
        expected = moe.run_experts(tokens, weights, experts)
        kernel_switch(True)
        before = kernels.calls["grouped_moe"]
        summed = sum(shard.run_experts(tokens, weights, experts) for shard in _shards(moe, 2))
    assert kernels.calls["grouped_moe"] - before == 2
    # fp32 sums in another order (the shards' slots, then the two partials); relative to the largest output.
    assert relative_error(summed, expected) < 1e-5


def test_experts_not_dividing_by_the_world_size_raise_a_clear_error():
    moe = _moe()
    with pytest.raises(ValueError, match=r"n_routed_experts \(8\) divisible by the tensor-parallel world size \(3\)"):
        shard_experts(moe.experts, 0, 3)
    assert expert_shard(moe.experts) is None and all(expert is not None for expert in moe.experts)


def test_other_ranks_experts_are_skipped_on_purpose_and_saving_refuses(tmp_path):
    model = random_model(tiny_config(), seed=0)
    for layer in model.model.layers[model.config.first_k_dense_replace :]:
        shard_experts(layer.mlp.experts, 1, 2)
    keys = {
        "model.layers.1.mlp.experts.0.gate_proj.weight",  # rank 0's: skipped here on purpose
        "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv",  # rank 0's
        "model.layers.1.mlp.experts.5.up_proj.weight",  # this rank's: really unexpected
        "model.layers.1.mlp.shared_experts.0.weight",
        "model.layers.9.mlp.experts.0.up_proj.weight",  # no such layer
    }
    assert without_other_ranks_experts(model, keys) == keys - {
        "model.layers.1.mlp.experts.0.gate_proj.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv",
    }
    with pytest.raises(NotImplementedError, match="expert parallelism"):
        model.save_pretrained(tmp_path)


def _moe_worker(out_dir: str) -> None:
    """One of the torchrun gloo processes: forward and backward of a sharded MoE layer against the unsharded one."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    try:
        moe = _moe().train()
        moe.config.moe_aux_loss_alpha = 0.0
        shard = copy.deepcopy(moe)
        shard_experts(shard.experts, rank, size, dist.group.WORLD)
        x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
        upstream = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))  # the same on every rank
        whole_x, shard_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        whole_out, shard_out = moe(whole_x), shard(shard_x)
        (whole_out * upstream).sum().backward()
        (shard_out * upstream).sum().backward()
        whole = dict(moe.named_parameters())
        grads = {name: (p.grad - whole[name].grad).abs().max().item() for name, p in shard.named_parameters()}
        result = {
            "output": (shard_out - whole_out).abs().max().item(),
            "input_grad": (shard_x.grad - whole_x.grad).abs().max().item(),
            "input_grad_scale": whole_x.grad.abs().max().item(),
            "param_grads": grads,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@distributed
def test_expert_parallel_moe_forward_and_backward_match_the_whole_layer(tmp_path):
    """The all-reduce of the partial sums (forward) and of the tokens' and routing weights' gradients (backward):
    gradients of the input, the replicated gate and this rank's experts equal the unsharded layer's."""
    command = ["torchrun", "--standalone", "--nproc-per-node", "2", __file__, "--moe-worker", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["output"] < 1e-5 and result["input_grad_scale"] > 1
        assert result["input_grad"] < 1e-5
        grads = result["param_grads"]
        assert "gate.weight" in grads and sum(name.startswith("experts.") for name in grads) == 4 * 3
        assert max(grads.values()) < 1e-5, grads


if __name__ == "__main__":  # torchrun's processes of the test above
    import sys

    _moe_worker(sys.argv[sys.argv.index("--moe-worker") + 1])
