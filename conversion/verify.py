"""Check a checkpoint directory against its config before anyone loads, converts or uploads it.

Checks: every tensor the config implies is present exactly once, with the right shape; FP8 weights are e4m3 with
fp32 ``weight_scale_inv`` of the block-grid shape; other tensors are floating point and not FP8; there are no
unexpected tensors; the shards are readable (not truncated) and the index lists exactly what the shards hold.
Optionally (``--check-data``) every value is read and checked to be finite.

Usage::

    python -m modeling_deepseek_v32.conversion.verify /path/to/DeepSeek-V3.2

Exit status 0 when the checkpoint is sound, 1 when problems were found.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_config_dict
from .common import FP8_DTYPE, SCALE_SUFFIX, expected_tensors, run_cli, validated_config
from .output import format_bytes
from .shards import CheckpointError

__all__ = ["VerifyReport", "check_output", "verify_checkpoint", "main"]

_LISTED = 12


@dataclass
class VerifyReport:
    directory: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"checkpoint: {self.directory}"]
        for key, value in self.summary.items():
            lines.append(f"  {key}: {value}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        for problem in self.problems:
            lines.append(f"problem: {problem}")
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _listing(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    more = f", ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"{len(names)} {what}: {shown}{more}"


def _check_tensors(ckpt: Checkpoint, config, report: VerifyReport) -> None:
    expected = expected_tensors(config)
    present = set(ckpt.names)
    missing = [n for n, e in expected.items() if n not in present and not e.optional]
    unexpected = [n for n in ckpt.names if n not in expected]
    if missing:
        hint = ""
        if config.is_block_fp8 and all(n.endswith(SCALE_SUFFIX) for n in missing):
            hint = " (the config is block-FP8 but these weights have no scales: a dequantized checkpoint with a stale quantization_config?)"
        report.problems.append(_listing("expected tensor(s) missing", missing) + hint)
    if unexpected:
        hint = ""
        if not config.is_block_fp8 and any(n.endswith(SCALE_SUFFIX) for n in unexpected):
            hint = " (FP8 scales, but the config has no quantization_config)"
        report.problems.append(_listing("unexpected tensor(s)", unexpected) + hint)
    wrong_shape, wrong_dtype = [], []
    for name in ckpt.names:
        want = expected.get(name)
        if want is None:
            continue
        info = ckpt.info(name)
        if info.shape != want.shape:
            kind = "FP8 scale" if name.endswith(SCALE_SUFFIX) else "tensor"
            wrong_shape.append(f"{kind} {name} has shape {list(info.shape)}, config implies {list(want.shape)}")
        if want.dtype is not None and info.dtype != want.dtype:
            wrong_dtype.append(f"{name} is {info.dtype}, expected {want.dtype}")
        elif want.dtype is None and (not info.dtype.is_floating_point or info.dtype == FP8_DTYPE):
            why = " (FP8 where the model keeps a dense weight)" if info.dtype == FP8_DTYPE else ""
            wrong_dtype.append(f"{name} is {info.dtype}, expected a floating dtype{why}")
    report.problems.extend(wrong_shape[:_LISTED])
    if len(wrong_shape) > _LISTED:
        report.problems.append(f"... and {len(wrong_shape) - _LISTED} more tensors with wrong shapes")
    report.problems.extend(wrong_dtype[:_LISTED])
    if len(wrong_dtype) > _LISTED:
        report.problems.append(f"... and {len(wrong_dtype) - _LISTED} more tensors with wrong dtypes")
    report.summary["expected tensors"] = len(expected)


def _check_data(ckpt: Checkpoint, report: VerifyReport, progress: bool) -> None:
    from tqdm.auto import tqdm

    bad = []
    bar = tqdm(total=ckpt.nbytes, unit="B", unit_scale=True, desc="reading values", disable=not progress, file=sys.stderr)
    for name in ckpt.names:
        info = ckpt.info(name)
        if info.dtype.is_floating_point:
            tensor = ckpt.get(name)
            if not bool(torch.isfinite(tensor.float()).all()):
                bad.append(f"{name} ({ckpt.locations[name]})")
            del tensor
        bar.update(info.nbytes)
    bar.close()
    if bad:
        report.problems.append(_listing("tensor(s) with NaN or infinite values", bad))


def verify_checkpoint(
    directory: str | Path, config_path: str | Path | None = None, check_data: bool = False, progress: bool = False
) -> VerifyReport:
    """Check ``directory`` (against ``config_path`` or its own ``config.json``); never raises for a bad checkpoint,
    every finding is in the returned report."""
    report = VerifyReport(str(directory))
    try:
        ckpt = Checkpoint(directory, strict=False)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    report.problems.extend(ckpt.problems)
    report.warnings.extend(ckpt.warnings)
    dtypes = Counter()
    for name in ckpt.names:
        dtypes[str(ckpt.info(name).dtype).replace("torch.", "")] += 1
    n_params = sum(
        info.nbytes // max(1, torch.empty((), dtype=info.dtype).element_size())
        for name in ckpt.names
        if not name.endswith(SCALE_SUFFIX)
        for info in [ckpt.info(name)]
    )
    report.summary.update({
        "files": len(ckpt.files),
        "index": "yes" if ckpt.index is not None else "no (single file)",
        "tensors": len(ckpt.names),
        "size": format_bytes(ckpt.nbytes),
        "parameters": f"{n_params / 1e9:.3f} B" if n_params >= 1e8 else f"{n_params:,}",
        "dtypes": ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())),
    })  # fmt: skip
    try:
        raw = load_config_dict(config_path or directory)
        config = validated_config(raw, str(Path(config_path or directory)))
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    report.summary["config"] = (
        f"{config.num_hidden_layers} layers + {config.num_nextn_predict_layers} MTP, {config.n_routed_experts} routed "
        f"experts, {'block-FP8' if config.is_block_fp8 else 'dense'} weights"
    )
    _check_tensors(ckpt, config, report)
    if check_data and not report.problems:
        _check_data(ckpt, report, progress)
    return report


def check_output(directory: str | Path) -> Path:
    """Verify a freshly written conversion output and raise if it is not sound: a conversion must never report
    success for a checkpoint that would fail to load."""
    report = verify_checkpoint(directory)
    if not report.ok:
        raise CheckpointError(f"{directory}: the converted checkpoint failed verification:\n  " + "\n  ".join(report.problems))
    return Path(directory)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_deepseek_v32.conversion.verify",
        description="Check a DeepSeek-V3.2 checkpoint directory against its config (tensor names, shapes, dtypes, FP8 "
        "scales, index consistency, readable shards). Exit status 1 when problems are found.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (safetensors shards + config.json)")
    parser.add_argument("--config", help="config.json to check against (default: the one in the checkpoint)")
    parser.add_argument("--check-data", action="store_true", help="also read every tensor and check values are finite (slow)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    args = parser.parse_args(argv)
    report = verify_checkpoint(args.checkpoint, args.config, args.check_data, progress=not args.no_progress)
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems, "warnings": report.warnings, "summary": report.summary}, indent=2))
    else:
        print(report.format())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors are printed as one line, not a traceback)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
