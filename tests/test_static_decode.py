"""Static-shape decode (``cache_implementation="static"``) against the dynamic cache, on CPU (fp32, tiny model).

On CPU the static step runs eagerly: the same function the CUDA graph captures (tests/test_static_decode_gpu.py
checks replay against it). The dynamic path is the oracle.
"""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_v32 import DeepseekV32Cache
from modeling_deepseek_v32 import static_decode
from modeling_deepseek_v32.static_decode import DeepseekV32StaticCache
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config

TOLERANCE = 1e-5


def _ids(shape, seed, vocab=512):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, mask, static: bool, **kwargs):
    extra = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=kwargs.pop("max_new_tokens", 12),
                              output_logits=True, return_dict_in_generate=True, **extra, **kwargs)  # fmt: skip


def _assert_same(static_out, dynamic_out, tolerance=TOLERANCE):
    assert torch.equal(static_out.sequences, dynamic_out.sequences)
    errors = [relative_error(s, d) for s, d in zip(static_out.logits, dynamic_out.logits)]
    assert max(errors) < tolerance


# index_topk 8: the indexer selects among more keys than it keeps; 512: no selection (dense over valid keys).
@pytest.mark.parametrize("index_fp8,index_topk", [(True, 8), (False, 8), (True, 512)])
def test_static_greedy_equals_dynamic_with_left_padding(index_fp8, index_topk):
    model = random_model(tiny_config(index_fp8=index_fp8, index_topk=index_topk), seed=3)
    ids = _ids((2, 13), seed=1)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    dynamic = _generate(model, ids, mask, static=False, do_sample=False, max_new_tokens=20)
    static = _generate(model, ids, mask, static=True, do_sample=False, max_new_tokens=20)
    assert isinstance(static.past_key_values, DeepseekV32StaticCache)
    _assert_same(static, dynamic)


def test_static_sampling_batch1_equals_dynamic():
    model = random_model(tiny_config(), seed=4)
    ids = _ids((1, 9), seed=2)
    outs = []
    for static in (False, True):
        torch.manual_seed(123)
        outs.append(_generate(model, ids, None, static=static, do_sample=True, top_k=20, temperature=1.3))
    _assert_same(outs[1], outs[0])


def test_static_step_runs_for_every_new_token(monkeypatch):
    model = random_model(tiny_config(), seed=5)
    steps = []
    original = static_decode.StaticDecoder._body
    monkeypatch.setattr(static_decode.StaticDecoder, "_body", lambda self, m: steps.append(1) or original(self, m))
    _generate(model, _ids((2, 7), seed=3), None, static=True, do_sample=False, max_new_tokens=10)
    assert len(steps) == 9  # the prefill gives the first token


def test_static_step_must_mask_unwritten_slots(monkeypatch):
    """The parity above can fail: a step that lets the query see unwritten slots changes the logits."""
    model = random_model(tiny_config(), seed=6)
    ids = _ids((1, 10), seed=4)
    dynamic = _generate(model, ids, None, static=False, do_sample=False)
    original = static_decode.StaticDecoder._body
    monkeypatch.setattr(static_decode.StaticDecoder, "_body", lambda self, m: (self.key_valid.fill_(True), original(self, m))[1])
    static = _generate(model, ids, None, static=True, do_sample=False)
    assert max(relative_error(s, d) for s, d in zip(static.logits, dynamic.logits)) > 1e-3


def test_manual_loop_from_filled_cache_and_chunked_continuation():
    """Direct use: a static cache built from a prefilled dynamic cache, one-token steps and a multi-token chunk."""
    model = random_model(tiny_config(), seed=7)
    ids = _ids((2, 30), seed=5)
    with torch.no_grad():
        full = model(ids).logits
        prefill = model(ids[:, :11], use_cache=True)
        cache = DeepseekV32StaticCache.from_cache(model, prefill.past_key_values, max_cache_len=40)
        logits = [prefill.logits]
        for step in range(11, 20):
            out = model(ids[:, step : step + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        out = model(ids[:, 20:25], past_key_values=cache, use_cache=True)  # a chunk: dynamic path, stored back
        logits.append(out.logits)
        for step in range(25, 30):
            out = model(ids[:, step : step + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    assert cache.get_seq_length() == 30
    assert relative_error(torch.cat(logits, dim=1), full) < TOLERANCE
    # The buffers hold what a dynamic cache holds.
    dynamic = DeepseekV32Cache(model.config, num_layers=len(model.model.layers))
    with torch.no_grad():
        model(ids, past_key_values=dynamic, use_cache=True)
    for name, tensor in cache.layer_views(1).tensors():
        expected = getattr(dynamic.layers[1], name)
        assert relative_error(tensor.float(), expected.float()) < TOLERANCE, name


def test_decoder_is_reused_across_generate_calls_and_rebuilt_for_new_weights():
    model = random_model(tiny_config(), seed=8)
    ids = _ids((1, 6), seed=6)
    first = _generate(model, ids, None, static=True, do_sample=False)
    decoder = first.past_key_values.decoder
    second = _generate(model, ids, None, static=True, do_sample=False)
    assert second.past_key_values.decoder is decoder
    _assert_same(second, first, tolerance=0.0 + 1e-12)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # a new address
    model.model.embed_tokens.weight = torch.nn.Parameter(model.model.embed_tokens.weight.clone())
    third = _generate(model, ids, None, static=True, do_sample=False)
    assert third.past_key_values.decoder is not decoder
    static_decode.release_static_decoders(model)
    assert "_static_decoders" not in model.model.__dict__


def test_unsupported_uses_fail_clearly():
    model = random_model(tiny_config(), seed=9)
    ids = _ids((1, 5), seed=7)
    with pytest.raises(ValueError, match="greedy search and sampling"):
        _generate(model, ids, None, static=True, num_beams=2, do_sample=False)
    cache = DeepseekV32StaticCache(model, batch_size=1, max_cache_len=8)
    assert cache.max_cache_len == 256  # rounded up so nearby lengths share buffers and graphs
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match="greedy search and sampling"):
            cache.reorder_cache(torch.tensor([0]))
        with pytest.raises(ValueError, match="static cache holds 256"):
            model(_ids((1, 260), seed=8), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="batch 1"):
            model(_ids((2, 1), seed=8), past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="written by DeepseekV32Model.forward"):
        cache.update_mla(None, None, 0)


def test_crop_rewinds_the_static_cache():
    model = random_model(tiny_config(), seed=10)
    ids = _ids((1, 16), seed=9)
    with torch.no_grad():
        reference = model(ids, use_cache=True).logits[:, -1]
        cache = DeepseekV32StaticCache(model, batch_size=1, max_cache_len=32)
        model(ids[:, :12], past_key_values=cache, use_cache=True)
        for step in range(12, 16):
            model(_ids((1, 1), seed=step), past_key_values=cache, use_cache=True)  # tokens to discard
        cache.crop(12)
        for step in range(12, 16):
            out = model(ids[:, step : step + 1], past_key_values=cache, use_cache=True)
    assert relative_error(out.logits[:, -1], reference) < TOLERANCE


def test_mtp_generation_ignores_static_cache_with_a_warning():
    model = random_model(tiny_config(), seed=11)
    ids = _ids((1, 6), seed=10)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
        got = model.generate(ids, max_new_tokens=6, do_sample=False, use_mtp=True, cache_implementation="static")
    assert torch.equal(got, expected)
