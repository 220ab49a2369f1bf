"""The masked prefill path: the indexer kernel's selection bitmap and the expanded-form attention kernel over it,
against their plain-PyTorch twins at tiny shapes (Triton's CPU interpreter without a GPU, as in CI).

The twins: ``DeepseekV32Indexer.forward``'s stable-sorted top-k (the bitmap must hold exactly its set, ties
included) and ``DeepseekV32Attention._expanded``, which gathers each query's selected keys."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (triton.jit reads it then)

import modeling_deepseek_v32.kernels as kernels  # noqa: E402
from modeling_deepseek_v32.attention import DeepseekV32Attention  # noqa: E402
from modeling_deepseek_v32.indexer import (  # noqa: E402
    DeepseekV32Indexer,
    IndexSelection,
    indices_to_words,
    words_to_indices,
    words_to_mask,
)
from modeling_deepseek_v32.rope import DeepseekV32RotaryEmbedding  # noqa: E402
from modeling_deepseek_v32.testing_utils import IndexKeyCache, relative_error, tiny_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _set(indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Selected positions per query, sorted, invalid slots as -1 at the front: comparable across orders."""
    return indices.masked_fill(~valid, -1).sort(dim=-1).values


# ----------------------------------------------------------------------------------------------------------------
# The bitmap representation
def test_bitmap_by_hand_including_the_sign_bit():
    indices = torch.tensor([[[0, 31, 33, 5]]])
    valid = torch.tensor([[[True, True, True, False]]])
    words = indices_to_words(indices, valid, total=40)
    assert words.dtype == torch.int32 and words.shape == (1, 1, 2)
    assert words.tolist() == [[[1 - 2**31, 2]]]  # bits 0 and 31 (the sign bit), then bit 1 of word 1 (token 33)
    mask = words_to_mask(words, 40)
    assert mask.nonzero()[:, -1].tolist() == [0, 31, 33]
    back, back_valid = words_to_indices(words, 4)
    assert back[0, 0, :3].tolist() == [0, 31, 33] and back_valid.tolist() == [[[True, True, True, False]]]


def test_selection_converts_both_ways_and_checks_its_arguments():
    scores = torch.rand(2, 5, 70, generator=torch.Generator().manual_seed(0))
    values, indices = scores.topk(9, dim=-1)
    valid = values > 0.3
    selection = IndexSelection(indices, valid)
    from_words = IndexSelection(mask_words=selection.mask_words(70), topk=9)
    assert torch.equal(_set(from_words.indices, from_words.valid), _set(indices, valid))
    with pytest.raises(ValueError, match="covers"):
        selection.mask_words(200)
    with pytest.raises(ValueError, match="indices with valid"):
        IndexSelection(indices)
    with pytest.raises(ValueError, match="topk"):
        IndexSelection(mask_words=selection.mask_words(70))


# ----------------------------------------------------------------------------------------------------------------
# The indexer's bitmap output
def _indexer(index_fp8: bool, topk: int = 8, seed: int = 0):
    config = tiny_config(index_fp8=index_fp8, index_n_heads=4, index_topk=topk)
    torch.manual_seed(seed)
    indexer = DeepseekV32Indexer(config, 0).to(DEVICE).eval()
    rotary = DeepseekV32RotaryEmbedding(config).to(DEVICE)
    return config, indexer, rotary


