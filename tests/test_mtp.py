"""MTP: self-speculative decoding through ``generate(use_mtp=True)`` and the MTP training loss."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from modeling_deepseek_v32 import mtp_generation
from modeling_deepseek_v32.testing_utils import random_model, relative_error, tiny_config


def _ids(shape, seed, low=1, vocab=512):
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=50)


def _left_padded_batch():
    input_ids = _ids((3, 9), seed=51)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    input_ids[1, :3] = 0
    return input_ids, mask


@pytest.mark.parametrize("num_drafts", [1, 3])
def test_greedy_mtp_equals_plain_greedy_for_a_padded_batch(model, num_drafts):
    input_ids, mask = _left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids, **kwargs)
    out = model.generate(input_ids, use_mtp=True, num_mtp_draft_tokens=num_drafts, return_dict_in_generate=True,
                         **kwargs)  # fmt: skip
    assert torch.equal(out.sequences, plain)
    assert len(out.mtp_acceptance) == num_drafts and out.tokens_per_forward >= 1.0


def _oracle_drafts(reference, lengths, num_draft, wrong_rows, wrong_after):
    """The reference continuation after each row's current length, except that rows in ``wrong_rows`` get a wrong
    token at draft position ``wrong_after``: ragged acceptance across the batch."""
    drafts = []
    for b, start in enumerate(lengths):
        tokens = reference[b, start : start + num_draft].tolist()
        tokens += [1] * (num_draft - len(tokens))
        if b in wrong_rows and wrong_after < num_draft:
            tokens[wrong_after] = (tokens[wrong_after] + 1) % 512
        drafts.append(tokens)
    return torch.tensor(drafts)


def _oracle_drafter(reference, prompt_len, wrong_rows, wrong_after):
    """A stand-in for the per-row path's MTP drafter ``_draft`` that proposes ``_oracle_drafts``."""

    def draft(model, sampler, rows, hidden, next_ids, positions, mtp_mask, mtp_cache, last_index, num_draft):
        lengths = [len(row) for row in rows]
        return _oracle_drafts(reference, lengths, num_draft, wrong_rows, wrong_after), None, mtp_mask

    return draft


def _oracle_greedy_drafter(reference, wrong_rows, wrong_after):
    """The same stand-in for the batched greedy path's ``_draft_greedy``."""

    def draft(model, rules, lengths, hidden, next_ids, positions, mtp_mask, mtp_cache, last_index, num_draft, valid):
        return _oracle_drafts(reference, lengths.tolist(), num_draft, wrong_rows, wrong_after).to(lengths.device)

    return draft


def _use_oracle(monkeypatch, path, reference, wrong_rows, wrong_after):
    if path == "per_row":
        # Disable the batched greedy path so that the general per-row path runs.
        monkeypatch.setattr(mtp_generation._GreedyRules, "build", classmethod(lambda cls, *args: None))
        monkeypatch.setattr(mtp_generation, "_draft", _oracle_drafter(reference, 9, wrong_rows, wrong_after))
    else:
        monkeypatch.setattr(mtp_generation, "_draft_greedy", _oracle_greedy_drafter(reference, wrong_rows, wrong_after))


@pytest.mark.parametrize("path", ["per_row", "batched"])
def test_ragged_acceptance_rolls_back_rejected_drafts(model, monkeypatch, path):
    input_ids, mask = _left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids, **kwargs)
    _use_oracle(monkeypatch, path, plain, wrong_rows={1, 2}, wrong_after=1)
    out = model.generate(input_ids, use_mtp=True, num_mtp_draft_tokens=3, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, plain)
    # Row 0 accepts all three drafts, rows 1 and 2 only the first (row 0 finishes first, so later positions are
    # accepted in at most a third of the proposals).
    assert out.mtp_acceptance[0] == pytest.approx(1.0)
    assert 0 < out.mtp_acceptance[1] <= 1 / 3 and out.mtp_acceptance[2] == out.mtp_acceptance[1]
    assert out.tokens_per_forward > 1.5


