"""Block-FP8 checkpoint -> BF16 (or FP16/FP32) checkpoint, one tensor at a time.

Each ``float8_e4m3fn`` weight is multiplied by the ``weight_scale_inv`` of its 128x128 block (edge blocks may be
partial, e.g. ``kv_a_proj_with_mqa``'s 576 rows) and written in the target dtype; the scales are dropped, every other
tensor is copied unchanged, and ``quantization_config`` is removed from ``config.json``. Tokenizer and generation
files are carried over.

Usage::

    python -m modeling_deepseek_v32.conversion.dequantize_fp8 /data/DeepSeek-V3.2 /data/DeepSeek-V3.2-bf16

Peak memory is about one tensor (the largest is the 1.8 GB embedding); the output needs ~1.95x the input's disk
space. An interrupted run resumes when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from modeling_deepseek_v32.fp8 import dequantize_weight_blockwise

from .checkpoint import Checkpoint, load_config_dict
from .common import FP8_DTYPE, SCALE_SUFFIX, add_common_arguments, config_bytes, run_cli, scale_name, validated_config
from .output import copyable_side_files, plan_hf_shards, write_checkpoint
from .shards import CheckpointError, TensorPlan
from .verify import check_output

__all__ = ["dequantize_checkpoint", "main"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dequantized_config(raw: dict, dtype: torch.dtype) -> dict:
    raw = dict(raw)
    raw.pop("quantization_config", None)
    dtype_name = str(dtype).replace("torch.", "")
    keys = [k for k in ("dtype", "torch_dtype") if k in raw] or ["dtype"]
    for key in keys:
        raw[key] = dtype_name
    return raw


def dequantize_checkpoint(
    source: str | Path,
    output: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a dequantized copy of the block-FP8 checkpoint ``source`` to ``output``; returns ``output``."""
    ckpt = Checkpoint(source)
    raw = load_config_dict(source)
    config = validated_config(raw, str(Path(source) / "config.json"))
    fp8_names = [n for n in ckpt.names if ckpt.info(n).dtype == FP8_DTYPE]
    if not fp8_names:
        raise CheckpointError(f"{source}: holds no float8_e4m3fn tensors; nothing to dequantize")
    block = config.fp8_block_size if config.is_block_fp8 else (128, 128)
    for name in ckpt.names:
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] not in ckpt:
            raise CheckpointError(f"{source}: scale {name!r} has no weight {name[: -len(SCALE_SUFFIX)]!r}")

    plans = []
    for name in ckpt.names:
        if name.endswith(SCALE_SUFFIX):
            continue
        info = ckpt.info(name)
        if info.dtype == FP8_DTYPE:
            if scale_name(name) not in ckpt:
                raise CheckpointError(f"{source}: FP8 weight {name!r} has no {scale_name(name)!r}; cannot dequantize it")

            def produce(name=name):
                weight, scale = ckpt.get(name), ckpt.get(scale_name(name))
                return dequantize_weight_blockwise(weight, scale, block, dtype, name=name)

            plans.append(TensorPlan(name, dtype, info.shape, produce))
        else:
            plans.append(TensorPlan(name, info.dtype, info.shape, lambda name=name: ckpt.get(name)))

    side = {**copyable_side_files(source), "config.json": config_bytes(_dequantized_config(raw, dtype))}
    job = {
        "command": "dequantize_fp8",
        "dtype": str(dtype),
        "max_shard_size": str(max_shard_size),
        "inputs": ckpt.source_signature(),
    }
    write_checkpoint(
        output, plan_hf_shards(plans, max_shard_size), job=job, inputs=[source], side_files=side,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return check_output(output)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_deepseek_v32.conversion.dequantize_fp8",
        description="Dequantize a block-FP8 DeepSeek-V3.2 checkpoint (official release format) to bf16/fp16/fp32, "
        "streaming one tensor at a time. Output: resharded safetensors + index, config without quantization_config.",
    )
    parser.add_argument("source", help="block-FP8 checkpoint directory (never modified)")
    parser.add_argument("output", help="output directory (created; re-run the same command to resume)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of dequantized weights")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    out = dequantize_checkpoint(
        args.source, args.output, DTYPES[args.dtype], args.max_shard_size, args.overwrite, not args.no_progress
    )
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors are printed as one line, not a traceback)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
