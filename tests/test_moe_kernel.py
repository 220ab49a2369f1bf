"""The grouped MoE kernel against its twin, ``DeepseekV32MoE.run_experts``'s per-expert loop, at tiny shapes.

On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``); there both compute the same roundings, so
bf16 and FP8 results must be equal, not just close. Bench-shape parity is in tests/test_kernels_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (triton.jit reads it then)

import modeling_deepseek_v32.kernels as kernels  # noqa: E402
from modeling_deepseek_v32.fp8 import FP8Linear, quantize_weight_blockwise  # noqa: E402
from modeling_deepseek_v32.moe import DeepseekV32MoE  # noqa: E402
from modeling_deepseek_v32.testing_utils import relative_error, tiny_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


@pytest.fixture
def switch(kernel_switch, monkeypatch):
    monkeypatch.setattr(kernels, "ALLOW_CPU_INTERPRETER", True)
    return kernel_switch


def _moe(dtype, fp8=False, seed=0) -> DeepseekV32MoE:
    config = tiny_config(hidden_size=128, moe_intermediate_size=48, quantization_config=FP8_QUANT if fp8 else None)
    torch.manual_seed(seed)
    moe = DeepseekV32MoE(config).eval()
    if fp8:  # random block-FP8 weights (the constructor leaves them empty)
        for module in moe.modules():
            if isinstance(module, FP8Linear):
                weight, scale = quantize_weight_blockwise(torch.randn(module.weight.shape) * 0.05)
                module.weight.data.copy_(weight)
                module.weight_scale_inv.data.copy_(scale)
    return moe.to(DEVICE, dtype)


def _routing(tokens, n_experts, top_k, seed, only=None):
    g = torch.Generator().manual_seed(seed)
    if only is not None:  # every token to the same experts: one expert spans many row tiles, the rest are empty
        experts = torch.tensor(only)[None].expand(tokens, -1)
    else:
        experts = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(tokens)])
    return torch.rand(tokens, top_k, generator=g).to(DEVICE), experts.to(DEVICE)


def _both(moe, switch, x, weights, experts):
    with torch.no_grad():
        switch(False)
        expected = moe.run_experts(x, weights, experts)
        switch(True)
        before = kernels.calls["grouped_moe"]
        actual = moe.run_experts(x, weights, experts)
    return actual, expected, kernels.calls["grouped_moe"] - before


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,only", [(1, None), (40, None), (37, (3, 5))])
def test_grouped_moe_matches_loop(switch, dtype, fp8, tokens, only):
    moe = _moe(dtype, fp8)
    config = moe.config
    x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    weights, experts = _routing(tokens, config.n_routed_experts, config.num_experts_per_tok, seed=2, only=only)
    actual, expected, ran = _both(moe, switch, x, weights, experts)
    assert ran == 1 and actual.dtype == torch.float32 and actual.shape == expected.shape
    # Under the interpreter the kernel rounds exactly where the twin does; compiled, FP8 rounding of the hidden
    # activation may move by one step where the bf16 intermediate differs by an ulp.
    tolerance = 1e-5 if DEVICE == "cpu" else (2e-2 if dtype == torch.bfloat16 else 1e-4)
    assert relative_error(actual, expected) < tolerance


def test_grouped_moe_follows_replaced_weights(switch):
    """The pointer tables are keyed on the experts' data pointers: swapping a weight rebuilds them."""
    moe = _moe(torch.float32)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    weights, experts = _routing(5, 8, 2, seed=4, only=(2, 6))
    first, _, _ = _both(moe, switch, x, weights, experts)
    moe.experts[2].down_proj.weight.data = torch.randn_like(moe.experts[2].down_proj.weight)
    actual, expected, ran = _both(moe, switch, x, weights, experts)
    assert ran == 1 and relative_error(actual, expected) < 1e-5
    assert relative_error(actual, first) > 1e-2


@pytest.mark.parametrize("change", ["subclass", "hook", "bias", "grad"])
def test_grouped_moe_falls_back_to_the_loop(switch, change):
    """Modules whose forward is not a plain product with the stored matrix (bitsandbytes / PEFT wrappers are
    nn.Linear subclasses or replacements, accelerate offloading uses hooks) and training keep the twin loop."""
    moe = _moe(torch.float32)
    expert = moe.experts[1]
    if change == "subclass":

        class Scaled(torch.nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)

        scaled = Scaled(128, 48, bias=False).to(DEVICE)
        scaled.weight.data.copy_(expert.gate_proj.weight)
        expert.gate_proj = scaled
    elif change == "hook":
        expert.up_proj.register_forward_hook(lambda module, args, out: out * 3)
    elif change == "bias":
        expert.down_proj.bias = torch.nn.Parameter(torch.ones(128, device=DEVICE))
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    weights, experts = _routing(6, 8, 2, seed=6, only=(1, 4))
    if change == "grad":
        switch(True)
        before = kernels.calls["grouped_moe"]
        out = moe.run_experts(x, weights, experts)  # weights require grad, grad mode on: the loop runs
        out.sum().backward()
        assert kernels.calls["grouped_moe"] == before and moe.experts[1].gate_proj.weight.grad is not None
        return
    actual, expected, ran = _both(moe, switch, x, weights, experts)
    assert ran == 0 and torch.equal(actual, expected)
