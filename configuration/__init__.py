"""Configuration class and JSON presets (installed as ``modeling_deepseek_v32.configuration``)."""

from __future__ import annotations

import json
from importlib import resources

from .configuration_deepseek_v32 import DeepseekV32Config

__all__ = ["DeepseekV32Config", "PRESETS", "load_preset_dict"]

PRESETS = ("official", "bench", "tiny")


def load_preset_dict(name: str) -> dict:
    """Return the raw config dict of a shipped preset (``official``, ``bench`` or ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    text = resources.files(__name__).joinpath("presets", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
