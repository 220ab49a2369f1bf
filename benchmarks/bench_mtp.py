#!/usr/bin/env python
"""Decode speed with and without MTP self-speculative decoding, and the MTP head's acceptance rate.

Greedy decoding of prompts taken from the Python standard library (the shipped nano model's domain), at each batch
size, timed after a warm-up; both paths produce the same tokens (greedy MTP is exact), which the script checks.

    python benchmarks/bench_mtp.py --out mtp.json                       # the shipped nano model, on CUDA if present
    python benchmarks/bench_mtp.py --model path/to/ckpt --batches 1,8 --new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch


def stdlib_prompts(count: int, chars: int) -> list[str]:
    """Code from standard-library modules, from the end of the sorted list."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 4 * chars)[::-1][:count]
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    # From the first top-level function on: module headers are licence text and prose, not the code being completed.
    return [text[text.find("\ndef ") + 1 :][:chars] for text in texts]


def timed_generate(model, inputs, new_tokens: int, use_mtp: bool, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_mtp=use_mtp,
            return_dict_in_generate=True,
        )  # fmt: skip
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or Hub id (default: the shipped nano model)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from modeling_deepseek_v32 import DeepseekV32ForCausalLM, default_model_path

    source = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    model = DeepseekV32ForCausalLM.from_pretrained(source, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    results = {"model": source, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "dtype": args.dtype, "new_tokens": args.new_tokens, "runs": []}  # fmt: skip
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = stdlib_prompts(batch, args.prompt_chars)
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
        for use_mtp in (False, True):  # warm-up: kernels, allocator, autotuning
            timed_generate(model, inputs, 8, use_mtp, 1)
        plain_s, plain = timed_generate(model, inputs, args.new_tokens, False, args.repeats)
        mtp_s, mtp = timed_generate(model, inputs, args.new_tokens, True, args.repeats)
        generated = batch * args.new_tokens
        prompt_len = inputs["input_ids"].shape[1]
        same = (plain.sequences[:, prompt_len:] == mtp.sequences[:, prompt_len:]).float().mean().item()
        run = {
            "batch": batch, "prompt_tokens": prompt_len,
            "plain_tokens_per_s": round(generated / plain_s, 1), "mtp_tokens_per_s": round(generated / mtp_s, 1),
            "speedup": round(plain_s / mtp_s, 3), "acceptance": [round(a, 3) for a in mtp.mtp_acceptance],
            "tokens_per_forward": round(mtp.tokens_per_forward, 3), "identical_tokens": round(same, 4),
        }  # fmt: skip
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
