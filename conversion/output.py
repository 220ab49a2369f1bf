"""Writing a converted checkpoint safely: planning shards, resuming, disk-space checks, atomic side files.

Every conversion first builds a complete *plan* (which tensor goes to which file, with dtype and shape, computed
from input headers only) and hands it to :func:`write_checkpoint`. Because the plan is known before any data moves:

* the disk-space check is exact;
* a resumed run recognizes finished files byte-for-byte by their header and size, and skips them;
* an in-progress marker (``.deepseek-v32-conversion.json``) records the job's settings and inputs, so a resume
  never mixes files of two different jobs, and its presence tells an unfinished directory from a finished one.

Files reach their final names only by atomic rename; the index, config and the removal of the marker come last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import INDEX_NAME, SINGLE_NAME
from .shards import CheckpointError, TensorPlan, file_matches_plan, header_bytes, write_safetensors

__all__ = [
    "MARKER_NAME",
    "OutputFile",
    "check_disk_space",
    "check_separate_directories",
    "copyable_side_files",
    "format_bytes",
    "parse_size",
    "plan_hf_shards",
    "write_checkpoint",
]

MARKER_NAME = ".deepseek-v32-conversion.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# Files next to the weights that conversions must not copy: weights in other formats (they would no longer match),
# and the model card, which describes the input rather than the converted output.
_NOT_COPIED = re.compile(r"(\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|tmp)$)|(^README\.md$)|(^config\.json$)|(\.index\.json$)")


@dataclass
class OutputFile:
    """One safetensors file of the output and the tensors it will hold, in order."""

    filename: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        return len(header_bytes(self.tensors)) + sum(p.nbytes for p in self.tensors)


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"4GiB"``, ``"300KB"`` or a byte count -> bytes (decimal units as in transformers)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a byte count")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def plan_hf_shards(tensors: list[TensorPlan], max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> list[OutputFile]:
    """Cut tensors, in order, into files of at most ``max_shard_size`` (a tensor larger than that gets its own file),
    named like transformers does: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``."""
    limit = parse_size(max_shard_size)
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in tensors:
        if groups[-1] and size + plan.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(plan)
        size += plan.nbytes
    if len(groups) == 1:
        return [OutputFile(SINGLE_NAME, groups[0])]
    n = len(groups)
    return [OutputFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", group) for i, group in enumerate(groups)]


def check_separate_directories(inputs: list[str | os.PathLike], output: str | os.PathLike) -> None:
    """Refuse an output directory that is, contains, or lies inside an input directory: inputs are never modified."""
    out = Path(output).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise CheckpointError(
                f"output directory {out} overlaps input directory {src}; conversions never write into their input, "
                "choose a separate output directory"
            )


def check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise CheckpointError(
            f"not enough disk space in {directory}: the output needs {format_bytes(needed)} more, "
            f"only {format_bytes(free)} free"
        )


def copyable_side_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Top-level files to carry over unchanged (tokenizer, generation config, licence, chat template...)."""
    directory = Path(directory)
    return {
        p.name: p
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".") and not _NOT_COPIED.search(p.name)
    }


def _atomic_write(path: Path, data: bytes | Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(data, Path):
            shutil.copyfile(data, tmp)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prepare_directory(out: Path, job: dict, planned: set[str], overwrite: bool, log: Callable[[str], None]) -> bool:
    """Create or vet the output directory; returns whether finished files of an earlier run may be reused."""
    marker = out / MARKER_NAME
    if not out.exists():
        out.mkdir(parents=True)
        return False
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if marker.exists():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8")).get("job")
        except (OSError, ValueError):
            previous = None
        if previous == job and not overwrite:
            log(f"resuming the unfinished conversion in {out}")
            return True
        if not overwrite:
            raise CheckpointError(
                f"{out}: holds an unfinished conversion with different settings or inputs; pass --overwrite to "
                "start over or choose another output directory"
            )
    elif any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: output directory is not empty; pass --overwrite to replace its checkpoint files")
    # Starting over: drop our own file kinds, so no stale shard or index survives next to the new ones.
    for path in out.iterdir():
        if path.is_file() and (path.name in planned or path.name.endswith((".safetensors", ".tmp")) or path.name == INDEX_NAME):
            path.unlink()
    return False


def write_checkpoint(
    output_dir: str | os.PathLike,
    files: list[OutputFile],
    *,
    job: dict,
    inputs: list[str | os.PathLike],
    side_files: dict[str, bytes | Path] | None = None,
    write_index: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = _log,
) -> Path:
    """Write a planned checkpoint to ``output_dir``; returns its path.

    Args:
        files: the planned safetensors files (see :func:`plan_hf_shards`).
        job: JSON-serializable description of the conversion (command, settings, input signature); a resumed run
            must describe the same job.
        inputs: input directories, which must not overlap the output.
        side_files: other files to write (generated bytes) or copy (a source path), e.g. ``config.json``.
        write_index: write ``model.safetensors.index.json``; default: when there is more than one file.
        overwrite: replace an existing checkpoint or unfinished conversion in ``output_dir``.
    """
    out = Path(output_dir)
    check_separate_directories(inputs, out)
    job = json.loads(json.dumps(job))  # the form it takes in the marker, so a resume compares equal
    side_files = dict(side_files or {})
    planned = {f.filename for f in files} | set(side_files) | {INDEX_NAME}
    names = [f.filename for f in files]
    if len(set(names)) != len(names):
        raise CheckpointError(f"planned output file names are not unique: {names}")
    may_resume = _prepare_directory(out, job, planned, overwrite, log)
    (out / MARKER_NAME).write_text(json.dumps({"job": job}, indent=1), encoding="utf-8")
    for f in files:
        (out / (f.filename + ".tmp")).unlink(missing_ok=True)

    done = {f.filename for f in files if may_resume and file_matches_plan(out / f.filename, f.tensors)}
    todo = [f for f in files if f.filename not in done]
    for name in sorted(done):
        log(f"  {name}: already complete, skipped")
    side_bytes = sum(len(v) if isinstance(v, bytes) else v.stat().st_size for v in side_files.values())
    check_disk_space(out, sum(f.nbytes for f in todo) + side_bytes)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(f.nbytes for f in todo), unit="B", unit_scale=True, desc=f"writing {out.name}", file=sys.stderr)
    try:
        for f in todo:
            if bar is not None:
                bar.set_postfix_str(f.filename, refresh=False)
            write_safetensors(out / f.filename, f.tensors, bar)
    finally:
        if bar is not None:
            bar.close()

    for name, data in side_files.items():
        _atomic_write(out / name, data)
    if write_index is None:
        write_index = len(files) > 1
    if write_index:
        weight_map = {p.name: f.filename for f in files for p in f.tensors}
        index = {
            "metadata": {"total_size": sum(p.nbytes for f in files for p in f.tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _atomic_write(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    (out / MARKER_NAME).unlink()
    return out
