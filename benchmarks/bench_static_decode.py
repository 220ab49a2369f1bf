"""Decode ms/token with the static cache (CUDA-graph steps) vs the dynamic cache, bench preset, one GPU.

For each context: one batch-1 prefill (dynamic cache), then for each batch size the same cache repeated, and
``--steps`` timed greedy decode steps (after ``--warmup``; the static cache captures its graph during the warm-up)
through ``model(tokens, past_key_values=cache)``: once with the dynamic cache and once with a
``DeepseekV32StaticCache`` built from it. Both runs start from the same cache and token, so the greedy tokens they
produce are compared too (``tokens_agree``). Optionally (``--generate-tokens``) end-to-end ``generate`` at batch 1
with and without ``cache_implementation="static"``. Writes JSON after every point. Not a test.

    python benchmarks/bench_static_decode.py --out static_decode.json --contexts 1024,8192,32768 --batches 1,8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_long_context as common  # noqa: E402  (model builder and GPU helpers)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="static_decode.json")
    parser.add_argument("--contexts", type=common._ints, default=common._ints("1024,8192,32768"))
    parser.add_argument("--batches", type=common._ints, default=common._ints("1,8"))
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per point")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (static: 2 eager + capture)")
    parser.add_argument("--generate-tokens", type=int, default=0, help="also time generate() at batch 1 (0: off)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--fp8", action="store_true", help="a random model with 128x128 block-FP8 linears (as --models ours_fp8 in bench_long_context.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="bench", help=argparse.SUPPRESS)  # "tiny" + --device cpu: smoke test
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _timed_steps(model, cache, tokens, args):
    import torch

    times, produced = [], []
    with torch.no_grad():
        for step in range(args.warmup + args.steps):
            common._sync()
            start = time.perf_counter()
            out = model(tokens, past_key_values=cache, use_cache=True)
            tokens = out.logits[:, -1:].argmax(-1)
            common._sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            produced.append(tokens)
            cache = out.past_key_values
    times.sort()
    return times, torch.cat(produced, dim=1), cache


def _point(model, prefilled, next_token, context, batch, args):
    import torch

    from modeling_deepseek_v32.static_decode import DeepseekV32StaticCache

    row = {"context": context, "batch": batch}
    for mode in ("dynamic", "static"):
        cache = copy.deepcopy(prefilled)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        if mode == "static":
            cache = DeepseekV32StaticCache.from_cache(model, cache, context + args.warmup + args.steps + 1)
        common._free()
        common._reset_peak()
        try:
            times, tokens, cache = _timed_steps(model, cache, next_token.repeat(batch, 1), args)
        except torch.cuda.OutOfMemoryError:
            row[mode] = {"status": "oom"}
            continue
        entry = {"ms_per_step_median": round(1e3 * times[len(times) // 2], 3),
                 "ms_per_step_min": round(1e3 * times[0], 3),
                 "ms_per_step_mean": round(1e3 * sum(times) / len(times), 3), "peak_gib": common._gib(common._peak())}  # fmt: skip
        if mode == "static":
            entry["graph"] = cache.decoder.graph is not None
            entry["capacity"] = cache.max_cache_len
            row["tokens_agree"] = float((tokens == row.pop("_tokens")).float().mean())
        else:
            row["_tokens"] = tokens
        row[mode] = entry
        del cache
        common._free()
    if "dynamic" in row and "static" in row and "ms_per_step_median" in row["static"]:
        row["speedup"] = round(row["dynamic"]["ms_per_step_median"] / row["static"]["ms_per_step_median"], 2)
    row.pop("_tokens", None)
    return row


def _generate_point(model, ids, args):
    import torch

    row = {"context": ids.shape[1], "batch": 1, "new_tokens": args.generate_tokens}
    for mode in ("dynamic", "static", "static_again"):
        extra = {"cache_implementation": "static"} if mode != "dynamic" else {}
        common._sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.generate_tokens, min_new_tokens=args.generate_tokens,
                                 do_sample=False, **extra)  # fmt: skip
        common._sync()
        row[f"{mode}_seconds"] = round(time.perf_counter() - start, 4)
        row[f"{mode}_tokens"] = out[0, ids.shape[1]:].tolist()
    row["tokens_agree"] = row.pop("dynamic_tokens") == row.pop("static_tokens") == row.pop("static_again_tokens")
    return row


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers

    common.DEVICE = args.device
    from modeling_deepseek_v32.kernels import kernels_enabled

    args.models, args.time_budget = "ours", 0
    model = common.build_ours(args, fp8=args.fp8)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    results = {"meta": {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "kernels_enabled": kernels_enabled(), "args": vars(args)},
               "decode": [], "generate": []}  # fmt: skip

    def save():
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)

    with torch.no_grad():  # warm-up: Triton compiles for prefill and decode
        out = model(torch.randint(0, vocab, (1, min(256, model.config.max_position_embeddings // 2)), device=args.device, generator=gen), use_cache=True)
        model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        del out
    for context in args.contexts:
        ids = torch.randint(0, vocab, (1, context), device=args.device, generator=gen)
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
        prefilled, next_token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        for batch in args.batches:
            row = _point(model, prefilled, next_token, context, batch, args)
            results["decode"].append(row)
            print(json.dumps(row), flush=True)
            save()
        del prefilled
        if args.generate_tokens:
            row = _generate_point(model, ids, args)
            results["generate"].append(row)
            print(json.dumps(row), flush=True)
            save()
        common._free()
    save()


if __name__ == "__main__":
    main()
