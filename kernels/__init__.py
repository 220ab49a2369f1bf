"""Optional Triton kernels (installed as ``modeling_deepseek_v32.kernels``).

The kernels that live here are an optional fast path on CUDA GPUs; every op also has a pure PyTorch
reference that is used whenever :func:`kernels_enabled` returns ``False``. Importing this module never
requires Triton: Triton is probed lazily, and only when a caller asks.

Set ``DEEPSEEK_V32_KERNELS=0`` to force the PyTorch reference paths.

Dispatch hooks (called by the model; each returns ``None`` when the PyTorch twin must run instead):

* :func:`sparse_mla` - absorbed sparse MLA attention over the indexer's selection (``kernels/mla_kernel.py``),
  twin ``DeepseekV32Attention._absorbed``; :func:`sparse_mla_supported` lets the expanded (prefill) path route
  to it too, since both forms compute the same function.
* :func:`masked_mla` - prefill attention in expanded form over a bitmap of the selection, flash-attention tiles over
  every causal key (``kernels/masked_mla_kernel.py``), twin ``DeepseekV32Attention._expanded``; up to
  ``MASKED_MLA_MAX_KEYS`` keys, where it beats gathering (:func:`masked_mla_supported`).
* :func:`lightning_indexer` - indexer scores + top-k (``kernels/indexer_kernel.py``), twin
  ``DeepseekV32Indexer.forward``; with ``as_mask`` the selected set as a bitmap for :func:`masked_mla`.
* :func:`fp8_linear` - block-FP8 w8a8 GEMM (``kernels/fp8_gemm.py``), twin ``fp8_block_matmul``;
  :func:`fp8_quantize_rows` - its 1x128 ue8m0 activation quantization alone, twin ``quantize_blockwise_1d``.
* :func:`rms_norm` - ``DeepseekV32RMSNorm`` in one pass (``kernels/norm_kernel.py``), twin its ``forward``.
* :func:`grouped_moe` - all routed experts of a MoE layer in three launches (``kernels/moe_kernel.py``), twin
  ``DeepseekV32MoE.run_experts``'s per-expert loop; only for plain ``nn.Linear`` (bf16/fp16/fp32) or ``FP8Linear``
  experts without hooks, so bitsandbytes, PEFT and offloading hooks keep the loop.

A kernel runs when kernels are enabled, every tensor is on CUDA, no input needs a gradient (the kernels have no
backward) and the shapes are supported. Each reason for falling back is logged once (logger
``modeling_deepseek_v32.kernels``); a kernel that raises is logged with its error and not tried again in the process.
"""

from __future__ import annotations

import collections
import functools
import logging
import os

__all__ = ["kernels_enabled", "sparse_mla", "sparse_mla_supported", "masked_mla", "masked_mla_supported", "fp8_round_trip",
           "lightning_indexer", "fp8_linear", "fp8_quantize_rows", "rms_norm", "grouped_moe"]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None

_ENV_VAR = "DEEPSEEK_V32_KERNELS"
logger = logging.getLogger(__name__)

# Tests set this to True to run the dispatch on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
ALLOW_CPU_INTERPRETER = False

# Tests set this to True so a kernel error raises instead of falling back.
RAISE_ERRORS = False
# Successful kernel calls per kernel name, so tests (and curious users) can see which path ran.
calls: collections.Counter = collections.Counter()

_logged: set[str] = set()
_broken: set[str] = set()


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


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def kernels_enabled() -> bool:
    """Whether the Triton kernels should be used.

    ``False`` when the environment variable ``DEEPSEEK_V32_KERNELS`` is ``"0"``; otherwise ``True`` exactly when
    Triton can be imported and a CUDA device is available. The environment variable is read on every call; the
    Triton/CUDA probe is done once per process.
    """
    if os.environ.get(_ENV_VAR, "").strip() == "0":
        return False
    return _triton_and_cuda_available()


def _log_once(key: str, level: int, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message, *args)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _usable(name: str, *tensors) -> bool:
    """Common preconditions of every kernel; logs (once per reason) why a CUDA call falls back."""
    if os.environ.get(_ENV_VAR, "").strip() == "0" or name in _broken:
        return False
    if all(t.is_cuda for t in tensors):
        if not _triton_and_cuda_available():
            _log_once("no-triton", logging.INFO, "Triton is not importable: using the PyTorch paths (pip install triton)")
            return False
    elif not (ALLOW_CPU_INTERPRETER and _interpreter_on() and _triton_importable()):
        return False  # CPU (or mixed devices): the PyTorch twin is the implementation, nothing to report
    import torch

    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        _log_once(f"{name}:grad", logging.INFO, "%s: inputs need gradients and the kernel has no backward; using PyTorch", name)
        return False
    return True


