#!/usr/bin/env python
"""Train the "nano" DeepSeek-V3.2 shipped with the package, on Python source every installation has (the standard
library, transformers, torch).

Every architectural feature is on: MLA with q-LoRA, DSA with ``index_topk`` below the context length (its indexer
trained by the KL objective of DeepSeek's V3.2 report), grouped MoE with shared experts and auxiliary-loss-free bias
balancing, one MTP module (trained with the MTP loss) and YaRN. Its byte-level BPE tokenizer is trained here too.
Everything is seeded; the output directory gets the checkpoint, tokenizer, generation config, a model card and
``training_log.json`` (data files and their hash, steps, loss curve, MTP acceptance).

    python scripts/train_nano.py --output nano --minutes 6          # on a GPU
    python scripts/train_nano.py --output /tmp/nano --steps 20 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}


def nano_config(vocab_size: int, context: int):
    from modeling_deepseek_v32 import DeepseekV32Config

    return DeepseekV32Config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=640, moe_intermediate_size=160,
        num_hidden_layers=4, first_k_dense_replace=1, num_nextn_predict_layers=1, num_attention_heads=4,
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=1.5, index_n_heads=4, index_head_dim=64, index_topk=128,
        max_position_embeddings=4 * context,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": context,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        mtp_loss_weight=0.3, indexer_loss_coef=1.0, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip


def corpus_files(sources: list[str]) -> list[Path]:
    """Python source every machine with this package has: the standard library and installed dependencies."""
    files = []
    for source in sources:
        if source == "stdlib":
            root, skipped = Path(sysconfig.get_paths()["stdlib"]), SKIPPED_DIRS
        else:  # an installed package; transformers' 400+ model folders would make the corpus repetitive
            root, skipped = Path(importlib.import_module(source).__file__).parent, SKIPPED_DIRS | {"models", "testing"}
        found = [path for path in sorted(root.rglob("*.py")) if not skipped & set(path.relative_to(root).parts)]
        files.extend(path for path in found if path.stat().st_size < 400_000)
    return files


def read_texts(files: list[Path]) -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for encoding in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoding + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.int32)


def batches(stream: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=generator)
        yield torch.stack([stream[s : s + context] for s in starts.tolist()]).long()


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, context: int, device: str, batches_: int = 8) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    data = batches(stream, 16, context, generator)
    for _ in range(batches_):
        ids = next(data).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            losses.append(float(model(ids, labels=ids).loss))
    model.train()
    return sum(losses) / len(losses)


def code_excerpt(text: str, chars: int) -> str:
    """``chars`` characters from the first top-level function on (module headers are licence text and prose)."""
    start = text.find("\ndef ") + 1
    return text[start : start + chars]


def mtp_acceptance(model, tokenizer, texts: list[str], device: str) -> dict:
    prompts = [code_excerpt(text, 300) for text in texts[:8]]
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False, use_mtp=True, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return {"acceptance": out.mtp_acceptance, "tokens_per_forward": out.tokens_per_forward}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory for the checkpoint")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=None, help="number of steps (default: as many as --minutes allow)")
    parser.add_argument("--minutes", type=float, default=6.0, help="time budget when --steps is not given")
    parser.add_argument("--bias-gamma", type=float, default=1e-3, help="aux-loss-free balancing step")
    parser.add_argument("--dense-warmup", type=float, default=0.15,
                        help="fraction of the run with dense attention while the indexer learns to imitate it")
    parser.add_argument("--corpus", default="stdlib,transformers,torch",
                        help="comma-separated sources: 'stdlib' and/or installed packages whose .py files to train on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from modeling_deepseek_v32 import DeepseekV32ForCausalLM
    from modeling_deepseek_v32.training import update_routing_bias

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    sources = args.corpus.split(",")
    files = corpus_files(sources)
    texts = read_texts(files)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    held_out = set(order[: max(1, len(order) // 50)])
    train_texts = [texts[i] for i in range(len(texts)) if i not in held_out]
    val_texts = [texts[i] for i in sorted(held_out)]
    print(f"corpus: {len(files)} files, {sum(map(len, texts)) / 1e6:.1f} MB, sha256 {digest}", file=sys.stderr)

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_stream, val_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    print(f"tokens: {len(train_stream) / 1e6:.2f} M train, {len(val_stream) / 1e6:.2f} M validation", file=sys.stderr)

    config = nano_config(len(tokenizer), args.context)
    model = DeepseekV32ForCausalLM(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(train_stream, args.batch, args.context, torch.Generator().manual_seed(args.seed))
    total_steps = args.steps or 10**9
    log, start, step = [], time.perf_counter(), 0
    while step < total_steps:
        if args.steps is None and time.perf_counter() - start > 60 * args.minutes:
            break
        planned = args.steps or max(step + 1, int(step / max(1e-9, (time.perf_counter() - start) / (60 * args.minutes))))
        progress = step / (planned if args.steps is None else total_steps)
        # DSA training as in DeepSeek's V3.2 report, from scratch: attention dense while the indexer learns to imitate
        # it (KL to the head-summed attention), then sparse attention with the indexer trained on its selection.
        model.config.indexer_training = "dense_warmup" if progress < args.dense_warmup else "sparse"
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, planned if args.steps is None else total_steps, args.lr)
        ids = next(data).to(args.device)
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balance = update_routing_bias(model, args.bias_gamma).summary()
        if step % 25 == 0:
            entry = {"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": round(out.loss.item(), 4),
                     "mtp_loss": round(out.mtp_loss.item(), 4) if out.mtp_loss is not None else None}  # fmt: skip
            entry.update({key: round(value, 3) for key, value in balance.items()})
            for name in ("indexer_loss", "aux_loss"):
                value = getattr(out, name, None)
                if value is not None:
                    entry[name] = round(value.item(), 4)
            log.append(entry)
            print(json.dumps(entry), file=sys.stderr)
        step += 1

    model.config.indexer_training = None
    val_loss = evaluate(model, val_stream, args.context, args.device)
    model.eval()
    acceptance = mtp_acceptance(model, tokenizer, val_texts, args.device)
    output = Path(args.output)
    model.to(torch.bfloat16).save_pretrained(output, max_shard_size="10MB")
    tokenizer.save_pretrained(output)
    record = {
        "seed": args.seed, "steps": step, "batch": args.batch, "context": args.context, "lr": args.lr,
        "data": {"sources": source_versions(sources), "files": len(files), "sha256": digest,
                 "train_tokens": len(train_stream), "note": ".py files; stdlib tests and package models/ excluded"},
        "validation_loss": round(val_loss, 4), "mtp": acceptance, "log": log,
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
    }  # fmt: skip
    (output / "training_log.json").write_text(json.dumps(record, indent=1))
    (output / "README.md").write_text(model_card(record))
    print(json.dumps({k: v for k, v in record.items() if k != "log"}), file=sys.stderr)
    return 0


def source_versions(sources: list[str]) -> dict[str, str]:
    from importlib.metadata import version

    return {name: sys.version.split()[0] if name == "stdlib" else version(name) for name in sources}


def model_card(record: dict) -> str:
    mtp = record["mtp"]
    acceptance = ", ".join(f"{rate:.0%}" for rate in mtp["acceptance"])
    sources = ", ".join(
        f"Python {v} standard library" if k == "stdlib" else f"{k} {v}" for k, v in record["data"]["sources"].items()
    )
    return f"""---