@pytest.mark.parametrize("index_fp8", [True, False])
@pytest.mark.parametrize("case", ["prefill", "padded", "continuation", "ties"])
def test_indexer_bitmap_holds_the_twins_top_k_exactly(use_kernels, index_fp8, case):
    config, indexer, rotary = _indexer(index_fp8)
    batch, seq, past = 2, 37, (13 if case == "continuation" else 0)
    total = past + seq
    hidden = _randn(batch, total, config.hidden_size, seed=1)
    q_latent = _randn(batch, total, config.q_lora_rank, seed=2)
    cos, sin = rotary(torch.arange(total, device=DEVICE)[None].expand(batch, -1))
    key_valid = None
    if case == "padded":
        key_valid = torch.ones(batch, total, dtype=torch.bool, device=DEVICE)
        key_valid[1, :11] = False
    if case == "ties":
        with torch.no_grad():
            indexer.weights_proj.weight.zero_()  # every score ties: the earliest tokens win

    def select(as_mask: bool) -> IndexSelection:
        cache = IndexKeyCache()
        if past:
            indexer(hidden[:, :past], q_latent[:, :past], cos[:, :past], sin[:, :past], 0, None, cache)
        new = slice(past, total)
        return indexer(hidden[:, new], q_latent[:, new], cos[:, new], sin[:, new], past, key_valid, cache, as_mask)

    use_kernels(False)
    expected = select(False)
    use_kernels(True)
    before = kernels.calls["lightning_indexer_mask"]
    actual = select(True)
    assert kernels.calls["lightning_indexer_mask"] == before + 1
    words = actual.mask_words(total)
    assert torch.equal(words, indices_to_words(expected.indices, expected.valid, total))
    if case == "ties":
        assert words_to_mask(words, total)[:, -1].nonzero()[:, -1].tolist() == list(range(8)) * 2


def test_indexer_bitmap_chunks_queries_under_a_budget():
    from modeling_deepseek_v32.fp8 import quantize_blockwise_1d
    from modeling_deepseek_v32.kernels.indexer_kernel import lightning_indexer_mask, lightning_indexer_topk

    batch, seq, heads, dim, topk, past_len = 1, 5, 4, 16, 6, 60
    q, q_scale = quantize_blockwise_1d(_randn(batch, seq, heads, dim, seed=8), dim)
    k, k_scale = quantize_blockwise_1d(_randn(batch, past_len + seq, dim, seed=9), dim)
    weights = _randn(batch, seq, heads, seed=10)
    args = (q, q_scale, k, k_scale, weights, past_len, None, topk)
    whole, chunked = lightning_indexer_mask(*args), lightning_indexer_mask(*args, budget=1)
    assert torch.equal(whole, chunked)
    assert torch.equal(whole, indices_to_words(*lightning_indexer_topk(*args), past_len + seq))


# ----------------------------------------------------------------------------------------------------------------
# The masked attention kernel
def _attention_case(dtype, batch, seq, past_len, seed):
    config = tiny_config()
    torch.manual_seed(0)
    attn = DeepseekV32Attention(config, 0).to(DEVICE, dtype).eval()
    heads, nope, rope, rank = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                               config.kv_lora_rank)  # fmt: skip
    q_nope, q_rope = _randn(batch, seq, heads, nope + rope, seed=seed, dtype=dtype).split((nope, rope), dim=-1)
    latent, k_rope = _randn(batch, past_len + seq, rank + rope, seed=seed + 1, dtype=dtype).split((rank, rope), -1)
    return attn, q_nope, q_rope, latent, k_rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["selected", "selected_continuation", "causal", "causal_padded"])
def test_masked_mla_matches_the_gathering_twin(use_kernels, dtype, mode):
    batch, seq = 2, 21
    past_len = 40 if mode == "selected_continuation" else 0
    total = past_len + seq
    attn, q_nope, q_rope, latent, k_rope = _attention_case(dtype, batch, seq, past_len, seed=3)
    key_valid = selection = None
    if mode == "causal_padded":
        key_valid = torch.ones(batch, total, dtype=torch.bool, device=DEVICE)
        key_valid[1, :5] = False  # row 1's first queries see nothing: zeros
    if mode.startswith("selected"):
        scores = torch.rand(batch, seq, total, generator=torch.Generator().manual_seed(4))
        causal = torch.arange(total)[None, None, :] <= (past_len + torch.arange(seq))[None, :, None]
        values, indices = scores.masked_fill(~causal, -1.0).topk(8, dim=-1)
        valid = values >= 0
        valid[0, 3] = False  # a query with nothing selected: zeros
        selection = IndexSelection(indices.to(DEVICE), valid.to(DEVICE))
    args = (q_nope, q_rope, latent, k_rope, selection, past_len, key_valid)
    use_kernels(False)
    with torch.no_grad():
        expected = attn._expanded(*args)
    use_kernels(True)
    before = kernels.calls["masked_mla"]
    with torch.no_grad():
        actual = attn._expanded(*args)
    assert kernels.calls["masked_mla"] == before + 1
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(actual.float(), expected.float()) < tolerance
    if selection is not None:
        assert torch.all(actual[0, 3] == 0)
    if mode == "causal_padded":
        assert torch.all(actual[1, :5] == 0)


