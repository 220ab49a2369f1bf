"""The decode cache's in-place appends (spare room per layer, the kernels read strided views) against torch.cat."""

from __future__ import annotations

import copy

import torch

from modeling_deepseek_v32.cache import DeepseekV32Cache


def _step(cache, expected, count, seed):
    g = torch.Generator().manual_seed(seed)
    latent, rope = torch.randn(2, count, 8, generator=g), torch.randn(2, count, 4, generator=g)
    keys, scales = torch.randn(2, count, 16, generator=g), torch.rand(2, count, 1, generator=g)
    got = cache.update_mla(latent, rope, 0) + cache.update_index_keys(keys, scales, 0)
    for name, new in zip(("latent", "k_rope", "index_k", "index_k_scale"), (latent, rope, keys, scales)):
        expected[name] = new if name not in expected else torch.cat((expected[name], new), 1)
    for value, name in zip(got, ("latent", "k_rope", "index_k", "index_k_scale")):
        assert torch.equal(value, expected[name]), name


def test_appends_crop_reorder_and_copies_match_cat():
    cache, expected = DeepseekV32Cache(num_layers=1), {}
    _step(cache, expected, 5, seed=0)  # prefill: stored as given
    for step in range(300):  # decode: grows the buffer past its first spare room
        _step(cache, expected, 1, seed=step + 1)
    assert cache.get_seq_length() == 305
    buffer = cache.layers[0].extras["latent"]
    assert buffer.shape[1] > 305 and buffer.data_ptr() == cache.layers[0].latent.data_ptr()

    cache.crop(-3)  # assisted decoding: drop rejected tokens, then overwrite them in place
    expected = {name: value[:, :-3] for name, value in expected.items()}
    _step(cache, expected, 2, seed=900)
    assert cache.layers[0].extras["latent"].data_ptr() == buffer.data_ptr()

    twin = copy.deepcopy(cache)  # a copy appends into its own buffer
    twin_expected = dict(expected)
    _step(twin, twin_expected, 1, seed=901)
    _step(cache, expected, 1, seed=902)
    assert not torch.equal(twin.layers[0].latent[:, -1], cache.layers[0].latent[:, -1])

    beams = torch.tensor([1, 0])
    cache.reorder_cache(beams)  # beam search: new tensors, the old buffer is released
    expected = {name: value[beams] for name, value in expected.items()}
    assert "latent" not in cache.layers[0].extras
    _step(cache, expected, 1, seed=903)