license: mit
library_name: transformers
pipeline_tag: text-generation
tags: [deepseek_v32, mla, dsa, moe, mtp, nano]
---

# DeepSeek-V3.2 nano (Python source)

A {record["parameters"] / 1e6:.1f}M-parameter DeepSeek-V3.2 with every architectural feature on (MLA with q-LoRA, DSA with
`index_topk` 128 below the {record["context"]}-token context, grouped MoE with a shared expert and bias balancing, one
MTP module, YaRN), trained by `scripts/train_nano.py` of the `deepseek-v32` package on Python source code that
ships with every installation of it ({sources}: {record["data"]["files"]} files, sha256 {record["data"]["sha256"]}),
with its own {len_vocab(record)} byte-level BPE tokenizer.

- {record["steps"]} steps of {record["batch"]} x {record["context"]} tokens, seed {record["seed"]}; validation loss
  {record["validation_loss"]} (held-out files).
- MTP greedy self-speculative decoding on held-out files: acceptance {acceptance},
  {mtp["tokens_per_forward"]:.2f} tokens per main forward.

It completes Python code in the style of those libraries; it knows nothing else. `training_log.json` holds the
loss curve.
"""


def len_vocab(record: dict) -> str:
    return f"{record.get('vocab_size', 4096)}-token"


if __name__ == "__main__":
    sys.exit(main())