def _generate_both_paths(model, monkeypatch, input_ids, **kwargs):
    """``generate(use_mtp=True)`` through the batched greedy path and through the per-row path."""
    batched = model.generate(input_ids, use_mtp=True, return_dict_in_generate=True, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(mtp_generation._GreedyRules, "build", classmethod(lambda cls, *args: None))
        per_row = model.generate(input_ids, use_mtp=True, return_dict_in_generate=True, **kwargs)
    return batched, per_row


@pytest.mark.parametrize("drafter", ["mtp", "oracle"])
@pytest.mark.parametrize("num_drafts", [1, 2, 3])
def test_batched_greedy_path_matches_per_row_path_and_plain_greedy(model, monkeypatch, num_drafts, drafter):
    """Left padding, min_new_tokens banning an EOS the model wants early, and EOS ending rows at different steps;
    drafts from the (random, so mostly rejected) MTP head or from an oracle that is wrong for row 2 only (ragged
    acceptance): tokens, acceptance counts and forward counts agree with the per-row path, tokens with plain greedy."""
    input_ids, mask = _left_padded_batch()
    # 87 is row 1's fourth token without constraints (banned by min_new_tokens=6), 490 row 0's eighth (ends it).
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=6, do_sample=False, pad_token_id=0,
                  eos_token_id=[87, 490])  # fmt: skip
    reference = model.generate(input_ids, **kwargs)
    assert (reference[0, 9:] == 0).any() and not (reference[2, 9:] == 0).any()  # row 0 stops early, row 2 does not
    if drafter == "oracle":
        monkeypatch.setattr(mtp_generation, "_draft", _oracle_drafter(reference, 9, {2}, num_drafts - 1))
        monkeypatch.setattr(mtp_generation, "_draft_greedy", _oracle_greedy_drafter(reference, {2}, num_drafts - 1))
    batched, per_row = _generate_both_paths(model, monkeypatch, input_ids, num_mtp_draft_tokens=num_drafts, **kwargs)
    assert torch.equal(batched.sequences, reference) and torch.equal(per_row.sequences, reference)
    assert batched.mtp_counts == per_row.mtp_counts
    assert batched.mtp_acceptance == per_row.mtp_acceptance
    assert batched.tokens_per_forward == per_row.tokens_per_forward
    if drafter == "oracle":
        assert 0.0 < batched.mtp_acceptance[-1] < 1.0  # ragged: rows 0 and 1 accept, row 2 rejects


@pytest.mark.parametrize("min_new", [0, 6])
def test_batched_greedy_path_stops_at_eos_inside_accepted_drafts(model, monkeypatch, min_new):
    """The oracle drafter makes every draft right, so EOS arrives in the middle of a step's accepted tokens: the row
    ends there (and, under min_new_tokens, EOS is banned until then and must not be drafted into the output)."""
    input_ids, mask = _left_padded_batch()
    probe = model.generate(input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(probe[1, 9 + 3])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=min_new, do_sample=False, pad_token_id=0,
                  eos_token_id=eos)  # fmt: skip
    reference = model.generate(input_ids, **kwargs)
    _use_oracle(monkeypatch, "batched", reference, wrong_rows=set(), wrong_after=0)
    out = model.generate(input_ids, use_mtp=True, num_mtp_draft_tokens=3, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, reference)
    assert out.mtp_acceptance[0] == pytest.approx(1.0)


def test_unsupported_processor_falls_back_to_the_per_row_path(model):
    """A logits processor without a batched equivalent (repetition penalty reads the prefix's tokens) keeps greedy
    MTP exact through the per-row path."""
    input_ids, mask = _left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, repetition_penalty=1.3)
    assert torch.equal(model.generate(input_ids, use_mtp=True, **kwargs), model.generate(input_ids, **kwargs))


def test_mtp_respects_eos_and_streams(model):
    input_ids = _ids((1, 8), seed=52)
    plain = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(plain[0, 8 + 4])  # a token the model produces: generation must stop there

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    streamer = Collect()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    plain = model.generate(input_ids, **kwargs)
    ours = model.generate(input_ids, use_mtp=True, streamer=streamer, **kwargs)
    assert torch.equal(ours, plain) and int(ours[0, -1]) == eos
    assert torch.equal(torch.cat(streamer.chunks), ours[0]) and streamer.ended


def test_pipeline_style_generation_config_enables_mtp(model):
    input_ids = _ids((2, 6), seed=53)
    model.generation_config.use_mtp = True
    try:
        out = model.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    finally:
        model.generation_config.use_mtp = None
    assert out.mtp_acceptance is not None


