"""Derive a smaller DeepSeek-V3.2 checkpoint from a big one: first N layers, a subset of experts, MTP kept or not.

For fast experiments with real weights: ``--num-layers 4 --num-experts 32`` turns the 671B release into a model
that loads on one machine and still routes, attends and drafts like the original (only shallower and narrower).

* Layers: layers ``0..N-1`` are kept unchanged. The MTP layer, stored after the last main layer
  (``model.layers.{num_hidden_layers}``), is renumbered to ``model.layers.{N}`` so it stays where the config puts
  it; ``first_k_dense_replace`` is capped at N so it is still an MoE block.
* Experts: each MoE layer keeps the same number K of experts (``n_routed_experts`` is global), renumbered 0..K-1 in
  ascending original order. The router keeps exactly the kept experts' rows of ``mlp.gate.weight`` and entries of
  ``e_score_correction_bias``. That is the whole re-normalization needed: sigmoid scores are per expert (a softmax
  router is renormalized by construction over the remaining logits), and the top-k weights are normalized over the
  chosen experts at run time (``norm_topk_prob``). A derived model with all experts routes identically; with a
  subset it routes exactly as the original would if the dropped experts could never win.
* ``--expert-selection per-group`` (default) keeps the first K/n_group experts of every routing group, so the group
  structure survives; ``first`` keeps experts 0..K-1; ``--experts-file`` gives explicit per-layer lists.

Usage::

    python -m modeling_deepseek_v32.conversion.derive /data/DeepSeek-V3.2 /data/v32-4L-32E \\
        --num-layers 4 --num-experts 32

Tensors are copied bit for bit (FP8 weights and scales included), one at a time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_config_dict
from .common import add_common_arguments, config_bytes, expected_tensors, run_cli, validated_config
from .demo_names import layer_index
from .output import copyable_side_files, plan_hf_shards, write_checkpoint
from .shards import CheckpointError, TensorPlan
from .verify import check_output

__all__ = ["derive_checkpoint", "select_experts", "main"]

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d+)(\..*)$")


def select_experts(n_experts: int, n_group: int, keep: int, strategy: str = "per-group") -> list[int]:
    """Which ``keep`` of ``n_experts`` experts to keep: the first ``keep/n_group`` of every group, or the first ``keep``."""
    if not 1 <= keep <= n_experts:
        raise CheckpointError(f"--num-experts must be between 1 and n_routed_experts ({n_experts}), got {keep}")
    if strategy == "first":
        return list(range(keep))
    if strategy != "per-group":
        raise CheckpointError(f"unknown expert selection {strategy!r}; use 'per-group' or 'first'")
    if keep % n_group:
        raise CheckpointError(
            f"--expert-selection per-group keeps the same number of experts in each of the {n_group} groups, so "
            f"--num-experts must be a multiple of {n_group}, got {keep} (or use --expert-selection first)"
        )
    size = n_experts // n_group
    return [g * size + j for g in range(n_group) for j in range(keep // n_group)]


def _expert_lists(config, layers: list[int], num_experts, strategy, experts_file) -> dict[int, list[int]]:
    """Kept experts per source MoE layer (all the same length)."""
    n = config.n_routed_experts
    default = select_experts(n, config.n_group, num_experts, strategy) if num_experts else list(range(n))
    overrides: dict[int, list[int]] = {}
    if experts_file is not None:
        try:
            data = json.loads(Path(experts_file).read_text(encoding="utf-8"))
            for key, ids in data.items():
                if key == "default":
                    default = [int(i) for i in ids]
                else:
                    overrides[int(key)] = [int(i) for i in ids]
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{experts_file}: expected a JSON object {{\"default\" or layer index: [expert ids]}} ({exc})") from exc
    lists = {}
    for layer in layers:
        if not config.is_moe_layer(layer):
            continue
        ids = sorted(overrides.get(layer, default))
        if len(set(ids)) != len(ids) or any(not 0 <= i < n for i in ids):
            raise CheckpointError(f"layer {layer}: expert ids must be distinct and in [0, {n}), got {ids}")
        lists[layer] = ids
    unknown = sorted(set(overrides) - set(lists))
    if unknown:
        raise CheckpointError(f"{experts_file}: layers {unknown} are not kept MoE layers of the source")
    sizes = {len(ids) for ids in lists.values()}
    if len(sizes) > 1:
        raise CheckpointError(f"every MoE layer must keep the same number of experts, got {sorted(sizes)}")
    return lists


def _derived_config(raw: dict, config, num_layers: int, mtp_layers: int, keep: int, overrides: dict) -> dict:
    new = dict(raw)
    new["num_hidden_layers"] = num_layers
    new["num_nextn_predict_layers"] = mtp_layers
    # The MTP block (layer num_layers) must stay MoE, and layers below N keep their dense/MoE kind.
    new["first_k_dense_replace"] = min(config.first_k_dense_replace, num_layers)
    new["n_routed_experts"] = keep
    n_group = overrides.get("n_group") or (config.n_group if keep % config.n_group == 0 else 1)
    topk_group = overrides.get("topk_group") or min(config.topk_group, n_group)
    reachable = topk_group * (keep // n_group)
    top_k = overrides.get("num_experts_per_tok") or min(config.num_experts_per_tok, keep, reachable)
    new.update(n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k)
    return new


def derive_checkpoint(
    source: str | Path,
    output: str | Path,
    num_layers: int | None = None,
    num_experts: int | None = None,
    expert_selection: str = "per-group",
    experts_file: str | Path | None = None,
    keep_mtp: bool = True,
    n_group: int | None = None,
    topk_group: int | None = None,
    num_experts_per_tok: int | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the derived checkpoint to ``output`` (see the module docstring); returns ``output``."""
    ckpt = Checkpoint(source)
    raw = load_config_dict(source)
    config = validated_config(raw, str(Path(source) / "config.json"))
    total = config.num_hidden_layers
    n = total if num_layers is None else num_layers
    if not 1 <= n <= total:
        raise CheckpointError(f"--num-layers must be between 1 and num_hidden_layers ({total}), got {n}")
    mtp = config.num_nextn_predict_layers if keep_mtp else 0
    # Source layer -> derived layer: main layers keep their index, MTP layers move to sit right after layer n-1.
    layer_map = {i: i for i in range(n)} | {total + k: n + k for k in range(mtp)}
    kept = _expert_lists(config, list(layer_map), num_experts, expert_selection, experts_file)
    keep = len(next(iter(kept.values()))) if kept else config.n_routed_experts
    overrides = {"n_group": n_group, "topk_group": topk_group, "num_experts_per_tok": num_experts_per_tok}
    new_raw = _derived_config(raw, config, n, mtp, keep, overrides)
    expected = expected_tensors(validated_config(new_raw, "derived config"))

    plans: dict[str, TensorPlan] = {}
    for name in ckpt.names:
        info = ckpt.info(name)
        layer = layer_index(name)
        if layer is None:
            plans[name] = TensorPlan(name, info.dtype, info.shape, lambda n=name: ckpt.get(n))
            continue
        if layer not in layer_map:
            continue
        new_name = f"model.layers.{layer_map[layer]}." + name.split(".", 3)[3]
        expert = _EXPERT.match(new_name)
        ids = kept.get(layer)
        if expert and ids is not None:
            old = int(expert.group(2))
            if old not in ids:
                continue
            new_name = f"{expert.group(1)}{ids.index(old)}{expert.group(3)}"
        if ids is not None and name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")):
            index = torch.tensor(ids)
            shape = (len(ids),) + info.shape[1:]
            plans[new_name] = TensorPlan(new_name, info.dtype, shape, lambda n=name, i=index: ckpt.get(n).index_select(0, i))
        else:
            plans[new_name] = TensorPlan(new_name, info.dtype, info.shape, lambda n=name: ckpt.get(n))
    unexpected = sorted(set(plans) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: tensors the derived config does not describe: {unexpected[:10]}")
    ordered = [plans[name] for name in expected if name in plans]

    summary = (
        f"derived: {n} layers + {mtp} MTP, {keep} experts per MoE layer, n_group {new_raw['n_group']}, "
        f"topk_group {new_raw['topk_group']}, {new_raw['num_experts_per_tok']} experts per token"
    )
    print(summary, file=sys.stderr)
    side = {**copyable_side_files(source), "config.json": config_bytes(new_raw)}
    job = {
        "command": "derive",
        "config": new_raw,
        "experts": {str(k): v for k, v in kept.items()},
        "max_shard_size": str(max_shard_size),
        "inputs": ckpt.source_signature(),
    }
    write_checkpoint(
        output, plan_hf_shards(ordered, max_shard_size), job=job, inputs=[source], side_files=side,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return check_output(output)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_deepseek_v32.conversion.derive",
        description="Derive a smaller DeepSeek-V3.2 checkpoint: keep the first N layers and/or K experts per MoE "
        "layer (router rows and bias selected to match), keep or drop the MTP layer (renumbered to stay last).",
    )
    parser.add_argument("source", help="HF checkpoint directory (never modified)")
    parser.add_argument("output", help="output directory")
    parser.add_argument("--num-layers", type=int, help="keep layers 0..N-1 (default: all)")
    parser.add_argument("--num-experts", type=int, help="experts to keep per MoE layer (default: all)")
    parser.add_argument(
        "--expert-selection", choices=("per-group", "first"), default="per-group",
        help="per-group: the first K/n_group experts of every routing group (default); first: experts 0..K-1",
    )  # fmt: skip
    parser.add_argument(
        "--experts-file",
        help='JSON {"default": [ids], "<source layer>": [ids], ...} with explicit experts to keep (same count everywhere)',
    )
    parser.add_argument("--drop-mtp", action="store_true", help="drop the MTP layer(s) (num_nextn_predict_layers = 0)")
    parser.add_argument("--n-group", type=int, help="routing groups of the derived model (default: kept if it divides K, else 1)")
    parser.add_argument("--topk-group", type=int, help="groups kept per token (default: min(source, n_group))")
    parser.add_argument("--num-experts-per-tok", type=int, help="experts per token (default: min(source, reachable))")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    out = derive_checkpoint(
        args.source, args.output, args.num_layers, args.num_experts, args.expert_selection, args.experts_file,
        not args.drop_mtp, args.n_group, args.topk_group, args.num_experts_per_tok, args.max_shard_size,
        args.overwrite, not args.no_progress,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors are printed as one line, not a traceback)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
