"""Incremental decoding, both attention forms, left padding, the cache and the generation API (fp32, tiny model)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from modeling_deepseek_v32 import DeepseekV32Cache
from modeling_deepseek_v32 import attention as attention_module
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config

TOLERANCE = 1e-5


def _ids(shape, seed, low=0, vocab=512):
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("index_fp8", [True, False])
def test_incremental_decoding_equals_full_forward(index_fp8):
    model = random_model(tiny_config(index_fp8=index_fp8), seed=5)
    input_ids = _ids((2, 26), seed=5)
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :7], use_cache=True)
        steps = [out.logits]
        for step in range(7, 26):
            out = model(input_ids[:, step : step + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert relative_error(torch.cat(steps, dim=1), full) < TOLERANCE


def test_chunked_prefill_equals_full_forward(tiny_model):
    input_ids = _ids((1, 30), seed=6)
    with torch.no_grad():
        full = tiny_model(input_ids).logits
        first = tiny_model(input_ids[:, :11], use_cache=True)
        second = tiny_model(input_ids[:, 11:], past_key_values=first.past_key_values, use_cache=True)
    assert relative_error(torch.cat((first.logits, second.logits), 1), full) < TOLERANCE


@pytest.mark.parametrize("seq_len", [6, 20])  # dense (T <= index_topk) and sparse
def test_absorbed_form_equals_expanded_form(tiny_model, seq_len):
    attention = tiny_model.model.layers[1].self_attn
    hidden = torch.randn(2, seq_len, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    cos, sin = tiny_model.model.rotary_emb(torch.arange(seq_len).expand(2, -1))
    with torch.no_grad():
        expanded = attention(hidden, cos, sin, absorb=False)
        absorbed = attention(hidden, cos, sin, absorb=True)
    assert relative_error(absorbed, expanded) < TOLERANCE


def test_decode_takes_absorbed_path_and_prefill_the_expanded_one(tiny_model, monkeypatch):
    calls = []
    attention = tiny_model.model.layers[0].self_attn
    for name in ("_absorbed", "_expanded"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _n=name, _o=original: calls.append(_n) or _o(*a))
    with torch.no_grad():
        out = tiny_model(_ids((1, 12), seed=8), use_cache=True)
        tiny_model(_ids((1, 1), seed=9), past_key_values=out.past_key_values, use_cache=True)
    assert calls == ["_expanded", "_absorbed"]


def test_long_prefill_attends_in_query_chunks(tiny_model, monkeypatch):
    """Shrinking the memory budget forces many chunks; the result must not change."""
    input_ids = _ids((1, 40), seed=10)
    with torch.no_grad():
        reference = tiny_model(input_ids).logits
        monkeypatch.setattr(attention_module, "_ATTENTION_BUDGET_ELEMENTS", 1)
        chunked = tiny_model(input_ids).logits
    assert relative_error(chunked, reference) < TOLERANCE


def test_left_padding_equals_unpadded(tiny_model):
    prompt = _ids((1, 14), seed=11, low=1)
    pad = 5
    padded = torch.cat((torch.zeros(1, pad, dtype=torch.long), prompt), dim=1)
    other = _ids((1, 14 + pad), seed=12, low=1)
    batch = torch.cat((padded, other))
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad():
        alone = tiny_model(prompt).logits[0]
        batched = tiny_model(batch, attention_mask=mask).logits[0, pad:]
        assert relative_error(batched, alone) < TOLERANCE
        kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        alone_tokens = tiny_model.generate(prompt, **kwargs)[0, 14:]
        batched_tokens = tiny_model.generate(batch, attention_mask=mask, **kwargs)[0, 14 + pad :]
    assert torch.equal(alone_tokens, batched_tokens)


def test_generate_builds_our_cache_and_matches_no_cache(tiny_model):
    input_ids = _ids((2, 9), seed=13)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = tiny_model.generate(input_ids, return_dict_in_generate=True, **kwargs)
    assert isinstance(out.past_key_values, DeepseekV32Cache)
    assert out.past_key_values.get_seq_length() == 9 + 8 - 1
    assert torch.equal(out.sequences, tiny_model.generate(input_ids, use_cache=False, **kwargs))


def test_beam_search_reorders_the_cache(tiny_model):
    input_ids = _ids((2, 8), seed=14)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, num_return_sequences=2)
    with_cache = tiny_model.generate(input_ids, **kwargs)
    without_cache = tiny_model.generate(input_ids, use_cache=False, **kwargs)
    assert with_cache.shape == (4, 14)
    assert torch.equal(with_cache, without_cache)


def test_sampling_is_seeded_and_expands_the_batch(tiny_model):
    input_ids = _ids((2, 8), seed=15)
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0, num_return_sequences=3)
    torch.manual_seed(0)
    first = tiny_model.generate(input_ids, **kwargs)
    torch.manual_seed(0)
    second = tiny_model.generate(input_ids, **kwargs)
    assert first.shape == (6, 14) and torch.equal(first, second)


def test_cache_crop_select_and_repeat(tiny_model):
    input_ids = _ids((2, 16), seed=16)
    with torch.no_grad():
        cache = tiny_model(input_ids[:, :12], use_cache=True).past_key_values
        cache.crop(-3)
        assert cache.get_seq_length() == 9
        resumed = tiny_model(input_ids[:, 9:], past_key_values=cache, use_cache=True).logits
        full = tiny_model(input_ids).logits[:, 9:]
        assert relative_error(resumed, full) < TOLERANCE

        cache = tiny_model(input_ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)
        assert cache.layers[0].latent.shape[0] == 4
        cache.batch_select_indices(torch.tensor([2]))
        next_token = _ids((1, 1), seed=17)
        selected = tiny_model(next_token, past_key_values=cache, use_cache=True).logits
        fresh = tiny_model(torch.cat((input_ids[1:], next_token), 1)).logits[:, -1:]
    assert relative_error(selected, fresh) < TOLERANCE


def test_cache_holds_latent_rope_and_fp8_indexer_keys(tiny_model):
    config = tiny_model.config
    with torch.no_grad():
        cache = tiny_model(_ids((1, 10), seed=18), use_cache=True).past_key_values
    layer = cache.layers[0]
    assert layer.latent.shape == (1, 10, config.kv_lora_rank)
    assert layer.k_rope.shape == (1, 10, config.qk_rope_head_dim)
    assert layer.index_k.dtype == torch.float8_e4m3fn and layer.index_k.shape == (1, 10, config.index_head_dim)
    assert layer.index_k_scale.dtype == torch.float32 and layer.index_k_scale.shape == (1, 10, 1)
    per_layer = (config.kv_lora_rank + config.qk_rope_head_dim) * 4 + config.index_head_dim + 4
    assert cache.nbytes_per_token() == per_layer * config.num_hidden_layers


def test_foreign_cache_and_bad_masks_are_refused(tiny_model):
    input_ids = _ids((1, 6), seed=19)
    with pytest.raises(TypeError, match="DeepseekV32Cache"):
        tiny_model(input_ids, past_key_values=DynamicCache(), use_cache=True)
    with pytest.raises(ValueError, match="2-D padding mask"):
        tiny_model(input_ids, attention_mask=torch.ones(1, 1, 6, 6))
    with pytest.raises(ValueError, match="expected"):
        tiny_model(input_ids, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="cache_implementation"):
        # "static" is supported (tests/test_static_decode.py); transformers' other cache classes are not.
        tiny_model.generate(input_ids, max_new_tokens=2, cache_implementation="offloaded", pad_token_id=0)


def test_input_longer_than_max_position_embeddings_is_refused():
    model = random_model(tiny_config(max_position_embeddings=16), seed=20)
    with torch.no_grad():
        model(_ids((1, 16), seed=21))
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model(_ids((1, 17), seed=21))
        cache = model(_ids((1, 15), seed=22), use_cache=True).past_key_values
        model(_ids((1, 1), seed=23), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model(_ids((1, 1), seed=23), past_key_values=cache, use_cache=True)


def test_labels_give_shifted_cross_entropy_and_logits_to_keep(tiny_model):
    input_ids = _ids((2, 12), seed=24)
    labels = input_ids.clone()
    labels[0, :3] = -100
    out = tiny_model(input_ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, expected, rtol=1e-6)
    out.loss.backward()
    assert tiny_model.model.layers[1].mlp.experts[0].gate_proj.weight.grad is not None or any(
        expert.gate_proj.weight.grad is not None for expert in tiny_model.model.layers[1].mlp.experts
    )
    assert tiny_model.model.layers[0].self_attn.kv_b_proj.weight.grad is not None
    last = tiny_model(input_ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, tiny_model.config.vocab_size)
    assert relative_error(last[:, 0], out.logits[:, -1].detach()) < TOLERANCE


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model(tiny_config(), seed=25).train()
    input_ids = _ids((2, 14), seed=25)

    def grads():
        model.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
        return model.model.layers[0].self_attn.q_a_proj.weight.grad.clone()

    plain = grads()
    model.gradient_checkpointing_enable()
    assert relative_error(grads(), plain) < 1e-5