def test_long_contexts_gather_instead(use_kernels, monkeypatch):
    """Beyond MASKED_MLA_MAX_KEYS keys the expanded path takes the absorbed gathering kernel (same function)."""
    attn, q_nope, q_rope, latent, k_rope = _attention_case(torch.float32, 1, 12, 0, seed=5)
    monkeypatch.setattr(kernels, "MASKED_MLA_MAX_KEYS", 11)
    use_kernels(True)
    kernels.calls.clear()
    with torch.no_grad():
        gathered = attn._expanded(q_nope, q_rope, latent, k_rope, None, 0, None)
    assert kernels.calls["sparse_mla"] == 1 and kernels.calls["masked_mla"] == 0
    monkeypatch.setattr(kernels, "MASKED_MLA_MAX_KEYS", 12)
    with torch.no_grad():
        masked = attn._expanded(q_nope, q_rope, latent, k_rope, None, 0, None)
    assert kernels.calls["masked_mla"] == 1
    assert relative_error(masked, gathered) < 1e-5


def test_masked_kernel_checks_its_bitmap():
    from modeling_deepseek_v32.kernels.masked_mla_kernel import masked_mla_attention

    attn, q_nope, q_rope, latent, k_rope = _attention_case(torch.float32, 1, 4, 0, seed=6)
    k_nope, values = attn._expand_kv(latent, q_nope.shape[2])
    with pytest.raises(ValueError, match="mask_words must be int32"):
        masked_mla_attention(q_nope, q_rope, k_nope, k_rope, values, torch.zeros(1, 4, 3, dtype=torch.int32), 0.1)


@pytest.mark.parametrize("head_dim", [16, 128, 256])
def test_indexer_fp8_quantization_kernel_is_bit_identical(use_kernels, head_dim):
    """The indexer quantizes its rotated q/k with the FP8 GEMM's activation kernel (one block below 128 dims)."""
    indexer = DeepseekV32Indexer(tiny_config(index_fp8=True, index_n_heads=4, index_head_dim=head_dim), 0).to(DEVICE)
    x = _randn(2, 9, 4, head_dim, seed=11) * 5
    x[0, 0, 0] = 0  # an all-zero row: floored amax
    use_kernels(False)
    expected = indexer._quantize(x)
    use_kernels(True)
    before = kernels.calls["fp8_quantize"]
    actual = indexer._quantize(x)
    assert kernels.calls["fp8_quantize"] == before + 1
    assert actual[0].shape == expected[0].shape and actual[1].shape == expected[1].shape
    assert torch.equal(actual[0].view(torch.uint8), expected[0].view(torch.uint8))
    assert torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_twin(use_kernels, dtype):
    """One-pass RMSNorm on rows of a wider tensor (the model normalizes the latent part of kv_a_proj's output)."""
    from modeling_deepseek_v32.layers import DeepseekV32RMSNorm

    norm = DeepseekV32RMSNorm(40, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(_randn(40, seed=12))
    wide = _randn(2, 7, 48, seed=13, dtype=dtype) * 3
    x = wide[..., :40]  # row stride 48
    use_kernels(False)
    with torch.no_grad():
        expected = norm(x)
    use_kernels(True)
    before = kernels.calls["rms_norm"]
    with torch.no_grad():
        actual = norm(x)
    assert kernels.calls["rms_norm"] == before + 1
    assert actual.dtype == dtype and actual.shape == x.shape
    assert relative_error(actual.float(), expected.float()) < (1e-6 if dtype == torch.float32 else 1e-2)
    norm.weight.requires_grad_(True)
    assert kernels.rms_norm(x, norm.weight, 1e-6) is None  # training: the twin (it has a backward)
