"""Convert between the official Hugging Face layout and DeepSeek's inference-demo layout, for any number of ranks.

``to-demo`` writes ``model{rank}-mp{N}.safetensors`` exactly as DeepSeek's demo ``convert.py`` lays them out (renamed
keys, experts partitioned over ranks, column/row-parallel splits; see :mod:`.demo_names`), FP8 weights and scales
kept as they are. It also copies ``config.json`` and the tokenizer files (the demo runtime reads its own config;
the copy lets ``from-demo`` restore the HF layout without being told the config again).

``from-demo`` merges the ranks back into the official layout (resharded, with an index). The demo format has no MTP
layer: pass ``--mtp-from`` an official checkpoint to take it from there, otherwise the output config says
``num_nextn_predict_layers: 0``.

Usage::

    python -m modeling_deepseek_v32.conversion.demo_format to-demo /data/DeepSeek-V3.2 /data/v32-mp8 --mp 8
    python -m modeling_deepseek_v32.conversion.demo_format from-demo /data/v32-mp8 /data/v32-hf \\
        --mtp-from /data/DeepSeek-V3.2

Each rank file is read and written one tensor (or tensor slice) at a time.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_config_dict
from .common import FP8_DTYPE, SCALE_SUFFIX, add_common_arguments, config_bytes, expected_tensors, run_cli
from .common import validated_config
from .demo_names import demo_to_hf_name, hf_to_demo_name, layer_index, split_rule
from .output import OutputFile, copyable_side_files, plan_hf_shards, write_checkpoint
from .shards import CheckpointError, TensorPlan
from .verify import check_output

__all__ = ["demo_rank_files", "from_demo", "to_demo", "main"]

_RANK_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_fp8_split(ckpt: Checkpoint, name: str, dim: int, mp: int, block: tuple[int, int]) -> None:
    """An FP8 weight can only be split where its 128x128 scale blocks split too."""
    weight = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else name
    if mp == 1 or weight not in ckpt or ckpt.info(weight).dtype != FP8_DTYPE:
        return
    size = ckpt.info(weight).shape[dim]
    if (size // mp) % block[dim]:
        raise CheckpointError(
            f"cannot split block-FP8 weight {weight!r} ({size} along dim {dim}) over {mp} ranks: each rank's part "
            f"({size // mp}) must be a multiple of the {block[dim]}-wide scale blocks"
        )


def to_demo(
    source: str | Path, output: str | Path, mp: int, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write the HF checkpoint ``source`` as ``mp`` demo-format rank files in ``output``; returns ``output``."""
    ckpt = Checkpoint(source)
    raw = load_config_dict(source)
    config = validated_config(raw, str(Path(source) / "config.json"))
    n_experts = config.n_routed_experts
    if mp < 1 or n_experts % mp:
        raise CheckpointError(f"--mp must be >= 1 and divide n_routed_experts ({n_experts}), got {mp}")
    per_rank = n_experts // mp
    block = config.fp8_block_size if config.is_block_fp8 else (128, 128)
    ranks: list[list[TensorPlan]] = [[] for _ in range(mp)]
    dropped = 0
    for name in ckpt.names:
        layer = layer_index(name)
        if layer is not None and layer >= config.num_hidden_layers:
            dropped += 1  # MTP: the demo runtime has no place for it, as in DeepSeek's own convert.py
            continue
        demo_name = hf_to_demo_name(name)
        info = ckpt.info(name)
        rule, arg = split_rule(name)
        if rule == "expert":
            ranks[arg // per_rank].append(TensorPlan(demo_name, info.dtype, info.shape, lambda n=name: ckpt.get(n)))
        elif rule == "replicate":
            for rank in ranks:
                rank.append(TensorPlan(demo_name, info.dtype, info.shape, lambda n=name: ckpt.get(n)))
        else:
            dim, size = arg, info.shape[arg]
            _check_fp8_split(ckpt, name, dim, mp, block)
            if size % mp:
                raise CheckpointError(f"cannot split {name!r} ({size} along dim {dim}) evenly over {mp} ranks")
            part = size // mp
            shape = info.shape[:dim] + (part,) + info.shape[dim + 1 :]
            for r, rank in enumerate(ranks):
                produce = lambda n=name, d=dim, a=r * part, b=(r + 1) * part: ckpt.get(n, d, a, b)  # noqa: E731
                rank.append(TensorPlan(demo_name, info.dtype, shape, produce))
    if dropped:
        _log(f"dropped {dropped} MTP tensors (layers >= {config.num_hidden_layers}): the demo format has no MTP layer")
    files = [OutputFile(f"model{r}-mp{mp}.safetensors", plans) for r, plans in enumerate(ranks)]
    side = {**copyable_side_files(source), "config.json": config_bytes(raw)}
    job = {"command": "to_demo", "mp": mp, "inputs": ckpt.source_signature()}
    return write_checkpoint(
        output, files, job=job, inputs=[source], side_files=side, write_index=False, overwrite=overwrite,
        progress=progress,
    )  # fmt: skip


def demo_rank_files(directory: str | Path) -> list[str]:
    """The ``model{rank}-mp{N}.safetensors`` files of a demo checkpoint, in rank order; all ranks must be there."""
    directory = Path(directory)
    found: dict[int, dict[int, str]] = {}
    for path in directory.iterdir():
        match = _RANK_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path.name
    if not found:
        raise CheckpointError(f"{directory}: no demo-format files (model{{rank}}-mp{{N}}.safetensors)")
    if len(found) > 1:
        raise CheckpointError(f"{directory}: files for several rank counts ({sorted(found)}); keep one set")
    ((mp, ranks),) = found.items()
    missing = sorted(set(range(mp)) - set(ranks))
    extra = sorted(set(ranks) - set(range(mp)))
    if missing or extra:
        raise CheckpointError(f"{directory}: demo checkpoint for mp={mp} lacks ranks {missing} / has stray ranks {extra}")
    return [ranks[r] for r in range(mp)]


def _merge_plan(name: str, holders: list[tuple[int, Checkpoint, str]], mp: int, per_rank: int) -> TensorPlan:
    """The plan of HF tensor ``name`` from the ranks that hold it (``(rank, file, demo name)``)."""
    rule, arg = split_rule(name)
    infos = [(rank, ckpt, demo, ckpt.info(demo)) for rank, ckpt, demo in holders]
    if rule == "expert":
        owner = arg // per_rank
        if [rank for rank, *_ in infos] != [owner]:
            raise CheckpointError(f"expert tensor {holders[0][2]!r} should be in rank {owner}'s file only, found in ranks {[r for r, *_ in infos]}")
        _, ckpt, demo, info = infos[0]
        return TensorPlan(name, info.dtype, info.shape, lambda: ckpt.get(demo))
    if len(infos) != mp:
        raise CheckpointError(f"tensor {holders[0][2]!r} is in ranks {[r for r, *_ in infos]} but must be in all {mp}")
    dtypes = {info.dtype for *_, info in infos}
    if len(dtypes) != 1:
        raise CheckpointError(f"tensor {holders[0][2]!r} has different dtypes across ranks: {sorted(map(str, dtypes))}")
    first = infos[0][3]
    if rule == "replicate":
        if any(info.shape != first.shape for *_, info in infos):
            raise CheckpointError(f"replicated tensor {holders[0][2]!r} has different shapes across ranks")
        _, ckpt, demo, _ = infos[0]
        return TensorPlan(name, first.dtype, first.shape, lambda: ckpt.get(demo))
    dim = arg
    others = {info.shape[:dim] + info.shape[dim + 1 :] for *_, info in infos}
    if len(others) != 1:
        raise CheckpointError(f"split tensor {holders[0][2]!r} has inconsistent shapes across ranks")
    shape = first.shape[:dim] + (sum(info.shape[dim] for *_, info in infos),) + first.shape[dim + 1 :]
    parts = [(ckpt, demo) for _, ckpt, demo, _ in infos]
    return TensorPlan(name, first.dtype, shape, lambda: torch.cat([c.get(d) for c, d in parts], dim=dim))


def from_demo(
    source: str | Path,
    output: str | Path,
    config_path: str | Path | None = None,
    mtp_from: str | Path | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge the demo-format checkpoint ``source`` into the official HF layout in ``output``; returns ``output``."""
    files = demo_rank_files(source)
    mp = len(files)
    ranks = [Checkpoint(source, files=[f]) for f in files]
    raw = load_config_dict(config_path or source)
    config = validated_config(raw, str(config_path or Path(source) / "config.json"))
    if config.n_routed_experts % mp:
        raise CheckpointError(f"n_routed_experts ({config.n_routed_experts}) is not divisible by the {mp} ranks found")
    mtp = Checkpoint(mtp_from) if mtp_from is not None else None
    if config.num_nextn_predict_layers and mtp is None:
        _log("the demo format has no MTP layer: writing num_nextn_predict_layers = 0 (pass --mtp-from to keep it)")
        raw = {**raw, "num_nextn_predict_layers": 0}
        config = validated_config(raw, "config.json")
    expected = expected_tensors(config)

    holders: dict[str, list[tuple[int, Checkpoint, str]]] = {}
    for rank, ckpt in enumerate(ranks):
        for demo in ckpt.names:
            holders.setdefault(demo_to_hf_name(demo), []).append((rank, ckpt, demo))
    unexpected = sorted(set(holders) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: tensors the config does not describe: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    plans = []
    per_rank = config.n_routed_experts // mp
    for name, want in expected.items():
        layer = layer_index(name)
        if layer is not None and layer >= config.num_hidden_layers:
            if name not in mtp:
                raise CheckpointError(f"{mtp_from}: has no MTP tensor {name!r}")
            info = mtp.info(name)
            plans.append(TensorPlan(name, info.dtype, info.shape, lambda n=name: mtp.get(n)))
        elif name in holders:
            plans.append(_merge_plan(name, holders[name], mp, per_rank))
        elif not want.optional:
            hint = " (is the config's quantization_config right for these files?)" if name.endswith(SCALE_SUFFIX) else ""
            raise CheckpointError(f"{source}: no rank holds {hf_to_demo_name(name)!r} (HF name {name!r}){hint}")
    side = {**copyable_side_files(source), "config.json": config_bytes(raw)}
    job = {
        "command": "from_demo",
        "max_shard_size": str(max_shard_size),
        "config": raw,
        "inputs": [r.source_signature() for r in ranks] + ([mtp.source_signature()] if mtp else []),
    }
    inputs = [source] + ([mtp_from] if mtp_from is not None else [])
    write_checkpoint(
        output, plan_hf_shards(plans, max_shard_size), job=job, inputs=inputs, side_files=side,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return check_output(output)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_deepseek_v32.conversion.demo_format",
        description="Convert between the official Hugging Face layout of DeepSeek-V3.2 and the layout of DeepSeek's "
        "inference demo (model{rank}-mp{N}.safetensors, renamed keys, experts and parallel weights split over ranks).",
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-demo", help="HF checkpoint -> demo rank files", description="HF checkpoint -> demo rank files (the MTP layer is dropped, as the demo has none).")
    to.add_argument("source", help="HF checkpoint directory (never modified)")
    to.add_argument("output", help="output directory for model{rank}-mp{N}.safetensors")
    to.add_argument("--mp", type=int, required=True, help="number of tensor-parallel ranks (must divide n_routed_experts)")
    add_common_arguments(to, shards=False)
    back = sub.add_parser("from-demo", help="demo rank files -> HF checkpoint", description="Demo rank files -> HF checkpoint (resharded, with index).")
    back.add_argument("source", help="directory with model{rank}-mp{N}.safetensors (never modified)")
    back.add_argument("output", help="output HF checkpoint directory")
    back.add_argument("--config", help="HF config.json of the model (default: config.json in the source directory)")
    back.add_argument("--mtp-from", metavar="HF_DIR", help="official checkpoint to take the MTP layer from")
    add_common_arguments(back)
    args = parser.parse_args(argv)
    if args.direction == "to-demo":
        out = to_demo(args.source, args.output, args.mp, args.overwrite, not args.no_progress)
    else:
        out = from_demo(
            args.source, args.output, args.config, args.mtp_from, args.max_shard_size, args.overwrite,
            not args.no_progress,
        )  # fmt: skip
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors are printed as one line, not a traceback)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
