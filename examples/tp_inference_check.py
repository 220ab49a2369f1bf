#!/usr/bin/env python
"""Tensor-parallel inference check: ``from_pretrained(tp_plan=...)`` under torchrun gives the logits of one device.

    torchrun --nproc-per-node 2 examples/tp_inference_check.py [--model DIR] [--cpu] [--no-q-lora] [--output F]

The plan (``DeepseekV32Config.base_model_tp_plan`` + ``DeepseekV32ForCausalLM._tp_plan``) splits attention by heads
(``q_b_proj``/``q_proj`` and ``kv_b_proj`` colwise, ``o_proj`` rowwise: one all-reduce), the dense MLP and the
shared experts (gate/up colwise, down rowwise: one all-reduce each), the routed experts by expert (expert
parallelism: each rank loads E/W whole experts and runs the slots routed to them, one all-reduce) and the output
head (colwise, gathered). The latent projections, their norms, the indexer and the gate stay replicated. The check
runs a prefill (the expanded attention form) and one decode step on the cache it filled (the absorbed form, which
reads ``kv_b_proj``'s local shard). Rank 0 prints a JSON line with the largest logit differences against the
unsharded model, the sharded modules, the routed experts each rank holds and, on GPUs, the peak memory per device;
``--output`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

# The same plan as DeepseekV32Config.base_model_tp_plan + DeepseekV32ForCausalLM._tp_plan, with full module names.
TP_PLAN = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.q_b_proj": "colwise",
    "model.layers.*.self_attn.kv_b_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "model.layers.*.mlp.shared_experts.gate_proj": "colwise",
    "model.layers.*.mlp.shared_experts.up_proj": "colwise",
    "model.layers.*.mlp.shared_experts.down_proj": "rowwise",
    "model.layers.*.mlp.experts": "deepseek_v32_local_experts",
    "lm_head": "colwise_gather_output",
}


def _prefill_and_decode(model, ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prefill over ``ids[:, :-1]`` and of one decode step feeding ``ids[:, -1:]`` on its cache."""
    with torch.no_grad():
        out = model(ids[:, :-1].to(device), use_cache=True)
        step = model(ids[:, -1:].to(device), past_key_values=out.past_key_values, use_cache=True)
    return tuple(_full(logits).float().cpu() for logits in (out.logits, step.logits))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _sharded_modules(model) -> list[str]:
    """Wildcarded names of the modules holding a sharded (non-replicated) parameter."""
    names = set()
    for name, param in model.named_parameters():
        placements = getattr(param, "placements", ())
        if any(not p.is_replicate() for p in placements) or getattr(param, "_is_sharded", False):
            module = name.rpartition(".")[0]
            names.add(".".join("*" if part.isdigit() else part for part in module.split(".")))
    return sorted(names)


def _routed_experts(model) -> dict:
    """This rank's routed experts: indices held per MoE layer (a None entry is an expert not materialized here)
    and their parameter elements."""
    held, elements = {}, 0
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            held[name] = [index for index, expert in enumerate(module) if expert is not None]
            elements += sum(p.numel() for p in module.parameters())
    return {"held": held, "param_elements": elements}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory; default: a seeded tiny random model")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on GPUs")
    parser.add_argument("--no-q-lora", action="store_true", help="random model without query LoRA (q_proj)")
    parser.add_argument("--output", default=None, help="also write rank 0's JSON result to this file")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    import modeling_deepseek_v32  # noqa: F401  (registers the classes)
    from modeling_deepseek_v32.testing_utils import random_model, tiny_config

    rank = int(os.environ["RANK"])
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if not args.cpu:
        torch.cuda.set_device(device)
    path = args.model
    if path is None:
        # Per launch (the rendezvous port differs), so two checks at once do not share a directory.
        suffix = "q_proj" if args.no_q_lora else "q_lora"
        path = os.path.join(tempfile.gettempdir(), f"tp_check_model_{suffix}_{os.environ.get('MASTER_PORT', '0')}")
        if rank == 0:
            overrides = {"q_lora_rank": None} if args.no_q_lora else {}
            random_model(tiny_config(intermediate_size=128, **overrides), seed=0).save_pretrained(path)
        dist.init_process_group("gloo" if args.cpu else "nccl")
        dist.barrier()
    # 24 prompt tokens: more than the tiny preset's index_topk (8), so the indexer's selection is sparse.
    ids = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    expected_prefill, expected_decode = _prefill_and_decode(reference, ids, device)
    reference_memory = torch.cuda.max_memory_allocated(device) if not args.cpu else None
    full_elements = sum(p.numel() for p in reference.parameters())
    full_experts = _routed_experts(reference)
    del reference
    if not args.cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # "auto": the plan declared by the classes (config.base_model_tp_plan + the causal LM's _tp_plan), which
    # TP_PLAN spells out; pass TP_PLAN itself to a transformers that does not read class plans.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto").eval()
    prefill, decode = _prefill_and_decode(model, ids, model.device)
    local_elements = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    experts_per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(experts_per_rank, _routed_experts(model))
    result = {
        "world_size": dist.get_world_size(),
        "max_abs_logit_diff_prefill": (prefill - expected_prefill).abs().max().item(),
        "max_abs_logit_diff_decode": (decode - expected_decode).abs().max().item(),
        "logit_scale": expected_prefill.abs().max().item(),
        "sharded_modules": _sharded_modules(model),
        "local_param_elements": local_elements,
        "full_param_elements": full_elements,
        "routed_experts_per_layer": {name: len(held) for name, held in full_experts["held"].items()},
        "routed_expert_param_elements_full": full_experts["param_elements"],
        "routed_experts_per_rank": experts_per_rank,
    }
    if not args.cpu:
        result["peak_memory_bytes_unsharded"] = reference_memory
        result["peak_memory_bytes_tp_rank0"] = torch.cuda.max_memory_allocated(device)
    if rank == 0:
        print(json.dumps(result), flush=True)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
