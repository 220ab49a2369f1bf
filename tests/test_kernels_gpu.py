"""Triton kernels against their PyTorch twins at real (bench preset) shapes, on a CUDA GPU.

Skipped without CUDA; run through the `device` tool. The same checks at tiny shapes run in CI under Triton's
interpreter (tests/test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

import modeling_deepseek_v32.kernels as kernels  # noqa: E402
from modeling_deepseek_v32 import DeepseekV32Config  # noqa: E402
from modeling_deepseek_v32.attention import DeepseekV32Attention  # noqa: E402
from modeling_deepseek_v32.fp8 import FP8Linear  # noqa: E402
from modeling_deepseek_v32.indexer import DeepseekV32Indexer, IndexSelection  # noqa: E402
from modeling_deepseek_v32.rope import DeepseekV32RotaryEmbedding  # noqa: E402
from modeling_deepseek_v32.testing_utils import IndexKeyCache, random_model, relative_error  # noqa: E402


def _bench(**overrides) -> DeepseekV32Config:
    return DeepseekV32Config.from_preset("bench", **overrides)


def _randn(*shape, seed, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda").to(dtype)


def _selection(batch, seq, total, topk, past_len, seed):
    scores = torch.rand(batch, seq, total, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")
    pos = past_len + torch.arange(seq, device="cuda")
    allowed = torch.arange(total, device="cuda")[None, None, :] <= pos[None, :, None]
    values, indices = scores.masked_fill(~allowed, -1.0).topk(topk, dim=-1)
    return IndexSelection(indices, values >= 0)


@pytest.mark.parametrize(
    "batch,seq,past_len,mode",
    [(1, 2048, 2048, "sparse"), (4, 2, 32766, "sparse"), (8, 1, 8191, "sparse"), (2, 1024, 0, "dense")],
)
def test_sparse_mla_bench_shapes(kernel_switch, batch, seq, past_len, mode):
    config = _bench()
    torch.manual_seed(0)
    attn = DeepseekV32Attention(config, 0).cuda().to(torch.bfloat16).eval()
    total = past_len + seq
    heads, nope, rope, rank = 16, 128, 64, 512
    q = _randn(batch, seq, heads, nope + rope, seed=1)
    q_nope, q_rope = q.split((nope, rope), dim=-1)
    kv = _randn(batch, total, rank + rope, seed=2)
    latent, k_rope = kv.split((rank, rope), dim=-1)
    selection = _selection(batch, seq, total, 2048, past_len, seed=3) if mode == "sparse" else None
    args = (q_nope, q_rope, latent, k_rope, selection, past_len, None)
    kernel_switch(False)
    with torch.no_grad():
        expected = attn._absorbed(*args).float()
    kernel_switch(True)
    before = kernels.calls["sparse_mla"]
    with torch.no_grad():
        actual = attn._absorbed(*args).float()
    assert kernels.calls["sparse_mla"] == before + 1
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) < 2e-2


def _indexer_scores(indexer, hidden, q_latent, cos, sin, keys, key_scale):
    """fp32 scores of the twin's formula, for judging near-ties."""
    q = indexer.wq_b(q_latent).unflatten(-1, (indexer.n_heads, indexer.head_dim))
    q_stored, q_scale = indexer._quantize(indexer._rope(q, cos, sin))
    queries = indexer._dequantize(q_stored, q_scale)
    keys = indexer._dequantize(keys, key_scale)
    weights = torch.nn.functional.linear(hidden.float(), indexer.weights_proj.weight.float())
    weights = weights * (indexer.n_heads**-0.5 * indexer.head_dim**-0.5)
    return torch.einsum("bsh,bsht->bst", weights, torch.einsum("bshd,btd->bsht", queries, keys).relu())


