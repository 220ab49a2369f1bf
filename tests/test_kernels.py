"""Triton kernels against their plain-PyTorch twins, at tiny shapes.

Without a GPU these run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before the kernels are
imported), which is what CI does; on a GPU the same tests run compiled. The kernels reach the model through the
dispatch hooks in attention.py / indexer.py / fp8.py, which the tests drive on CPU tensors by setting
``kernels.ALLOW_CPU_INTERPRETER``. Real-shape parity and speed live in tests/test_kernels_gpu.py and benchmarks/.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (triton.jit reads it then)

import modeling_deepseek_v32.kernels as kernels  # noqa: E402
from modeling_deepseek_v32.attention import DeepseekV32Attention  # noqa: E402
from modeling_deepseek_v32.fp8 import FP8Linear, quantize_blockwise_1d  # noqa: E402
from modeling_deepseek_v32.indexer import DeepseekV32Indexer, IndexSelection  # noqa: E402
from modeling_deepseek_v32.rope import DeepseekV32RotaryEmbedding  # noqa: E402
from modeling_deepseek_v32.testing_utils import IndexKeyCache, random_model, relative_error, tiny_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------------------------------
# 1. sparse MLA (absorbed)
def _mla_inputs(config, batch, seq, total, seed, dtype):
    heads, nope, rope, rank = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                               config.kv_lora_rank)  # fmt: skip
    q = _randn(batch, seq, heads, nope + rope, seed=seed, dtype=dtype)
    q_nope, q_rope = q.split((nope, rope), dim=-1)  # strided views, as in the model
    kv = _randn(batch, total, rank + rope, seed=seed + 1, dtype=dtype)
    latent, k_rope = kv.split((rank, rope), dim=-1)
    return q_nope, q_rope, latent, k_rope


def _random_selection(batch, seq, total, topk, past_len, seed, key_valid=None) -> IndexSelection:
    """Per query: topk distinct random tokens, valid where causal (and not padding); some rows all invalid."""
    g = _gen(seed)
    scores = torch.rand(batch, seq, total, generator=g)
    pos = past_len + torch.arange(seq)
    allowed = torch.arange(total)[None, None, :] <= pos[None, :, None]
    if key_valid is not None:
        allowed = allowed & key_valid.cpu()[:, None, :]
    scores = scores.masked_fill(~allowed, -1.0)
    values, indices = scores.topk(topk, dim=-1)
    return IndexSelection(indices.to(DEVICE), (values >= 0).to(DEVICE))


def _attention(config, dtype):
    torch.manual_seed(0)
    return DeepseekV32Attention(config, 0).to(DEVICE, dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sparse", "dense", "dense_padded"])
def test_sparse_mla_matches_absorbed_twin(use_kernels, dtype, mode):
    config = tiny_config()
    attn = _attention(config, dtype)
    batch, seq, past_len = 2, 6, 10
    total = past_len + seq
    q_nope, q_rope, latent, k_rope = _mla_inputs(config, batch, seq, total, seed=1, dtype=dtype)
    key_valid = None
    if mode == "dense_padded":
        key_valid = torch.ones(batch, total, dtype=torch.bool, device=DEVICE)
        key_valid[1, :12] = False  # row 1: its first queries see no token at all -> zeros
    selection = None if mode != "sparse" else _random_selection(batch, seq, total, 8, past_len, seed=2)
    args = (q_nope, q_rope, latent, k_rope, selection, past_len, key_valid)
    use_kernels(False)
    with torch.no_grad():
        expected = attn._absorbed(*args)
    use_kernels(True)
    before = kernels.calls["sparse_mla"]
    with torch.no_grad():
        actual = attn._absorbed(*args)
    assert kernels.calls["sparse_mla"] == before + 1
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(actual.float(), expected.float()) < tolerance


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_sparse_mla_kernel_splits_and_int32_indices(num_splits):
    from modeling_deepseek_v32.kernels.mla_kernel import sparse_mla_attention

    config = tiny_config()
    batch, seq, past_len, topk = 2, 3, 29, 24
    total = past_len + seq
    heads, rank = config.num_attention_heads, config.kv_lora_rank
    q_latent = _randn(batch, seq, heads, rank, seed=3)
    _, q_rope, latent, k_rope = _mla_inputs(config, batch, seq, total, seed=4, dtype=torch.float32)
    selection = _random_selection(batch, seq, total, topk, past_len, seed=5)
    selection.valid[0, 1] = False  # a query with nothing to attend to
    out = sparse_mla_attention(q_latent, q_rope, latent, k_rope, selection.indices.int(), selection.valid, 0.3,
                               num_splits=num_splits, block_n=16)  # fmt: skip
    # reference straight from the formula
    b = torch.arange(batch, device=DEVICE)[:, None, None]
    lat, rope = latent[b, selection.indices], k_rope[b, selection.indices]
    scores = (torch.einsum("bshc,bskc->bshk", q_latent, lat) + torch.einsum("bshr,bskr->bshk", q_rope, rope)) * 0.3
    scores = scores.masked_fill(~selection.valid[:, :, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1))
    expected = torch.einsum("bshk,bskc->bshc", probs, lat)
    assert torch.all(out[0, 1] == 0)
    assert relative_error(out, expected) < 1e-5


def test_prefill_expanded_path_routes_to_kernel(use_kernels):
    """With kernels on, the expanded (prefill) form is computed by a kernel (the masked one at this length; the
    absorbed one beyond ``MASKED_MLA_MAX_KEYS``, tests/test_masked_prefill.py): same function."""
    config = tiny_config()
    attn = _attention(config, torch.float32)
    batch, seq = 2, 12
    q_nope, q_rope, latent, k_rope = _mla_inputs(config, batch, seq, seq, seed=6, dtype=torch.float32)
    selection = _random_selection(batch, seq, seq, 8, 0, seed=7)
    args = (q_nope, q_rope, latent, k_rope, selection, 0, None)
    use_kernels(False)
    with torch.no_grad():
        expected = attn._expanded(*args)
    use_kernels(True)
    with torch.no_grad():
        actual = attn._expanded(*args)
    assert kernels.calls["masked_mla"] > 0
    assert relative_error(actual, expected) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# 2. lightning indexer
def _indexer_case(index_fp8, dtype, batch=2, seq=24, n_heads=4, topk=8, seed=0):
    config = tiny_config(index_fp8=index_fp8, index_n_heads=n_heads, index_topk=topk)
    torch.manual_seed(seed)
    indexer = DeepseekV32Indexer(config, 0).to(DEVICE, dtype).eval()
    rotary = DeepseekV32RotaryEmbedding(config).to(DEVICE)
    hidden = _randn(batch, seq, config.hidden_size, seed=seed + 1, dtype=dtype)
    q_latent = _randn(batch, seq, config.q_lora_rank, seed=seed + 2, dtype=dtype)
    cos, sin = rotary(torch.arange(seq, device=DEVICE)[None].expand(batch, -1))
    return indexer, hidden, q_latent, cos, sin


@pytest.mark.parametrize("index_fp8", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_indexer_matches_twin_exactly(use_kernels, index_fp8, padded):
    """Same tokens in the same order (ties: earlier token first), valid flags included, prefill and decode."""
    indexer, hidden, q_latent, cos, sin = _indexer_case(index_fp8, torch.float32)
    batch, seq = hidden.shape[:2]
    key_valid = None
    if padded:
        key_valid = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
        key_valid[1, :7] = False
    prompt = 17

    def run():
        cache = IndexKeyCache()
        out = [indexer(hidden[:, :prompt], q_latent[:, :prompt], cos[:, :prompt], sin[:, :prompt], 0,
                       None if key_valid is None else key_valid[:, :prompt], cache)]  # fmt: skip
        for t in range(prompt, seq):
            sl = slice(t, t + 1)
            kv = None if key_valid is None else key_valid[:, : t + 1]
            out.append(indexer(hidden[:, sl], q_latent[:, sl], cos[:, sl], sin[:, sl], t, kv, cache))
        return out

    use_kernels(False)
    expected = run()
    use_kernels(True)
    before = kernels.calls["lightning_indexer"]
    actual = run()
    assert kernels.calls["lightning_indexer"] == before + len(actual)
    for exp, act in zip(expected, actual):
        assert torch.equal(exp.valid, act.valid)
        assert torch.equal(exp.indices, act.indices)


def test_indexer_ties_pick_earlier_tokens(use_kernels):
    """All scores tie (zero weights): every query selects its first tokens in order, like the stable sort."""
    indexer, hidden, q_latent, cos, sin = _indexer_case(True, torch.float32, seq=20)
    with torch.no_grad():
        indexer.weights_proj.weight.zero_()
    use_kernels(True)
    selection = indexer(hidden, q_latent, cos, sin, 0, None)
    use_kernels(False)
    expected = indexer(hidden, q_latent, cos, sin, 0, None)
    assert torch.equal(selection.indices, expected.indices)
    assert torch.equal(selection.indices[:, -1], torch.arange(8, device=DEVICE).expand(2, -1))


def test_indexer_chunks_queries_under_a_budget():
    """A tiny score budget forces one query per chunk; the result does not change."""
    from modeling_deepseek_v32.kernels.indexer_kernel import lightning_indexer_topk

    batch, seq, heads, dim, topk, past_len = 1, 5, 4, 16, 6, 11
    total = past_len + seq
    q, q_scale = quantize_blockwise_1d(_randn(batch, seq, heads, dim, seed=8), dim)
    k, k_scale = quantize_blockwise_1d(_randn(batch, total, dim, seed=9), dim)
    weights = _randn(batch, seq, heads, seed=10)
    one = lightning_indexer_topk(q, q_scale, k, k_scale, weights, past_len, None, topk)
    chunked = lightning_indexer_topk(q, q_scale, k, k_scale, weights, past_len, None, topk, budget=1)
    assert torch.equal(one[0], chunked[0]) and torch.equal(one[1], chunked[1])
    scores = torch.einsum("bshd,btd->bsht", q.float() * q_scale, k.float() * k_scale).relu()
    scores = torch.einsum("bsh,bsht->bst", weights, scores)
    causal = torch.arange(total)[None, :] <= (past_len + torch.arange(seq))[:, None]
    scores = scores.masked_fill(~causal.to(DEVICE), float("-inf"))
    expected = scores.sort(dim=-1, descending=True, stable=True).indices[..., :topk]
    assert torch.equal(one[0], expected)


# ----------------------------------------------------------------------------------------------------------------
# 3. FP8 block GEMM
@pytest.mark.parametrize("shape", [(5, 256, 200, False), (33, 200, 136, True)])
def test_fp8_linear_matches_twin(use_kernels, shape):
    from modeling_deepseek_v32.kernels.fp8_gemm import quantize_activations

    tokens, in_features, out_features, bias = shape
    torch.manual_seed(11)
    layer = FP8Linear.from_linear(torch.nn.Linear(in_features, out_features, bias=bias)).to(DEVICE)
    x = _randn(tokens, in_features, seed=12) * 3
    x[0, :128] = 0  # an all-zero block: floored amax
    xq, xs = quantize_activations(x)
    rq, rs = quantize_blockwise_1d(x, 128, "ue8m0")
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(xs, rs)
    use_kernels(False)
    with torch.no_grad():
        expected = layer(x)
    use_kernels(True)
    before = kernels.calls["fp8_gemm"]
    with torch.no_grad():
        actual = layer(x)
    assert kernels.calls["fp8_gemm"] == before + 1
    # the interpreter multiplies in fp32; FP8 tensor cores accumulate a 128-wide block with fewer bits
    assert relative_error(actual, expected) < (1e-5 if DEVICE == "cpu" else 1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Whole model and dispatch behaviour
def test_tiny_model_with_kernels_matches_pytorch(use_kernels):
    """Prefill (sparse, left-padded) and decode steps through all three hooks equal the PyTorch model.

    FP8 weights only under the interpreter, where the kernel's products are exact fp32: on a GPU the FP8 tensor
    cores round differently from the fp32 twin and a random tiny model amplifies that into different indexer picks
    (the GPU checks FP8 at real shapes in test_kernels_gpu.py)."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    quant = quant if DEVICE == "cpu" else None
    config = tiny_config(hidden_size=128, num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1,
                         quantization_config=quant)  # fmt: skip
    model = random_model(config, seed=21).to(DEVICE)
    input_ids = torch.randint(1, 512, (2, 13), generator=_gen(22)).to(DEVICE)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    prompt = 11

    def run():
        with torch.no_grad():
            out = model(input_ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
            logits = [out.logits]
            for t in range(prompt, input_ids.shape[1]):
                out = model(input_ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                            past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
                logits.append(out.logits)
        return torch.cat(logits, 1)

    use_kernels(False)
    expected = run()
    use_kernels(True)
    kernels.calls.clear()
    actual = run()
    assert kernels.calls["masked_mla"] and kernels.calls["lightning_indexer_mask"]  # prefill
    assert kernels.calls["sparse_mla"] and kernels.calls["lightning_indexer"] and kernels.calls["grouped_moe"]
    assert kernels.calls["fp8_gemm"] or quant is None
    valid = mask.bool()
    assert relative_error(actual[valid], expected[valid]) < 1e-4


def test_kernels_off_and_gradients_use_pytorch(use_kernels, monkeypatch):
    config = tiny_config()
    attn = _attention(config, torch.float32)
    q_nope, q_rope, latent, k_rope = _mla_inputs(config, 1, 4, 4, seed=30, dtype=torch.float32)
    kernels.calls.clear()
    use_kernels(False)
    assert kernels.sparse_mla_supported(q_rope, latent) is False
    use_kernels(True)
    assert kernels.sparse_mla_supported(q_rope, latent) is True
    q_rope = q_rope.clone().requires_grad_()
    out = attn._absorbed(q_nope, q_rope, latent, k_rope, None, 0, None)
    out.sum().backward()  # the twin ran: it has a backward
    assert q_rope.grad is not None and kernels.calls["sparse_mla"] == 0


def test_kernel_error_falls_back_once_with_a_warning(use_kernels, monkeypatch, caplog):
    from modeling_deepseek_v32.kernels import mla_kernel

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(mla_kernel, "sparse_mla_attention", broken)
    monkeypatch.setattr(kernels, "RAISE_ERRORS", False)
    monkeypatch.setattr(kernels, "_logged", set())
    config = tiny_config()
    attn = _attention(config, torch.float32)
    args = (*_mla_inputs(config, 1, 4, 4, seed=31, dtype=torch.float32), None, 0, None)
    use_kernels(False)
    with torch.no_grad():
        expected = attn._absorbed(*args)
    use_kernels(True)
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v32.kernels"), torch.no_grad():
        first = attn._absorbed(*args)
        second = attn._absorbed(*args)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert sum("simulated compile failure" in r.getMessage() for r in caplog.records) == 1
    assert "sparse_mla" in kernels._broken
    kernels._broken.discard("sparse_mla")
