"""Static cache on a CUDA GPU: the captured graph's replay against the same step run eagerly and against the
dynamic cache (tiny fp32 model through ``generate``; bench-shaped bf16 layers, teacher-forced, sparse selection).

Skipped without CUDA; run through the `device` tool. tests/test_static_decode.py checks the eager step on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from modeling_deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM  # noqa: E402
from modeling_deepseek_v32.static_decode import DeepseekV32StaticCache, release_static_decoders  # noqa: E402
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _raise_kernel_errors(kernel_switch):
    return kernel_switch


def _generate(model, ids, mask, static):
    extra = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **extra)  # fmt: skip


def test_graph_replay_equals_eager_and_dynamic_tiny_fp32(monkeypatch):
    model = random_model(tiny_config(), seed=3).cuda()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    dynamic = _generate(model, ids, mask, static=False)
    monkeypatch.setenv("DEEPSEEK_V32_CUDA_GRAPHS", "0")
    eager = _generate(model, ids, mask, static=True)
    assert eager.past_key_values.decoder.graph is None
    release_static_decoders(model)
    monkeypatch.delenv("DEEPSEEK_V32_CUDA_GRAPHS")
    graphed = _generate(model, ids, mask, static=True)
    assert graphed.past_key_values.decoder.graph is not None  # 12 tokens: 2 eager warm-up steps, then replays
    again = _generate(model, ids, mask, static=True)  # the captured graph is reused by the next call
    assert again.past_key_values.decoder is graphed.past_key_values.decoder
    for other in (eager, graphed, again):
        assert torch.equal(other.sequences, dynamic.sequences)
    assert max(relative_error(g, e) for g, e in zip(graphed.logits, eager.logits)) < 1e-6
    assert max(relative_error(g, e) for g, e in zip(again.logits, eager.logits)) < 1e-6
    assert max(relative_error(g, d) for g, d in zip(graphed.logits, dynamic.logits)) < 1e-4


def test_graph_steps_equal_dynamic_steps_bench_layers_bf16():
    config = DeepseekV32Config.from_preset("bench", num_hidden_layers=2, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = DeepseekV32ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    seq, steps = 2500, 8  # more keys than index_topk (2048): the indexer selects
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, seq), device="cuda", generator=gen)
    tokens = torch.randint(0, config.vocab_size, (2, steps), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        dynamic = out.past_key_values
        static = DeepseekV32StaticCache.from_cache(model, copy.deepcopy(dynamic), seq + steps, attention_mask=mask)
        errors = []
        for t in range(steps):
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            d = model(tokens[:, t : t + 1], attention_mask=mask, past_key_values=dynamic, use_cache=True).logits
            s = model(tokens[:, t : t + 1], attention_mask=mask, past_key_values=static, use_cache=True).logits
            errors.append(relative_error(s.float(), d.float()))
    assert static.decoder.graph is not None
    assert max(errors) < 2e-2, errors
