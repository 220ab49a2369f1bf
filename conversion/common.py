"""Pieces every conversion shares: the config, the tensors a config implies, and CLI plumbing.

The expected tensor list is never written down by hand: it comes from instantiating the package's own model on
the meta device (no memory, ~12 s for the 671B config), so conversions, ``verify`` and the modeling code cannot
disagree about names, shapes or which linears are FP8.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .shards import CheckpointError

__all__ = [
    "ExpectedTensor",
    "add_common_arguments",
    "config_bytes",
    "expected_tensors",
    "run_cli",
    "scale_name",
    "validated_config",
]

FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class ExpectedTensor:
    """What a config implies for one tensor. ``dtype`` is exact for FP8 weights (e4m3) and their scales (fp32);
    ``None`` means any floating dtype except FP8 (checkpoints may store bf16, fp16 or fp32)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    optional: bool = False


def scale_name(weight_name: str) -> str:
    """``...weight`` -> ``...weight_scale_inv`` (the official name of a block-FP8 weight's scales)."""
    return weight_name + SCALE_SUFFIX


def validated_config(raw: dict, source: str = "config.json"):
    """A ``DeepseekV32Config`` from a raw dict, with its validation errors attributed to ``source``."""
    from modeling_deepseek_v32 import DeepseekV32Config

    try:
        return DeepseekV32Config(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: not a usable DeepSeek-V3.2 config: {exc}") from exc


def config_bytes(raw: dict) -> bytes:
    return (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode("utf-8")


def expected_tensors(config) -> dict[str, ExpectedTensor]:
    """Every tensor a checkpoint for ``config`` must hold, in the model's own order, from a meta-device model."""
    from transformers.utils import logging as hf_logging

    from modeling_deepseek_v32 import DeepseekV32ForCausalLM

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = DeepseekV32ForCausalLM(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
    state = model.state_dict()
    expected = {}
    for name, tensor in state.items():
        if tensor.dtype == FP8_DTYPE or name.endswith(SCALE_SUFFIX):
            dtype = tensor.dtype
        else:
            dtype = None
        expected[name] = ExpectedTensor(tuple(tensor.shape), dtype, optional=name in tied)
    return expected


def _size_argument(text: str) -> str:
    from .output import parse_size

    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_common_arguments(parser: argparse.ArgumentParser, shards: bool = True) -> None:
    if shards:
        parser.add_argument(
            "--max-shard-size", default="5GB", type=_size_argument,
            help="largest output shard, e.g. 5GB or 500MB (default: %(default)s)",
        )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing checkpoint or an unfinished conversion with other settings in the output directory",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI body, turning expected failures into a one-line error and an exit status instead of a traceback."""
    try:
        return main(argv)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permission denied, ...: finished files are kept, the run can resume
        print(f"error: {exc}\nfinished files are kept; fix the cause and run the same command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; run the same command again to resume", file=sys.stderr)
        return 130
