#!/usr/bin/env python
"""Fine-tune DeepSeek-V3.2 with LoRA on attention and expert projections, using ``transformers.Trainer``.

Text files are tokenized, joined with EOS and cut into fixed-length blocks. The MoE routers keep balancing through
DeepSeek's auxiliary-loss-free bias update (``DeepseekV32BiasUpdateCallback``); the biases are buffers, saved with
``--save-merged`` (an adapter-only save keeps the base model's biases).

    # CPU smoke run on the small model shipped with the package, its own tokenizer, stdlib text:
    python examples/finetune_lora.py --output /tmp/lora --steps 20

    # A real checkpoint on GPUs (bf16 weights: LoRA cannot wrap the FP8 linears of the official release, dequantize
    # it first), 2 processes with the accelerate config next to this script:
    accelerate launch --config_file examples/accelerate_config.yaml examples/finetune_lora.py \\
        --model path/to/DeepSeek-V3.2-bf16 --data corpus/*.txt --output out --bf16 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default",
                        help="checkpoint directory or Hub id; 'default' = the small model shipped with the package")
    parser.add_argument("--data", nargs="*", default=None,
                        help="text files to train on (default: a few Python standard library sources)")
    parser.add_argument("--output", required=True, help="directory for the adapter (and the merged model)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training block")
    parser.add_argument("--batch", type=int, default=4, help="blocks per device per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--no-experts", action="store_true", help="adapt attention only, not the routed experts")
    parser.add_argument("--bias-gamma", type=float, default=1e-3, help="router bias update speed (0: off)")
    parser.add_argument("--aux-alpha", type=float, default=0.0, help="sequence-wise MoE balance loss weight")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--save-merged", action="store_true", help="also save the base model with the LoRA merged in")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_texts(paths: list[str] | None) -> list[str]:
    if paths:
        return [Path(path).read_text(encoding="utf-8", errors="replace") for path in paths]
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py", "functools.py", "heapq.py")]


def token_blocks(tokenizer, texts: list[str], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Concatenate the texts' tokens (EOS between documents) and cut them into ``seq_len`` blocks."""
    ids: list[int] = []
    for encoding in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoding + [tokenizer.eos_token_id])
    stream = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    if len(stream) == 0:
        raise SystemExit(f"the data has {len(ids)} tokens, fewer than one block of --seq-len {seq_len}")
    return [{"input_ids": row, "labels": row} for row in stream]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import modeling_deepseek_v32
    from modeling_deepseek_v32.training import DeepseekV32BiasUpdateCallback, get_lora_model, lora_target_modules

    path = modeling_deepseek_v32.default_model_path() if args.model == "default" else args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, moe_aux_loss_alpha=args.aux_alpha)
    if model.config.is_block_fp8:
        raise SystemExit("LoRA needs bf16/fp32 linear weights; dequantize the FP8 checkpoint first")
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=lora_target_modules(experts=not args.no_experts, shared_experts=not args.no_experts),
    )  # fmt: skip
    # get_lora_model rather than peft.get_peft_model: PEFT would otherwise skip the per-expert projections.
    model = get_lora_model(model, lora)
    model.print_trainable_parameters()

    blocks = token_blocks(tokenizer, load_texts(args.data), args.seq_len)
    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), weight_decay=0.0, logging_steps=max(1, args.steps // 20),
        save_strategy="no", report_to=[], seed=args.seed, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
        # A routed expert that got no token in a step has no gradient; DDP must not wait for it.
        ddp_find_unused_parameters=True,
    )  # fmt: skip
    callbacks = [DeepseekV32BiasUpdateCallback(gamma=args.bias_gamma)] if args.bias_gamma > 0 else []
    trainer = Trainer(model=model, args=training_args, train_dataset=blocks, callbacks=callbacks)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        if args.save_merged:
            merged = model.merge_and_unload()
            merged.save_pretrained(Path(args.output) / "merged")
            tokenizer.save_pretrained(Path(args.output) / "merged")
        if losses:
            print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
