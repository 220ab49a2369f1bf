"""Parity with transformers' own DeepSeek models on identical weights (fp32, full-precision indexer).

Our checkpoint is loaded into the native classes through their own ``from_pretrained``, which also checks that what
we save loads in transformers' native model.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v3 import DeepseekV3Config as NativeV3Config
from transformers.models.deepseek_v3 import DeepseekV3ForCausalLM as NativeV3
from transformers.models.deepseek_v32 import DeepseekV32ForCausalLM as NativeV32

from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config

TOLERANCE = 1e-5


def _load_native(cls, directory, **kwargs):
    native = cls.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    return native


@pytest.fixture(scope="module")
def sparse_pair(tmp_path_factory):
    """index_topk (8) well below the sequence length, so the indexer really selects."""
    # Many indexer heads: a score ties at exactly 0 only if every head's ReLU is 0, and tied tokens may be
    # picked in any order (the native model breaks ties differently from our stable order).
    model = random_model(tiny_config(index_fp8=False, index_n_heads=16), seed=3)
    directory = tmp_path_factory.mktemp("sparse")
    model.save_pretrained(directory)
    return model, _load_native(NativeV32, directory)


def test_prefill_logits_match_native_v32(sparse_pair):
    model, native = sparse_pair
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids).logits, native(input_ids).logits
    assert relative_error(ours, theirs) < TOLERANCE


def test_every_decode_step_matches_native_v32(sparse_pair):
    model, native = sparse_pair
    input_ids = torch.randint(0, model.config.vocab_size, (2, 22), generator=torch.Generator().manual_seed(1))
    prompt = 10
    with torch.no_grad():
        ours = model(input_ids[:, :prompt], use_cache=True)
        theirs = native(input_ids[:, :prompt], use_cache=True)
        assert relative_error(ours.logits, theirs.logits) < TOLERANCE
        ours_cache, theirs_cache = ours.past_key_values, theirs.past_key_values
        for step in range(prompt, input_ids.shape[1]):
            token = input_ids[:, step : step + 1]
            ours = model(token, past_key_values=ours_cache, use_cache=True)
            theirs = native(token, past_key_values=theirs_cache, use_cache=True)
            assert relative_error(ours.logits, theirs.logits) < TOLERANCE, f"decode step {step}"


def test_greedy_generation_matches_native_v32(sparse_pair):
    model, native = sparse_pair
    input_ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids, **kwargs), native.generate(input_ids, **kwargs))


def test_dense_limit_matches_native_v3(tmp_path):
    """With index_topk >= sequence length DSA selects everything: the model is DeepSeek-V3."""
    config = tiny_config(index_fp8=False, index_topk=64)
    model = random_model(config, seed=4)
    model.save_pretrained(tmp_path)
    native_config = NativeV3Config.from_pretrained(tmp_path)
    native = NativeV3.from_pretrained(tmp_path, config=native_config, dtype=torch.float32).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(model(input_ids).logits, native(input_ids).logits) < TOLERANCE


def test_left_padded_batch_matches_native_v32(sparse_pair):
    model, native = sparse_pair
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(1, model.config.vocab_size, (2, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = native(input_ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    assert relative_error(ours[valid], theirs[valid]) < TOLERANCE