def _unsupported(name: str, reason: str) -> None:
    _log_once(f"{name}:{reason}", logging.INFO, "%s kernel does not support %s; using the PyTorch path", name, reason)


def _call(name: str, fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
    except Exception as error:  # compile/launch failure: never break the model, fall back for good
        if RAISE_ERRORS:
            raise
        _broken.add(name)
        _log_once(f"{name}:error", logging.WARNING, "%s kernel failed (%s: %s); using the PyTorch path from now on",
                  name, type(error).__name__, error)  # fmt: skip
        return None
    calls[name] += 1
    return result


# --------------------------------------------------------------------------------------------------------------
# Sparse MLA (absorbed)
_MLA_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")


def _mla_shape_problem(q_rope, latent) -> str | None:
    if str(latent.dtype) not in _MLA_DTYPES or q_rope.dtype != latent.dtype:
        return f"dtype {latent.dtype}/{q_rope.dtype}"
    if latent.shape[-1] > 1024 or q_rope.shape[-1] > 256:
        return f"kv_lora_rank {latent.shape[-1]} / rope dim {q_rope.shape[-1]}"
    return None


def sparse_mla_supported(q_rope, latent) -> bool:
    """Whether :func:`sparse_mla` will run for these inputs (lets prefill take the absorbed kernel path)."""
    if not _usable("sparse_mla", q_rope, latent):
        return False
    problem = _mla_shape_problem(q_rope, latent)
    if problem is not None:
        _unsupported("sparse_mla", problem)
        return False
    return True


def fp8_round_trip(x):
    """``x`` quantized like an FP8 linear's input (1x128 blocks, ue8m0) and dequantized back to ``x.dtype`` (exact:
    e4m3 values times powers of two fit bf16/fp16/fp32). The expanded form feeds the latent through the FP8
    ``kv_b_proj``; the absorbed kernel sees this latent, so both forms compute the same function."""
    from ..fp8 import dequantize_blockwise_1d, quantize_blockwise_1d

    values, scales = quantize_blockwise_1d(x, 128, "ue8m0")
    return dequantize_blockwise_1d(values, scales, 128, x.dtype)


def sparse_mla(q_latent, q_rope, latent, k_rope, selection, past_len: int, key_valid, scale: float):
    """Absorbed attention output ``[B, S, H, kv_lora_rank]`` or None (run the twin)."""
    if not sparse_mla_supported(q_rope, latent) or not _usable("sparse_mla", q_latent, k_rope):
        return None
    if q_latent.dtype != latent.dtype or k_rope.dtype != latent.dtype:
        _unsupported("sparse_mla", f"mixed dtypes {q_latent.dtype}/{k_rope.dtype}/{latent.dtype}")
        return None
    from . import mla_kernel as _impl

    if selection is None:
        indices = valid = None
    else:
        indices, valid = selection.indices, selection.valid
    return _call("sparse_mla", _impl.sparse_mla_attention, q_latent, q_rope, latent, k_rope, indices, valid, scale,
                 past_len=past_len, key_valid=key_valid if selection is None else None)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Masked MLA prefill (expanded form, selection as a bitmap)

# Longest context (cached + new tokens) for which prefill attends through the masked kernel rather than gathering
# each query's selected latents: dense tiles over all causal keys cost ~S^2/2 pairs of 320 dims per head at ~300-365
# TFLOP/s, the gather S x 2048 pairs of 1088 latent dims at ~72 (H100, index_topk 2048: 15 vs 33 ms at 32K, so the
# two meet near 70K; benchmarks/NOTES.md).
MASKED_MLA_MAX_KEYS = 65536


def masked_mla_supported(q_nope, q_rope, total: int) -> bool:
    """Whether :func:`masked_mla` will run for a prefill over ``total`` keys (the model then asks the indexer for a
    bitmap and expands K/V); beyond ``MASKED_MLA_MAX_KEYS`` the absorbed :func:`sparse_mla` is faster."""
    if total > MASKED_MLA_MAX_KEYS or not _usable("masked_mla", q_nope, q_rope):
        return False
    if str(q_nope.dtype) not in _MLA_DTYPES or q_rope.dtype != q_nope.dtype:
        _unsupported("masked_mla", f"dtype {q_nope.dtype}/{q_rope.dtype}")
        return False
    if q_nope.shape[-1] > 256 or q_rope.shape[-1] > 128:
        _unsupported("masked_mla", f"head dims {q_nope.shape[-1]}+{q_rope.shape[-1]}")
        return False
    return True


def masked_mla(q_nope, q_rope, k_nope, k_rope, values, selection, past_len: int, key_valid, scale: float):
    """Expanded attention output ``[B, S, H, v_head_dim]`` over the selection (None: every causal key), or None."""
    if not masked_mla_supported(q_nope, q_rope, k_nope.shape[1]) or not _usable("masked_mla", k_nope, k_rope, values):
        return None
    if values.shape[-1] > 256 or len({k_nope.dtype, k_rope.dtype, values.dtype, q_nope.dtype}) != 1:
        _unsupported("masked_mla", f"value dim {values.shape[-1]} or mixed dtypes")
        return None
    from . import masked_mla_kernel as _impl

    words = None if selection is None else selection.mask_words(k_nope.shape[1])
    return _call("masked_mla", _impl.masked_mla_attention, q_nope, q_rope, k_nope, k_rope, values, words, scale,
                 past_len=past_len, key_valid=key_valid)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Lightning indexer
def lightning_indexer(q, q_scale, k, k_scale, weights, past_len: int, key_valid, topk: int, as_mask: bool = False):
    """``(indices, valid)`` of the indexer's top-k (``as_mask``: the same set as a bitmap of int32 words), or None
    (run the twin)."""
    name = "lightning_indexer_mask" if as_mask else "lightning_indexer"
    if not _usable(name, q, k, weights):
        return None
    import torch

    if q.dtype not in (torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype:
        _unsupported(name, f"dtype {q.dtype}/{k.dtype}")
        return None
    if (q_scale is None) != (k_scale is None) or (q_scale is not None and (q_scale.shape[-1] != 1 or k_scale.shape[-1] != 1)):
        _unsupported(name, "more than one FP8 scale block per head (index_head_dim > 128)")
        return None
    if q.shape[-1] > 256:
        _unsupported(name, f"index_head_dim {q.shape[-1]}")
        return None
    from . import indexer_kernel as _impl

    select = _impl.lightning_indexer_mask if as_mask else _impl.lightning_indexer_topk
    return _call(name, select, q, q_scale, k, k_scale, weights, past_len, key_valid, topk)


# --------------------------------------------------------------------------------------------------------------
# FP8 block GEMM
def fp8_linear(x, w_fp8, scale_inv, bias, block_size):
    """``Q(x) @ W^T (+ bias)`` in ``x.dtype`` with the block-FP8 kernel, or None (run the twin)."""
    if not _usable("fp8_gemm", x, w_fp8, scale_inv) or (bias is not None and not _usable("fp8_gemm", bias)):
        return None
    if tuple(block_size) != (128, 128):
        _unsupported("fp8_gemm", f"block size {tuple(block_size)}")
        return None
    import torch

    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        _unsupported("fp8_gemm", f"activation dtype {x.dtype}")
        return None
    try:
        from . import fp8_gemm as _impl
    except ImportError:
        return None
    return _call("fp8_gemm", _impl.fp8_linear, x, w_fp8, scale_inv, bias)


def fp8_quantize_rows(x):
    """``quantize_blockwise_1d(x, 128, "ue8m0")`` (bit-identical) in one kernel instead of ~6 elementwise passes, or
    None (run the twin). The indexer quantizes 64 heads x 128 dims per token this way."""
    import torch

    if not _usable("fp8_quantize", x) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    try:
        from . import fp8_gemm as _impl
    except ImportError:
        return None
    shape = x.shape
    found = _call("fp8_quantize", _impl.quantize_activations, x.reshape(-1, shape[-1]))
    if found is None:
        return None
    values, scales = found
    return values.view(shape), scales.view(*shape[:-1], scales.shape[-1])


# --------------------------------------------------------------------------------------------------------------
# RMSNorm
def rms_norm(x, weight, eps: float):
    """``DeepseekV32RMSNorm`` in one kernel (``kernels/norm_kernel.py``), or None (run the twin)."""
    import torch

    if not _usable("rms_norm", x, weight):
        return None
    if DTensor and isinstance(weight, DTensor):
        _unsupported("rms_norm", "DTensor weights")
        return None
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[-1] > 16384 or weight.shape != x.shape[-1:]:
        _unsupported("rms_norm", f"input {x.dtype} {tuple(x.shape)} / weight {tuple(weight.shape)}")
        return None
    from . import norm_kernel as _impl

    return _call("rms_norm", _impl.rms_norm, x, weight, eps)


# --------------------------------------------------------------------------------------------------------------
# Grouped MoE experts
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_tables(experts, device):
    """``(key, weights, scales, fp8)`` of the experts' matrices, or a string saying why the kernel cannot read them.

    The kernel bypasses the modules' ``forward``, so it only takes modules whose forward is exactly a product with
    the stored matrix: the plain classes (a subclass such as bitsandbytes' ``Linear4bit`` or a PEFT wrapper computes
    something else), no hooks (accelerate's offloading swaps weights in a pre-forward hook), no bias."""
    import torch
    from torch import nn

    from ..fp8 import FP8Linear
    from ..layers import DeepseekV32MLP

    weights, scales, key = [], [], []
    kinds = set()
    for expert in experts:
        if type(expert) is not DeepseekV32MLP or expert._forward_hooks or expert._forward_pre_hooks:
            return f"expert module {type(expert).__name__} (or hooks)"
        modules = expert._modules
        for name in _PROJECTIONS:
            linear = modules[name]
            kind = type(linear)
            if (kind is not nn.Linear and kind is not FP8Linear) or linear._forward_hooks or linear._forward_pre_hooks:
                return f"expert projection {kind.__name__} (or hooks)"
            if linear.bias is not None:
                return "expert biases"
            weight = linear.weight
            if weight.device != device or not weight.is_contiguous():
                return "expert weights off the activations' device or not contiguous"
            kinds.add((kind, weight.dtype))
            weights.append(weight)
            key.append(weight.data_ptr())
            if kind is FP8Linear:
                if linear.block_size != (128, 128) or not linear.weight_scale_inv.is_contiguous():
                    return f"FP8 block size {linear.block_size}"
                scales.append(linear.weight_scale_inv)
                key.append(scales[-1].data_ptr())
    if len(kinds) != 1:
        return "experts of mixed types or dtypes"
    kind, dtype = kinds.pop()
    if kind is nn.Linear and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"expert weight dtype {dtype}"
    shapes = {tuple(w.shape) for w in weights[0::3]}, {tuple(w.shape) for w in weights[1::3]}, {tuple(w.shape) for w in weights[2::3]}
    if any(len(s) != 1 for s in shapes) or shapes[0] != shapes[1]:
        return "experts of different shapes"
    return tuple(key), weights, scales, kind is FP8Linear


def grouped_moe(moe, tokens, weights, experts):
    """Routed experts' weighted sum ``[T, hidden]`` fp32 for ``DeepseekV32MoE`` ``moe``, or None (run the loop)."""
    import torch

    if not _usable("grouped_moe", tokens, weights):
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in moe.experts.parameters()):
        _log_once("grouped_moe:grad", logging.INFO, "grouped_moe: expert weights need gradients; using PyTorch")
        return None
    found = _expert_tables(moe.experts, tokens.device)
    if isinstance(found, str):
        _unsupported("grouped_moe", found)
        return None
    key, matrices, scales, fp8 = found
    if not fp8 and matrices[0].dtype != tokens.dtype:
        _unsupported("grouped_moe", f"activations {tokens.dtype} with {matrices[0].dtype} experts")
        return None
    cached = getattr(moe, "_grouped_moe_tables", None)
    if cached is None or cached[0] != key:
        # Pointer tables are rebuilt whenever any expert matrix moved (loading, .to(), a swapped parameter).
        def table(items):
            return torch.tensor([t.data_ptr() for t in items], dtype=torch.int64, device=tokens.device)

        tables = {name: table(matrices[i::3]) for i, name in enumerate(("gate", "up", "down"))}
        if fp8:
            tables.update({f"{name}_scale": table(scales[i::3]) for i, name in enumerate(("gate", "up", "down"))})
        # Addresses only, no references: the key is checked against the live matrices on every call.
        cached = (key, tables)
        moe._grouped_moe_tables = cached
    from . import moe_kernel as _impl

    intermediate = matrices[0].shape[0]
    return _call("grouped_moe", _impl.grouped_experts, tokens, weights, experts, cached[1], intermediate, fp8)