@pytest.mark.parametrize("index_fp8", [True, False])
@pytest.mark.parametrize("past_len,seq", [(7680, 512), (32767, 1)])
def test_indexer_bench_shapes(kernel_switch, index_fp8, past_len, seq):
    """Same valid flags; selected sets equal except at true ties (scores equal to the k-th within fp32 rounding)."""
    config = _bench(index_fp8=index_fp8)
    torch.manual_seed(0)
    indexer = DeepseekV32Indexer(config, 0).cuda().to(torch.bfloat16).eval()
    rotary = DeepseekV32RotaryEmbedding(config).cuda()
    batch, total = 1, past_len + seq
    hidden = _randn(batch, total, config.hidden_size, seed=5)
    q_latent = _randn(batch, total, config.q_lora_rank, seed=6)
    cos, sin = rotary(torch.arange(total, device="cuda")[None])
    cache = IndexKeyCache()
    kernel_switch(True)
    with torch.no_grad():
        indexer(hidden[:, :past_len], q_latent[:, :past_len], cos[:, :past_len], sin[:, :past_len], 0, None, cache)
        new = slice(past_len, total)
        before = kernels.calls["lightning_indexer"]
        actual = indexer(hidden[:, new], q_latent[:, new], cos[:, new], sin[:, new], past_len, None, cache)
        assert kernels.calls["lightning_indexer"] == before + 1
        kernel_switch(False)
        cache.k, cache.scale = cache.k[:, :past_len], None if cache.scale is None else cache.scale[:, :past_len]
        expected = indexer(hidden[:, new], q_latent[:, new], cos[:, new], sin[:, new], past_len, None, cache)
        scores = _indexer_scores(indexer, hidden[:, new], q_latent[:, new], cos[:, new], sin[:, new], cache.k, cache.scale)
    assert torch.equal(actual.valid, expected.valid)
    causal = torch.arange(total, device="cuda")[None, :] <= (past_len + torch.arange(seq, device="cuda"))[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    kth = scores.gather(-1, expected.indices[..., -1:])  # the twin's k-th score per query
    tol = 1e-5 * scores.masked_fill(~causal, 0).abs().amax(-1, keepdim=True)
    picked = torch.zeros_like(scores, dtype=torch.int8)
    picked.scatter_add_(-1, expected.indices, torch.ones_like(expected.indices, dtype=torch.int8))
    picked.scatter_add_(-1, actual.indices, -torch.ones_like(actual.indices, dtype=torch.int8))
    differ = picked != 0
    near_tie = (scores - kth).abs() <= tol
    assert bool((~differ | near_tie).all()), f"{int(differ.sum())} differing picks, not all at ties"
    same_order = (actual.indices == expected.indices).float().mean().item()
    assert same_order > 0.99


@pytest.mark.parametrize("seq,past_len,mode", [(8192, 0, "selected"), (1536, 6656, "selected"), (2048, 0, "causal")])
def test_masked_mla_bench_shapes(kernel_switch, seq, past_len, mode):
    """The masked prefill kernel (bitmap of 2048 random picks per query, or causal) against the gathering twin."""
    config = _bench()
    torch.manual_seed(0)
    attn = DeepseekV32Attention(config, 0).cuda().to(torch.bfloat16).eval()
    total, heads, nope, rope, rank = past_len + seq, 16, 128, 64, 512
    q_nope, q_rope = _randn(1, seq, heads, nope + rope, seed=1).split((nope, rope), dim=-1)
    latent, k_rope = _randn(1, total, rank + rope, seed=2).split((rank, rope), dim=-1)
    selection = _selection(1, seq, total, 2048, past_len, seed=3) if mode == "selected" else None
    args = (q_nope, q_rope, latent, k_rope, selection, past_len, None)
    kernel_switch(False)
    with torch.no_grad():
        expected = attn._expanded(*args).float()
    kernel_switch(True)
    before = kernels.calls["masked_mla"]
    with torch.no_grad():
        actual = attn._expanded(*args).float()
    assert kernels.calls["masked_mla"] == before + 1
    assert relative_error(actual, expected) < 2e-2


@pytest.mark.parametrize("index_fp8", [True, False])
def test_indexer_bitmap_bench_shapes(kernel_switch, index_fp8):
    """The indexer's bitmap holds exactly the sets of its own sorted top-k kernel (same scores, same tie rule)."""
    from modeling_deepseek_v32.indexer import indices_to_words

    config = _bench(index_fp8=index_fp8)
    torch.manual_seed(0)
    indexer = DeepseekV32Indexer(config, 0).cuda().to(torch.bfloat16).eval()
    rotary = DeepseekV32RotaryEmbedding(config).cuda()
    total = 8192
    hidden = _randn(1, total, config.hidden_size, seed=5)
    q_latent = _randn(1, total, config.q_lora_rank, seed=6)
    cos, sin = rotary(torch.arange(total, device="cuda")[None])
    kernel_switch(True)
    with torch.no_grad():
        listed = indexer(hidden, q_latent, cos, sin, 0, None, IndexKeyCache())
        before = kernels.calls["lightning_indexer_mask"]
        bitmap = indexer(hidden, q_latent, cos, sin, 0, None, IndexKeyCache(), as_mask=True)
    assert kernels.calls["lightning_indexer_mask"] == before + 1
    assert torch.equal(bitmap.mask_words(total), indices_to_words(listed.indices, listed.valid, total))


@pytest.mark.parametrize("rows,dim,width", [(8192, 2048, 2048), (8192, 512, 576), (3, 1536, 1536), (5, 7168, 7168)])
def test_rms_norm_bench_shapes(kernel_switch, rows, dim, width):
    from modeling_deepseek_v32.layers import DeepseekV32RMSNorm

    norm = DeepseekV32RMSNorm(dim).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * _randn(dim, seed=7))
    x = _randn(1, rows, width, seed=8)[..., :dim]
    kernel_switch(False)
    with torch.no_grad():
        expected = norm(x).float()
    kernel_switch(True)
    before = kernels.calls["rms_norm"]
    with torch.no_grad():
        actual = norm(x).float()
    assert kernels.calls["rms_norm"] == before + 1
    # one bf16 rounding of nearly the same fp32 value: equal or one ulp apart
    assert (actual - expected).abs().max().item() <= 2 ** -7 * expected.abs().max().item()
    assert (actual == expected).float().mean().item() > 0.99


