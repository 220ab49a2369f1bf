"""Optional Triton kernels (installed as ``modeling_deepseek_v32.kernels``).

The kernels that live here are an optional fast path on CUDA GPUs; every op also has a pure PyTorch
reference that is used whenever :func:`kernels_enabled` returns ``False``. Importing this module never
requires Triton: Triton is probed lazily, and only when a caller asks.

Set ``DEEPSEEK_V32_KERNELS=0`` to force the PyTorch reference paths.
"""

from __future__ import annotations

import functools
import os

__all__ = ["kernels_enabled"]

_ENV_VAR = "DEEPSEEK_V32_KERNELS"


@functools.lru_cache(maxsize=None)
def _triton_and_cuda_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken Triton install
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def kernels_enabled() -> bool:
    """Whether the Triton kernels should be used.

    ``False`` when the environment variable ``DEEPSEEK_V32_KERNELS`` is ``"0"``; otherwise ``True`` exactly when
    Triton can be imported and a CUDA device is available. The environment variable is read on every call; the
    Triton/CUDA probe is done once per process.
    """
    if os.environ.get(_ENV_VAR, "").strip() == "0":
        return False
    return _triton_and_cuda_available()