def test_speculative_sampling_keeps_the_target_distribution():
    """Two sampled tokens after a one-token prompt, vocabulary 16: the empirical distribution of the second token
    under MTP speculative sampling matches the model's exact marginal, and differs from the drafter's."""
    config = tiny_config(vocab_size=16, eos_token_id=None)  # no EOS: every row samples both tokens
    model = random_model(config, seed=54)
    with torch.no_grad():
        # sharpen the MTP head so the drafter's distribution clearly differs from the target
        model.model.mtp_layers[0].shared_head.head.weight.mul_(6.0)
    prompt = torch.tensor([[3]])
    with torch.no_grad():
        first = model(prompt).logits[0, -1].softmax(-1)
        seconds = model(torch.cat((prompt.expand(16, 1), torch.arange(16)[:, None]), 1)).logits[:, -1].softmax(-1)
        target = (first[:, None] * seconds).sum(0)
        hidden = model.model(prompt.expand(16, 1)).last_hidden_state
        drafter, _ = model.model.mtp_forward(hidden, torch.arange(16)[:, None], torch.zeros(16, 1, dtype=torch.long))
        draft_marginal = (first[:, None] * drafter[:, 0].softmax(-1)).sum(0)
    samples = 3000
    torch.manual_seed(0)
    out = model.generate(prompt.expand(samples, 1), use_mtp=True, do_sample=True, max_new_tokens=2, top_k=0,
                         pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    empirical = torch.bincount(out.sequences[:, 2], minlength=16).float() / samples
    assert 0.0 < out.mtp_acceptance[0] < 1.0  # both the accept and the resample branch ran
    total_variation = 0.5 * (empirical - target).abs().sum()
    assert total_variation < 0.05, total_variation
    assert 0.5 * (draft_marginal - target).abs().sum() > 0.15


# -- training -----------------------------------------------------------------------------------------------------
def test_mtp_loss_is_cross_entropy_two_tokens_ahead():
    model = random_model(tiny_config(mtp_loss_weight=0.3), seed=55)
    input_ids = _ids((2, 12), seed=56)
    labels = input_ids.clone()
    labels[1, :2] = -100
    out = model(input_ids, labels=labels)
    hidden = model.model(input_ids).last_hidden_state
    mtp_logits, _ = model.model.mtp_forward(hidden[:, :-1], input_ids[:, 1:], torch.arange(11).expand(2, -1))
    expected_mtp = torch.nn.functional.cross_entropy(
        mtp_logits[:, :-1].reshape(-1, 512), labels[:, 2:].reshape(-1), ignore_index=-100
    )
    main = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1))
    assert relative_error(out.mtp_loss, expected_mtp) < 1e-5
    assert relative_error(out.loss, main + 0.3 * expected_mtp) < 1e-5
    out.loss.backward()
    assert model.model.mtp_layers[0].eh_proj.weight.grad is not None


def test_mtp_loss_is_off_by_default(tiny_model):
    input_ids = _ids((1, 10), seed=57)
    out = tiny_model(input_ids, labels=input_ids)
    assert out.mtp_loss is None
    out.loss.backward()
    assert tiny_model.model.mtp_layers[0].eh_proj.weight.grad is None


def test_use_mtp_without_mtp_layer_is_a_clear_error():
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=58)
    with pytest.raises(ValueError, match="MTP layer"):
        model.generate(_ids((1, 5), seed=59), use_mtp=True, max_new_tokens=3, pad_token_id=0)


def test_mtp_with_block_fp8_weights(tmp_path):
    """An FP8 checkpoint's MTP layer loads with its scales (FP8Linear) and drafting leaves greedy output unchanged."""
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    random_model(tiny_config(hidden_size=160, quantization_config=quantization), seed=60).save_pretrained(tmp_path)
    from modeling_deepseek_v32 import DeepseekV32ForCausalLM
    from modeling_deepseek_v32.fp8 import FP8Linear

    model = DeepseekV32ForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model.model.mtp_layers[0].self_attn.q_b_proj, FP8Linear)
    input_ids = _ids((2, 7), seed=61)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids, use_mtp=True, **kwargs), model.generate(input_ids, **kwargs))
