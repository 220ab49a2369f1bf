"""BF16 (or FP16/FP32) checkpoint -> block-FP8 checkpoint in the official layout, one tensor at a time.

The linears the package runs in FP8 (attention, indexer ``wq_b``/``wk``, dense MLP, routed and shared experts, in the
main layers and the MTP block) become ``float8_e4m3fn`` with a float32 ``weight_scale_inv`` per 128x128 block
(ragged edge blocks included); embeddings, norms, the router, ``weights_proj``, ``eh_proj`` and the heads stay as
they are. Which tensors are FP8 is read off the package's model built on the meta device, never hard-coded here.

Scales are ue8m0 (powers of two, as DeepSeek-V3.1+ ships) or plain fp32 (``--scale-fmt float``). With
``--scales-from DIR`` the scales of an existing FP8 checkpoint are reused, which makes
FP8 -> BF16 -> FP8 reproduce the original bytes exactly.

Usage::

    python -m modeling_deepseek_v32.conversion.quantize_fp8 /data/my-bf16-finetune /data/my-finetune-fp8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from modeling_deepseek_v32.fp8 import FP8_E4M3_MAX, quantize_weight_blockwise

from .checkpoint import Checkpoint, load_config_dict
from .common import FP8_DTYPE, SCALE_SUFFIX, add_common_arguments, config_bytes, expected_tensors, run_cli, scale_name
from .common import validated_config
from .output import copyable_side_files, plan_hf_shards, write_checkpoint
from .shards import CheckpointError, TensorPlan
from .verify import check_output

__all__ = ["quantize_checkpoint", "quantize_with_scales", "main"]

BLOCK = (128, 128)


def quantize_with_scales(weight: torch.Tensor, scale_inv: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """e4m3 values of ``weight`` for given per-block scales (the same arithmetic as fresh quantization: divide by the
    block's scale, clamp to +-448, round to nearest)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def _quantized_config(raw: dict, scale_fmt: str) -> dict:
    raw = dict(raw)
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}
    if scale_fmt == "ue8m0":
        quant["scale_fmt"] = "ue8m0"
    raw["quantization_config"] = quant
    return raw


def quantize_checkpoint(
    source: str | Path,
    output: str | Path,
    scale_fmt: str = "ue8m0",
    scales_from: str | Path | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a block-FP8 copy of the dense checkpoint ``source`` to ``output``; returns ``output``."""
    if scale_fmt not in ("ue8m0", "float"):
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'float', got {scale_fmt!r}")
    ckpt = Checkpoint(source)
    raw = load_config_dict(source)
    config = validated_config(raw, str(Path(source) / "config.json"))
    if config.is_block_fp8 or any(ckpt.info(n).dtype == FP8_DTYPE for n in ckpt.names):
        raise CheckpointError(f"{source}: is already block-FP8 (dequantize it first to re-quantize)")
    new_raw = _quantized_config(raw, scale_fmt)
    reference = None
    if scales_from is not None:
        reference = Checkpoint(scales_from)
        # The reused scales carry their format with them (ue8m0 or not): describe them as the reference does.
        reference_quant = load_config_dict(scales_from).get("quantization_config")
        if reference_quant:
            new_raw["quantization_config"] = dict(reference_quant)
    expected = expected_tensors(validated_config(new_raw, "quantized config"))

    # A weight's scales are computed together with its values; the stash hands them to the scale's plan (which may
    # land in the next file) without quantizing twice.
    stash: dict[str, torch.Tensor] = {}

    def quantize(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = ckpt.get(name)
        if not weight.dtype.is_floating_point or weight.dim() != 2:
            raise CheckpointError(f"{source}: {name!r} should be a 2-D floating weight, got {weight.dtype} {list(weight.shape)}")
        if reference is None:
            return quantize_weight_blockwise(weight, BLOCK, scale_fmt)
        scale = reference.get(scale_name(name)).float()
        if tuple(scale.shape) != expected[scale_name(name)].shape:
            raise CheckpointError(f"{scales_from}: {scale_name(name)!r} has shape {list(scale.shape)}, expected {list(expected[scale_name(name)].shape)}")
        return quantize_with_scales(weight, scale), scale

    def produce_weight(name: str) -> torch.Tensor:
        values, scale = quantize(name)
        stash[name] = scale
        return values

    def produce_scale(name: str) -> torch.Tensor:
        return stash.pop(name) if name in stash else quantize(name)[1]

    plans = []
    for name in ckpt.names:
        info = ckpt.info(name)
        if name.endswith(SCALE_SUFFIX):
            raise CheckpointError(f"{source}: already holds FP8 scale {name!r}")
        want = expected.get(name)
        if want is not None and want.dtype == FP8_DTYPE:
            if reference is not None and scale_name(name) not in reference:
                raise CheckpointError(f"{scales_from}: has no {scale_name(name)!r} to reuse")
            plans.append(TensorPlan(name, FP8_DTYPE, info.shape, lambda n=name: produce_weight(n)))
            grid = expected[scale_name(name)].shape
            plans.append(TensorPlan(scale_name(name), torch.float32, grid, lambda n=name: produce_scale(n)))
        else:
            plans.append(TensorPlan(name, info.dtype, info.shape, lambda n=name: ckpt.get(n)))

    side = {**copyable_side_files(source), "config.json": config_bytes(new_raw)}
    job = {
        "command": "quantize_fp8",
        "scale_fmt": scale_fmt,
        "scales_from": reference.source_signature() if reference is not None else None,
        "max_shard_size": str(max_shard_size),
        "inputs": ckpt.source_signature(),
    }
    inputs = [source] + ([scales_from] if scales_from is not None else [])
    write_checkpoint(
        output, plan_hf_shards(plans, max_shard_size), job=job, inputs=inputs, side_files=side,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return check_output(output)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_deepseek_v32.conversion.quantize_fp8",
        description="Quantize a dense DeepSeek-V3.2 checkpoint to the official block-FP8 layout (e4m3 weights, fp32 "
        "weight_scale_inv per 128x128 block), streaming one tensor at a time; adds quantization_config to config.json.",
    )
    parser.add_argument("source", help="dense (bf16/fp16/fp32) checkpoint directory (never modified)")
    parser.add_argument("output", help="output directory (created; re-run the same command to resume)")
    parser.add_argument(
        "--scale-fmt", choices=("ue8m0", "float"), default="ue8m0",
        help="power-of-two scales as in DeepSeek-V3.1+ (ue8m0, default) or plain fp32 amax/448 scales (float)",
    )  # fmt: skip
    parser.add_argument(
        "--scales-from", metavar="FP8_DIR",
        help="reuse the weight_scale_inv tensors of this FP8 checkpoint (bit-exact FP8 -> BF16 -> FP8 round trips)",
    )  # fmt: skip
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    out = quantize_checkpoint(
        args.source, args.output, args.scale_fmt, args.scales_from, args.max_shard_size, args.overwrite,
        not args.no_progress,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors are printed as one line, not a traceback)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
