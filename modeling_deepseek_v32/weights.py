"""Checks on what ``from_pretrained`` loaded, so a broken checkpoint is an error and never a silent wrong answer."""

from __future__ import annotations

from transformers import PreTrainedModel

_SHOWN = 8


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = "\n    ".join(keys[:_SHOWN])
    more = f"\n    ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"\n    {shown}{more}"


def check_loading_info(
    model: PreTrainedModel, info: dict, allow_missing: bool = False, allow_mismatched: bool = False
) -> None:
    """Raise ``ValueError`` naming the tensors when the checkpoint does not fit the config.

    * FP8 scales (``weight_scale_inv``) in a checkpoint whose config has no ``quantization_config``: the FP8 values
      would be used without their scales.
    * Missing tensors (an FP8 weight without its scale among them), unless ``allow_missing``.
    * Tensors whose shape does not match the config, unless ``allow_mismatched`` (``ignore_mismatched_sizes``).
    """
    unexpected = set(info.get("unexpected_keys") or ())
    orphan_scales = {key for key in unexpected if key.endswith("weight_scale_inv")}
    if orphan_scales and not model.config.is_block_fp8:
        raise ValueError(
            "the checkpoint holds block-FP8 scales but its config has no `quantization_config` "
            "(quant_method 'fp8'); the FP8 weights cannot be used without them:" + _listing(orphan_scales)
        )
    mismatched = info.get("mismatched_keys") or ()
    if mismatched and not allow_mismatched:
        described = [f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(ours)}" for key, ckpt, ours in mismatched]
        raise ValueError("checkpoint tensors do not match the config's shapes:" + _listing(described))
    missing = set(info.get("missing_keys") or ())
    if missing and not allow_missing:
        scales = {key for key in missing if key.endswith("weight_scale_inv")}
        hint = " (FP8 weights need their `weight_scale_inv`)" if scales else ""
        raise ValueError(
            f"the checkpoint lacks {len(missing)} tensor(s) the config requires{hint}; pass "
            "`allow_missing_weights=True` to initialize them randomly instead:" + _listing(missing)
        )
