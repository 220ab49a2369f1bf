#!/usr/bin/env python
"""Tensor-parallel inference check: ``from_pretrained(tp_plan=...)`` under torchrun gives the logits of one device.

    torchrun --nproc-per-node 2 examples/tp_inference_check.py [--model DIR] [--cpu]

The plan shards what splits cleanly without touching the attention code: the dense MLP and the shared experts
(gate/up colwise, down rowwise: one all-reduce per MLP) and the output head (colwise, gathered). Attention stays
replicated: MLA's ``q_b_proj``/``kv_b_proj``/``o_proj`` could be split by heads, but the attention module reshapes
with the full head count and its absorbed path reads ``kv_b_proj``'s whole matrix; the latent projections
(``kv_a_proj_with_mqa``, ``q_a_proj``) and the indexer are shared by all heads anyway. Routed experts stay
replicated (local). Rank 0 prints a JSON line with the largest logit difference against the unsharded model.
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
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "model.layers.*.mlp.shared_experts.gate_proj": "colwise",
    "model.layers.*.mlp.shared_experts.up_proj": "colwise",
    "model.layers.*.mlp.shared_experts.down_proj": "rowwise",
    "lm_head": "colwise_gather_output",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory; default: a seeded tiny random model")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on GPUs")
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
        path = os.path.join(tempfile.gettempdir(), "tp_check_model")
        if rank == 0:
            random_model(tiny_config(intermediate_size=128), seed=0).save_pretrained(path)
        dist.init_process_group("gloo" if args.cpu else "nccl")
        dist.barrier()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        expected = reference(ids.to(device)).logits.float().cpu()
    del reference
    # "auto": the plan declared by the classes (config.base_model_tp_plan + the causal LM's _tp_plan), which
    # TP_PLAN spells out; pass TP_PLAN itself to a transformers that does not read class plans.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto").eval()
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    diff = (logits.float().cpu() - expected).abs().max().item()
    sharded = sum(hasattr(p, "to_local") or getattr(p, "_is_sharded", False) for p in model.parameters())
    if rank == 0:
        print(json.dumps({"world_size": dist.get_world_size(), "max_abs_logit_diff": diff,
                          "logit_scale": expected.abs().max().item(), "sharded_params": sharded}), flush=True)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