@pytest.mark.parametrize("tokens", [1, 7, 300, 4096])
@pytest.mark.parametrize("features", [(2048, 2816), (2048, 576), (1408, 2048)])
def test_fp8_linear_bench_shapes(kernel_switch, tokens, features):
    in_features, out_features = features
    torch.manual_seed(1)
    dense = torch.nn.Linear(in_features, out_features, bias=False, device="cuda")
    layer = FP8Linear.from_linear(dense)
    x = _randn(tokens, in_features, seed=7)
    kernel_switch(False)
    with torch.no_grad():
        expected = layer(x).float()
    kernel_switch(True)
    with torch.no_grad():
        actual = layer(x).float()
    assert kernels.calls["fp8_gemm"] > 0
    assert relative_error(actual, expected) < 1e-2


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [1, 8, 5000])
def test_grouped_moe_bench_shapes(kernel_switch, fp8, tokens):
    """Grouped kernel vs the per-expert loop and both vs an fp32 reference of the same weights: the kernel's error is
    of the loop's size (they round the same intermediates; bf16 accumulation order differs)."""
    from modeling_deepseek_v32.moe import DeepseekV32MoE

    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config = _bench(quantization_config=quant if fp8 else None)
    torch.manual_seed(0)
    moe = DeepseekV32MoE(config).cuda().eval()
    for module in moe.modules():
        if isinstance(module, FP8Linear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="cuda")
            quantized = FP8Linear.from_linear(dense)
            module.weight.data.copy_(quantized.weight)
            module.weight_scale_inv.data.copy_(quantized.weight_scale_inv)
    moe = moe.to(torch.bfloat16)
    x = _randn(tokens, config.hidden_size, seed=11)
    experts = torch.rand(tokens, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(12)).topk(6, -1).indices
    weights = torch.rand(tokens, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(13))
    with torch.no_grad():
        kernel_switch(True)
        kernels._broken.add("grouped_moe")
        loop = moe.run_experts(x, weights, experts)
        kernels._broken.discard("grouped_moe")
        before = kernels.calls["grouped_moe"]
        grouped = moe.run_experts(x, weights, experts)
        assert kernels.calls["grouped_moe"] == before + 1
    assert relative_error(grouped, loop) < (3e-2 if fp8 else 1e-2)


def test_bench_model_prefill_and_decode_with_kernels(kernel_switch):
    """Two bench layers in bf16: 4096-token prefill (sparse) and decode steps agree with the PyTorch model.

    Both are bf16 computations that round differently (kernels sum in other orders, RMSNorm in one pass), and a random
    model has many near-ties in its MoE routing and indexer selection: a last-bit difference can flip one expert or
    token, which moves that position's logits by up to ~20% (seen on some inputs). Typical positions stay at the
    bf16 noise level (~1%): the median is checked tightly, the worst position loosely."""
    config = _bench(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = random_model(config, seed=3).cuda().to(torch.bfloat16)
    generator = torch.Generator("cuda").manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (1, 4104), device="cuda", generator=generator)
    prompt = 4096

    def run():
        with torch.no_grad():
            out = model(input_ids[:, :prompt], use_cache=True, logits_to_keep=1)
            logits = [out.logits.float()]
            for t in range(prompt, input_ids.shape[1]):
                out = model(input_ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits.float())
        return torch.cat(logits, 1)

    kernel_switch(False)
    expected = run()
    kernel_switch(True)
    kernels.calls.clear()
    actual = run()
    assert kernels.calls["sparse_mla"] and kernels.calls["lightning_indexer"] and kernels.calls["grouped_moe"]
    errors = sorted(relative_error(actual[:, i], expected[:, i]) for i in range(actual.shape[1]))
    print("relative logit error per position, kernels vs PyTorch:", errors)
    assert errors[len(errors) // 2] < 2.5e-2
    assert errors[-1] < 0.25
