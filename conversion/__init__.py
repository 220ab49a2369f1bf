"""Checkpoint conversion tools land here (installed as ``modeling_deepseek_v32.conversion``).

Each tool is a module with a CLI (``python -m modeling_deepseek_v32.conversion.<name> --help``) and an importable
function; see ``docs/conversion.md``:

* ``dequantize_fp8`` / ``quantize_fp8``: block-FP8 <-> BF16 (or FP16/FP32), streamed one tensor at a time;
* ``demo_format``: official HF layout <-> DeepSeek's inference-demo layout (``model{rank}-mp{N}.safetensors``);
* ``derive``: a smaller model (first N layers, a subset of experts, MTP kept or dropped);
* ``verify``: a checkpoint directory checked against its config.

``remote_code`` generates the flat ``trust_remote_code`` files that ``hub_upload.py`` publishes.
"""

import importlib

# Exports resolve lazily: importing them here would pre-import the CLI modules, and `python -m` then warns that the
# module it is about to run is already in sys.modules.
_EXPORTS = {
    "CheckpointError": "shards",
    "VerifyReport": "verify",
    "dequantize_checkpoint": "dequantize_fp8",
    "derive_checkpoint": "derive",
    "from_demo": "demo_format",
    "quantize_checkpoint": "quantize_fp8",
    "to_demo": "demo_format",
    "verify_checkpoint": "verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
