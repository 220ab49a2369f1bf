#!/usr/bin/env python
"""Full fine-tuning of DeepSeek-V3.2 sharded with FSDP2 through ``transformers.Trainer``, with checkpoint resume.

Every decoder layer (and MTP layer) is one FSDP2 unit (``fully_shard``): each rank keeps 1/N of every parameter and
of its optimizer state, and gathers a layer's weights only while running it. Checkpoints are sharded
(``SHARDED_STATE_DICT``: each rank writes its own shards) and ``--resume`` continues from the newest one.

    # 2 GPUs (NCCL):
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --output out --steps 20
    # or with accelerate and the config next to this script:
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/fsdp2_train.py --output out
    # 2 CPU processes (gloo), as the test suite runs it (plain loop, see below):
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --output out --steps 6 --cpu

accelerate enables FSDP only for accelerator processes, so with ``--cpu`` the script runs the same sharding without
``Trainer``: ``fully_shard`` per layer, AdamW, the router bias update, and ``torch.distributed.checkpoint`` for the
sharded model + optimizer checkpoint. Each rank takes its own slice of a fixed batch sequence, so a run on N ranks
follows one unsharded run on the N slices together (tests/test_training_fsdp.py checks that, and resuming).

Without ``--model`` it trains a seeded tiny random model on bytes of Python standard library sources, so it needs
no download. The last line printed by rank 0 is a JSON summary (losses, shard sizes, resumed step).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

LAYER_CLASSES = ["DeepseekV32DecoderLayer", "DeepseekV32MTPLayer"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (bf16/fp32); default: tiny random model")
    parser.add_argument("--output", required=True, help="directory for checkpoints")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: steps / 2)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --output")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N steps (to test resuming)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo), plain loop instead of Trainer")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    return parser.parse_args(argv)


class ByteBlocks(torch.utils.data.Dataset):
    """Bytes of a few standard library modules as token ids 0..255 (the tiny model's vocabulary has 512)."""

    def __init__(self, seq_len: int):
        import functools
        import textwrap

        data = (inspect.getsource(textwrap) + inspect.getsource(functools)).encode()
        ids = torch.tensor(list(data), dtype=torch.long)
        self.blocks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


class ShardReport(TrainerCallback):
    """Records, once training has wrapped the model, how many parameter elements this rank holds locally."""

    def __init__(self):
        self.local = self.full = 0
        self.sharded_tensors = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.full or model is None:
            return
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            self.sharded_tensors += hasattr(param, "to_local")
            self.local += local.numel()
            self.full += param.numel()


class StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def build_model(path: str | None):
    from transformers import AutoModelForCausalLM

    import modeling_deepseek_v32  # noqa: F401  (registers the classes with AutoModelForCausalLM)
    from modeling_deepseek_v32.testing_utils import random_model, tiny_config

    if path is None:
        model = random_model(tiny_config(mtp_loss_weight=0.3), seed=0).train()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if model.config.indexer_training is None:
        # The indexer learns only from its own loss (config.indexer_training); without it its weights never get a
        # gradient, AdamW keeps no state for them, and a sharded optimizer checkpoint would miss their entries.
        for name, param in model.named_parameters():
            if ".indexer." in name:
                param.requires_grad_(False)
    return model


def global_batch(step: int, world: int, batch: int, seq_len: int) -> torch.Tensor:
    """The ``step``-th global batch (``world * batch`` rows) of byte blocks; rank r takes rows ``r*batch:(r+1)*batch``."""
    blocks = ByteBlocks(seq_len).blocks
    generator = torch.Generator().manual_seed(step)
    return blocks[torch.randint(0, len(blocks), (world * batch,), generator=generator)]


def plain_fsdp_loop(args: argparse.Namespace) -> dict:
    """FSDP2 without Trainer (CPU/gloo): shard, train, checkpoint with torch.distributed.checkpoint, resume."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from modeling_deepseek_v32.training import keep_experts_in_graph, update_routing_bias

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.model)
    # Experts idle on one rank would otherwise have no gradient there, and FSDP2's reduce-scatter sizes differ.
    keep_experts_in_graph(model)
    for layer in model.model.layers:  # decoder and MTP layers: one FSDP unit each
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    checkpoint_dir = os.path.join(args.output, "checkpoint")
    start = 0
    if args.resume:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "step": torch.zeros((), dtype=torch.long)}
        dcp.load(state, checkpoint_id=checkpoint_dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        start = int(state["step"])
    losses = []
    stop = min(args.steps, args.stop_after or args.steps)
    for step in range(start, stop):
        ids = global_batch(step, world, args.batch, args.seq_len)[rank * args.batch : (rank + 1) * args.batch]
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_routing_bias(model, 1e-3)  # loads all-reduced over ranks: every rank applies the same step
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world)
    # The routers' biases (buffers, the only state not in the parameters) are saved with the model state.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(stop)}
    dcp.save(state, checkpoint_id=checkpoint_dir)
    local = sum(p.to_local().numel() for p in model.parameters())
    full = sum(p.numel() for p in model.parameters())
    biases = torch.cat([b.detach().float().flatten() for n, b in model.named_buffers() if "e_score" in n])
    gathered = [torch.zeros_like(biases) for _ in range(world)]
    dist.all_gather(gathered, biases)
    summary = {
        "world_size": world, "start_step": start, "global_step": stop, "losses": losses,
        "local_param_elements": local, "full_param_elements": full,
        "sharded_tensors": sum(hasattr(p, "to_local") for p in model.parameters()),
        "bias_spread_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered),
    }  # fmt: skip
    dist.destroy_process_group()
    return summary if rank == 0 else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu:
        summary = plain_fsdp_loop(args)
        if summary:
            print(json.dumps(summary), flush=True)
        return 0
    from modeling_deepseek_v32.training import DeepseekV32BiasUpdateCallback, keep_experts_in_graph

    torch.manual_seed(0)
    model = build_model(args.model)
    keep_experts_in_graph(model)  # an expert idle on one rank must still get a (zero) gradient there
    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to=[], seed=0, data_seed=0,
        save_strategy="steps", save_steps=args.save_steps or max(1, args.steps // 2), save_only_model=False,
        bf16=args.bf16, disable_tqdm=True, dataloader_num_workers=0,
        # FSDP2: one unit per decoder/MTP layer; sharded checkpoints (each rank writes its shards).
        fsdp="full_shard auto_wrap",
        fsdp_config={
            "version": 2, "transformer_layer_cls_to_wrap": LAYER_CLASSES, "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": False,
        },
    )  # fmt: skip
    shards = ShardReport()
    callbacks = [shards, DeepseekV32BiasUpdateCallback(gamma=1e-3)]
    if args.stop_after:
        callbacks.append(StopAfter(args.stop_after))
    trainer = Trainer(model=model, args=training_args, train_dataset=ByteBlocks(args.seq_len), callbacks=callbacks)
    start_step = 0
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(args.output)
        if checkpoint is None:
            raise SystemExit(f"--resume: no checkpoint in {args.output}")
        start_step = int(checkpoint.rsplit("-", 1)[-1])
        trainer.train(resume_from_checkpoint=checkpoint)
    else:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # The routers' correction biases are buffers, replicated on every rank: they must agree after the updates.
    # Kept on the model's device: NCCL cannot gather CPU tensors.
    biases = torch.cat([b.detach().float().flatten() for n, b in trainer.model.named_buffers() if "e_score" in n])
    world = dist.get_world_size() if dist.is_initialized() else 1
    bias_spread = 0.0
    if world > 1:
        gathered = [torch.zeros_like(biases) for _ in range(world)]
        dist.all_gather(gathered, biases)
        bias_spread = max((g - gathered[0]).abs().max().item() for g in gathered)
    if trainer.is_world_process_zero():
        summary = {
            "world_size": world, "start_step": start_step, "global_step": trainer.state.global_step,
            "losses": losses, "local_param_elements": shards.local, "full_param_elements": shards.full,
            "sharded_tensors": shards.sharded_tensors, "bias_spread_across_ranks": bias_spread,
        }  # fmt: skip
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
