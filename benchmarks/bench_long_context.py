"""Long-context benchmark: this package's DeepSeek-V3.2 vs transformers' native DeepseekV32ForCausalLM, one GPU.

Builds the "bench" preset (hidden 2048, 6 layers, 64 experts, index top-2048) with random weights in bf16, saves it
with ``save_pretrained`` and loads the same weights into transformers' native model. For each model, one at a time
on the GPU:

* prefill: latency, tokens/s and peak memory at growing S (one forward with ``use_cache=True, logits_to_keep=1``),
  stopping a model at its first out-of-memory (recorded);
* decode: ms/token at the contexts in ``--decode-contexts`` (a subset of the prefill sizes: decode continues from
  that prefill's cache) for batch 1, and for the batches in ``--decode-batches`` by repeating that cache.

Writes JSON (``--out``) and, if matplotlib is importable, a PNG plot next to it. Not a test.

    python benchmarks/bench_long_context.py --out results/long_context.json \
        --prefill-sizes 1024,4096,8192,16384,32768,65536,131072 --decode-contexts 1024,8192,32768,131072 \
        --decode-batches 1,8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="long_context.json", help="JSON results (a .png plot is written beside it)")
    parser.add_argument("--prefill-sizes", type=_ints, default=_ints("1024,4096,8192,16384,32768,65536,131072"))
    parser.add_argument("--decode-contexts", type=_ints, default=_ints("1024,8192,32768,131072"))
    parser.add_argument("--decode-batches", type=_ints, default=_ints("1,8"))
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per point (after 3 warm-up)")
    parser.add_argument("--models", default="ours,native", help="comma list of: ours, ours_fp8, ours_loop (grouped MoE kernel off), native")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: preset's 6)")
    parser.add_argument("--native-attn", default="sdpa", help="attn_implementation for the native model")
    parser.add_argument("--time-budget", type=float, default=1e9,
                        help="seconds per model; skip its remaining points after it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, help="profile one prefill of this size and a decode step")
    parser.add_argument("--warmup-sizes", type=_ints, default=_ints("256,1024,4096"))
    parser.add_argument("--preset", default="bench", help=argparse.SUPPRESS)  # "tiny" + --device cpu: smoke test
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


DEVICE = "cuda"


def _sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _free():
    import torch

    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def _reset_peak() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def build_ours(args, fp8: bool):
    import torch

    from modeling_deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM

    overrides = {"num_nextn_predict_layers": 0}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if fp8:
        overrides["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [128, 128]}  # fmt: skip
    config = DeepseekV32Config.from_preset(args.preset, **overrides)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = DeepseekV32ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_native(directory: str, args):
    import torch
    from transformers.models.deepseek_v32 import DeepseekV32ForCausalLM as Native

    kwargs = dict(dtype=torch.bfloat16, device_map=DEVICE)
    try:
        return Native.from_pretrained(directory, attn_implementation=args.native_attn, **kwargs).eval(), args.native_attn
    except Exception as error:  # an older transformers may not take this attention implementation
        print(f"native with attn_implementation={args.native_attn} failed ({error}); default", flush=True)
        return Native.from_pretrained(directory, **kwargs).eval(), "default"


def _weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def run_model(name: str, model, args, record: dict, deadline: float):
    import torch

    vocab = model.config.vocab_size
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    weights = _weights_bytes(model)
    record["weights_gib"] = _gib(weights)
    prefill, decode = [], []
    record["prefill"], record["decode"] = prefill, decode

    # warm-up: Triton compiles (dense and sparse variants), cuBLAS handles, a decode step
    with torch.no_grad():
        for size in args.warmup_sizes:
            out = model(torch.randint(0, vocab, (1, size), device=DEVICE, generator=gen), use_cache=True,
                        logits_to_keep=1)  # fmt: skip
        model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        del out
    _sync()

    oom = False
    for size in args.prefill_sizes:
        if oom or time.time() > deadline:
            prefill.append({"seq": size, "status": "skipped" if not oom else "oom-earlier"})
            continue
        _free()
        ids = torch.randint(0, vocab, (1, size), device=DEVICE, generator=gen)
        _reset_peak()
        cache = None
        try:
            repeats = 2 if size <= 16384 else 1  # short inputs: best of two
            seconds = float("inf")
            for _ in range(repeats):
                out = None
                _free()
                _sync()
                start = time.perf_counter()
                with torch.no_grad():
                    out = model(ids, use_cache=True, logits_to_keep=1)
                _sync()
                seconds = min(seconds, time.perf_counter() - start)
            cache = out.past_key_values
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
        except torch.cuda.OutOfMemoryError:
            oom = True
            prefill.append({"seq": size, "status": "oom", "peak_gib": _gib(_peak())})
            print(f"[{name}] prefill {size}: OOM", flush=True)
            cache = None
            _free()
            continue
        row = {"seq": size, "status": "ok", "seconds": round(seconds, 4), "tokens_per_s": round(size / seconds, 1),
               "peak_gib": _gib(_peak()),
               "peak_minus_weights_gib": _gib(_peak() - weights)}  # fmt: skip
        prefill.append(row)
        print(f"[{name}] prefill {json.dumps(row)}", flush=True)
        if args.profile and size == args.profile:
            record["profile"] = _profile(model, ids, cache, next_token)
        if size in args.decode_contexts:
            for batch in args.decode_batches:
                if time.time() > deadline:
                    decode.append({"context": size, "batch": batch, "status": "skipped"})
                    continue
                decode.append(_decode(name, model, cache, next_token, size, batch, args))
        del cache
        _free()
    for size in args.decode_contexts:
        if size not in args.prefill_sizes:
            decode.append({"context": size, "status": "not in --prefill-sizes"})


def _profile(model, ids, cache, next_token, top=22):
    """CUDA and CPU time by op (torch.profiler) of one prefill and three decode steps; returns the tables."""
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    tables = {}
    with torch.no_grad():
        with profile(activities=activities) as prof:
            model(ids, use_cache=True, logits_to_keep=1)
            _sync()
        tables["prefill"] = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)
        cache = copy.deepcopy(cache)
        with profile(activities=activities) as prof:
            tokens = next_token
            for _ in range(3):
                out = model(tokens, past_key_values=cache, use_cache=True)
                tokens, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
            _sync()
        tables["decode"] = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)
    for name, table in tables.items():
        print(f"--- profile: {name} ---\n{table}", flush=True)
    return tables


def _decode(name, model, cache, next_token, context, batch, args):
    import copy

    import torch

    try:
        if batch > 1:
            cache = copy.deepcopy(cache)
            cache.batch_repeat_interleave(batch)
            tokens = next_token.repeat(batch, 1)
        else:
            cache = copy.deepcopy(cache)
            tokens = next_token
        _reset_peak()
        times = []
        with torch.no_grad():
            for step in range(3 + args.decode_steps):
                _sync()
                start = time.perf_counter()
                out = model(tokens, past_key_values=cache, use_cache=True)
                tokens = out.logits[:, -1:].argmax(-1)
                _sync()
                if step >= 3:
                    times.append(time.perf_counter() - start)
                cache = out.past_key_values
        times.sort()
        row = {"context": context, "batch": batch, "status": "ok",
               "ms_per_step_median": round(1e3 * times[len(times) // 2], 3),
               "ms_per_step_mean": round(1e3 * sum(times) / len(times), 3),
               "peak_gib": _gib(_peak())}  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        row = {"context": context, "batch": batch, "status": "oom"}
    except Exception as error:
        row = {"context": context, "batch": batch, "status": f"error: {type(error).__name__}: {error}"[:300]}
    print(f"[{name}] decode {json.dumps(row)}", flush=True)
    del cache
    _free()
    return row


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, record in results["models"].items():
        rows = [r for r in record.get("prefill", []) if r.get("status") == "ok"]
        if rows:
            axes[0].plot([r["seq"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=name)
            axes[1].plot([r["seq"] for r in rows], [r["peak_gib"] for r in rows], "o-", label=name)
        for batch in sorted({r.get("batch") for r in record.get("decode", []) if r.get("status") == "ok"}):
            rows = [r for r in record["decode"] if r.get("status") == "ok" and r["batch"] == batch]
            axes[2].plot([r["context"] for r in rows], [r["ms_per_step_median"] for r in rows], "o-",
                         label=f"{name} batch {batch}")  # fmt: skip
    titles = ("prefill tokens/s", "prefill peak memory (GiB)", "decode ms per step")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens" if ax is not axes[2] else "context")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DeepSeek-V3.2 bench preset, {results['meta'].get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import modeling_deepseek_v32
    from modeling_deepseek_v32 import kernels
    from modeling_deepseek_v32.kernels import kernels_enabled

    deadline = time.time() + args.time_budget
    results = {
        "meta": {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
                 "transformers": transformers.__version__, "package": modeling_deepseek_v32.__version__,
                 "kernels_enabled": kernels_enabled(), "args": vars(args),
                 "gpu_total_gib": _gib(torch.cuda.get_device_properties(0).total_memory) if DEVICE == "cuda" else None},
        "models": {},
    }  # fmt: skip
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)

    def save():
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        saved = False
        for name in names:
            record = results["models"].setdefault(name, {})
            model = None
            try:
                t0 = time.time()
                if name in ("ours", "ours_fp8", "ours_loop"):
                    model = build_ours(args, fp8=name == "ours_fp8")
                    if name == "ours" and "native" in names and not saved:
                        model.save_pretrained(tmp)
                        saved = True
                elif name == "native":
                    if not saved:
                        donor = build_ours(args, fp8=False)
                        donor.save_pretrained(tmp)
                        del donor
                        _free()
                        saved = True
                    model, attn_impl = load_native(tmp, args)
                    record["attn_implementation"] = attn_impl
                else:
                    raise ValueError(f"unknown model {name!r}")
                record["setup_seconds"] = round(time.time() - t0, 1)
                deadline = time.time() + args.time_budget
                if name == "ours_loop":  # the per-expert loop (the grouped kernel's twin), for a same-run comparison
                    kernels._broken.add("grouped_moe")
                try:
                    run_model(name, model, args, record, deadline)
                finally:
                    kernels._broken.discard("grouped_moe")
            except Exception as error:
                record["error"] = f"{type(error).__name__}: {error}"[:500]
                traceback.print_exc()
            del model
            _free()
            save()
    save()
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
