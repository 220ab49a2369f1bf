"""Helpers shared by the Triton kernels (imported only when a kernel is used)."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns a runtime scalar into ``int`` with ``int(array)``, which NumPy >= 2.4 refuses
    for its one-element (1-d) scalars, so ``range(start, stop)`` over runtime bounds fails. Only under
    ``TRITON_INTERPRET=1``: make ``__index__`` take the single element."""
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - a Triton without the interpreter
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_deepseek_v32_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._deepseek_v32_patched = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_for_numpy2()


def compute_dtype_for(dtype: torch.dtype):
    """Operand dtype for ``tl.dot`` and its input precision.

    bf16/fp16 (and fp8 upcast to bf16, which is exact) feed the tensor cores with fp32 accumulation; fp32 uses full
    IEEE precision (no TF32) so fp32 models keep fp32 accuracy. Triton's interpreter cannot multiply bf16, so there
    everything is computed in fp32 (the same values: bf16 -> fp32 is exact).
    """
    if interpreting() or dtype == torch.float32:
        return tl.float32, "ieee"
    if dtype == torch.float16:
        return tl.float16, "ieee"
    return tl.bfloat16, "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so split paths get exercised by tiny tests
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Row reductions through tl.reduce with triton.language's own combine functions. tl.max / tl.sum / tl.zeros /
# tl.cdiv are themselves @triton.jit functions, decorated when Triton is first imported: if that happened before
# TRITON_INTERPRET=1 was set (transformers imports Triton), the interpreter cannot call them. Passing the standard
# combine functions to tl.reduce compiles exactly like tl.max / tl.sum on the GPU, and the interpreter recognizes
# them and reduces with NumPy (a combine function of our own would be called element by element).
import triton  # noqa: E402


@triton.jit
def row_max(x):
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def row_sum(x):
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def vector_sum(x):
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def vector_cumsum(x):
    return tl.associative_scan(x, 0, tl.standard._sum_combine)
