"""Self-speculative decoding with the MTP module: ``model.generate(..., use_mtp=True)``.

Each step the main model verifies ``[last accepted token, draft_1 .. draft_k]`` in one forward; the MTP module then
drafts the next tokens from the main model's final hidden states. Works for batches: sequences accept different
numbers of drafts, and instead of cropping a shared cache the rejected positions become holes in the padding mask.
Masked tokens are invisible to MLA and to the indexer, and positions count only real tokens, so a hole is exactly as
if the token had never been fed.

Greedy output equals plain greedy decoding; sampling uses speculative sampling (accept a draft with probability
``min(1, p/q)``, else resample from ``max(0, p - q)``), which leaves the target distribution unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation import (
    EosTokenCriteria,
    GenerationConfig,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    StoppingCriteriaList,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .cache import DeepseekV32Cache

logger = logging.get_logger(__name__)


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """``generate`` output with MTP statistics: ``mtp_acceptance`` (accepted / proposed per draft position) and
    ``tokens_per_forward`` (new tokens per main-model forward, the speed-up bound)."""

    mtp_acceptance: list[float] | None = None
    tokens_per_forward: float | None = None
    mtp_counts: dict | None = None


class _Sampler:
    """Turns raw logits of one row and one position into a token (and, when sampling, the distribution)."""

    def __init__(self, processors: LogitsProcessorList, do_sample: bool):
        self.processors = processors
        self.do_sample = do_sample

    def distribution(self, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = self.processors(prefix[None], logits[None].float())[0]
        if not self.do_sample:
            return scores
        return scores.softmax(dim=-1)

    def pick(self, dist: torch.Tensor) -> int:
        return int(torch.multinomial(dist, 1)) if self.do_sample else int(dist.argmax())


@torch.no_grad()
def mtp_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    generation_config: GenerationConfig,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    num_draft_tokens: int = 1,
    streamer=None,
):
    """The decoding loop. ``generation_config`` must already carry ``max_length`` and special-token tensors."""
    if not len(model.model.mtp_layers):
        raise ValueError("use_mtp=True needs an MTP layer (config.num_nextn_predict_layers >= 1)")
    if num_draft_tokens < 1:
        raise ValueError(f"num_mtp_draft_tokens must be >= 1, got {num_draft_tokens}")
    if generation_config.num_beams not in (None, 1):
        raise ValueError("use_mtp=True supports greedy decoding and sampling, not beam search")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("streaming supports batch size 1")
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    pad = int(generation_config._pad_token_tensor) if generation_config._pad_token_tensor is not None else 0
    max_new = generation_config.max_length - prompt_len
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    rules = None if generation_config.do_sample else _GreedyRules.build(logits_processor, stopping_criteria)
    if rules is not None:
        return _greedy_generate(model, input_ids, mask, rules, pad, max_new, num_draft_tokens, streamer)
    sampler = _Sampler(logits_processor, bool(generation_config.do_sample))
    num_layers = len(model.model.layers)
    cache = DeepseekV32Cache(model.config, num_layers=num_layers)
    mtp_cache = DeepseekV32Cache(model.config, num_layers=num_layers)
    rows = [input_ids[b] for b in range(batch)]  # prompt (with its padding) + accepted tokens
    done = [False] * batch
    proposed = [0] * num_draft_tokens
    accepted = [0] * num_draft_tokens
    if streamer is not None:
        streamer.put(input_ids.cpu())

    out = model.model(input_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    forwards = 1
    logits = model.lm_head(out.last_hidden_state[:, -1])
    first = torch.tensor([sampler.pick(sampler.distribution(rows[b], logits[b])) for b in range(batch)], device=device)
    _accept(rows, done, first[:, None].tolist(), stopping_criteria, max_new, prompt_len, streamer)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    mtp_mask = mask * torch.cat((mask[:, 1:], torch.ones_like(mask[:, :1])), dim=1)
    next_ids = torch.cat((input_ids[:, 1:], first[:, None]), dim=1)
    drafts, draft_dists, mtp_mask = _draft(
        model, sampler, rows, out.last_hidden_state, next_ids, positions, mtp_mask, mtp_cache,
        torch.full((batch,), prompt_len - 1, device=device), num_draft_tokens,
    )  # fmt: skip
    last = first

    while not all(done):
        verify = torch.cat((last[:, None], drafts), dim=1)
        mask = torch.cat((mask, torch.ones_like(verify)), dim=1)
        positions = (mask.cumsum(-1) - 1)[:, -verify.shape[1] :]
        out = model.model(verify, attention_mask=mask, past_key_values=cache, use_cache=True)
        forwards += 1
        logits = model.lm_head(out.last_hidden_state)
        new_tokens, num_accepted = [], []
        for b in range(batch):
            tokens = _verify_row(sampler, rows[b], verify[b], logits[b], None if draft_dists is None else draft_dists[b])
            new_tokens.append(tokens)
            num_accepted.append(len(tokens) - 1)
            if not done[b]:
                for i in range(num_draft_tokens):
                    proposed[i] += 1
                    accepted[i] += int(i < len(tokens) - 1)
        accepted_len = torch.tensor(num_accepted, device=device)
        steps = torch.arange(verify.shape[1], device=device)
        # Rejected drafts become holes: masked for every later query, skipped by the positions.
        mask[:, -verify.shape[1] :] = (steps[None, :] <= accepted_len[:, None]).long()
        _accept(rows, done, new_tokens, stopping_criteria, max_new, prompt_len, streamer)
        if all(done):
            break
        next_ids = torch.full_like(verify, pad)
        for b, tokens in enumerate(new_tokens):
            next_ids[b, : len(tokens)] = torch.tensor(tokens, device=device)
        last = next_ids.gather(1, accepted_len[:, None])[:, 0]
        step_mask = mask[:, -verify.shape[1] :]
        drafts, draft_dists, mtp_mask = _draft(
            model, sampler, rows, out.last_hidden_state, next_ids, positions, torch.cat((mtp_mask, step_mask), 1),
            mtp_cache, accepted_len, num_draft_tokens,
        )  # fmt: skip

    if streamer is not None:
        streamer.end()
    new_len = max(len(row) for row in rows) - prompt_len
    sequences = torch.full((batch, prompt_len + new_len), pad, dtype=input_ids.dtype, device=device)
    for b, row in enumerate(rows):
        sequences[b, : len(row)] = row
    generated = sum(len(row) - prompt_len for row in rows)
    return _finish(sequences, cache, proposed, accepted, generated, forwards, batch)


def _draft(model, sampler, rows, hidden, next_ids, positions, mtp_mask, mtp_cache, last_index, num_draft_tokens):
    """Feed the new (h_t, token_{t+1}) pairs to the MTP cache, then draft ``num_draft_tokens`` tokens per row from
    the pair at ``last_index`` (recursively, feeding the MTP's own hidden state back in)."""
    batch = hidden.shape[0]
    rows_range = torch.arange(batch, device=hidden.device)
    logits, mtp_hidden = _mtp_step(model, hidden, next_ids, positions, mtp_mask, mtp_cache)
    logits, mtp_hidden = logits[rows_range, last_index], mtp_hidden[rows_range, last_index]
    position = positions[rows_range, last_index] + 1
    drafts, dists = [], []
    extended = mtp_mask
    for depth in range(num_draft_tokens):
        step_dists = [
            sampler.distribution(torch.cat([rows[b]] + [d[b : b + 1] for d in drafts]), logits[b]) for b in range(batch)
        ]
        tokens = torch.tensor([sampler.pick(d) for d in step_dists], device=hidden.device)
        drafts.append(tokens)
        dists.append(torch.stack(step_dists))
        if depth + 1 < num_draft_tokens:
            # Recursive drafting reuses the MTP module on its own output; these cache entries are temporary.
            extended = torch.cat((extended, torch.ones_like(extended[:, :1])), dim=1)
            logits, mtp_hidden = _mtp_step(model, mtp_hidden[:, None], tokens[:, None], position[:, None], extended,
                                           mtp_cache)  # fmt: skip
            logits, mtp_hidden = logits[:, 0], mtp_hidden[:, 0]
            position = position + 1
    if num_draft_tokens > 1:
        mtp_cache.crop(-(num_draft_tokens - 1))
    draft_dists = torch.stack(dists, dim=1) if sampler.do_sample else None
    return torch.stack(drafts, dim=1), draft_dists, mtp_mask


def _mtp_step(model, hidden, next_ids, positions, mtp_mask, mtp_cache, all_valid: bool | None = None):
    # ``all_valid`` lets a caller that already knows the answer on the host skip the device sync of ``.all()``.
    if all_valid is None:
        all_valid = bool(mtp_mask.all())
    key_valid = None if all_valid else mtp_mask.bool()
    cos, sin = model.model.rotary_emb(positions)
    return model.model.mtp_layers[0](hidden, next_ids, cos, sin, key_valid, mtp_cache)


def _verify_row(sampler, prefix, verify, logits, draft_dists) -> list[int]:
    """Tokens a row keeps from one verification: the accepted drafts and one token from the main model."""
    drafts = verify[1:].tolist()
    tokens: list[int] = []
    for i in range(len(verify)):
        target = sampler.distribution(torch.cat((prefix, verify.new_tensor(tokens))), logits[i])
        if i == len(drafts):
            tokens.append(sampler.pick(target))
            break
        draft = drafts[i]
        if not sampler.do_sample:
            choice = int(target.argmax())
            tokens.append(choice)
            if choice != draft:
                break
            continue
        proposal = draft_dists[i]
        if torch.rand(()) * proposal[draft] <= target[draft]:
            tokens.append(draft)
            continue
        residual = (target - proposal).clamp(min=0)
        total = residual.sum()
        tokens.append(int(torch.multinomial(residual / total, 1)) if total > 0 else sampler.pick(target))
        break
    return tokens


def _accept(rows, done, new_tokens, stopping_criteria, max_new, prompt_len, streamer) -> None:
    """Append each unfinished row's tokens one by one, stopping at EOS / stopping criteria / max length."""
    for b, tokens in enumerate(new_tokens):
        if done[b]:
            continue
        kept = []
        for token in tokens:
            rows[b] = torch.cat((rows[b], rows[b].new_tensor([token])))
            kept.append(token)
            if len(rows[b]) - prompt_len >= max_new or bool(stopping_criteria(rows[b][None], None)[0]):
                done[b] = True
                break
        if streamer is not None and kept:
            streamer.put(torch.tensor(kept))


# -- batched greedy path ------------------------------------------------------------------------------------------
# On a GPU a small model's decode step is bound by kernel launches and host syncs, so the per-row, per-position
# Python of the general path above costs more than the drafts save. Greedy decoding with the processors and stopping
# criteria that ``generate`` builds by default depends on a row's prefix only through its length, which is known for
# every row and draft position at once: the whole step then runs as a few batched tensor ops and one host sync.


class _GreedyRules:
    """Batched equivalents of the logits processors and stopping criteria that greedy ``generate`` uses by default.
    ``build`` returns None when any processor or criterion has none (the general per-row path then runs)."""

    def __init__(self, bans, max_length, eos):
        self.bans = bans  # (EOS ids, prefix length below which they are banned): min_length / min_new_tokens
        self.max_length = max_length
        self.eos = eos
        self._vocab_masks = None

    @classmethod
    def build(cls, processors, stopping_criteria):
        bans, max_length, eos = [], None, []
        for processor in processors:
            # Exact types only: a subclass may override ``__call__`` with content-dependent behaviour.
            if type(processor) is MinLengthLogitsProcessor:
                bans.append((processor.eos_token_id, processor.min_length))
            elif type(processor) is MinNewTokensLengthLogitsProcessor:
                bans.append((processor.eos_token_id, processor.prompt_length_to_skip + processor.min_new_tokens))
            else:
                return None
        for criterion in stopping_criteria:
            if type(criterion) is MaxLengthCriteria:
                length = criterion.max_length
                max_length = length if max_length is None else min(max_length, length)
            elif type(criterion) is EosTokenCriteria:
                eos.append(torch.as_tensor(criterion.eos_token_id).reshape(-1))
            else:
                return None
        return cls(bans, max_length, torch.cat(eos) if eos else None)

    def pick(self, logits: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        """Greedy tokens for ``logits`` ``[..., vocab]`` whose rows follow prefixes of ``prefix_len`` ``[...]``
        tokens (prompt padding included, as ``input_ids.shape[-1]`` counts it in ``generate``)."""
        scores = logits.float()  # as the per-row path and ``generate`` do, so ties break identically
        if self.bans and self._vocab_masks is None:
            vocab = torch.arange(scores.shape[-1], device=scores.device)
            self._vocab_masks = [torch.isin(vocab, ids.to(scores.device)) for ids, _ in self.bans]
        for (_, threshold), vocab_mask in zip(self.bans, self._vocab_masks or ()):
            scores = scores.masked_fill((prefix_len < threshold)[..., None] & vocab_mask, float("-inf"))
        return scores.argmax(dim=-1)


class _Sequences:
    """Prompt plus accepted tokens of every row in one padded buffer, with per-row lengths on the device."""

    def __init__(self, input_ids, pad, max_new, num_draft_tokens, rules):
        batch, self.prompt_len = input_ids.shape
        # Room for a finished row's ignored writes too: a step writes at most num_draft_tokens + 1 past a length.
        width = self.prompt_len + max_new + num_draft_tokens + 1
        self.tokens = torch.full((batch, width), pad, dtype=input_ids.dtype, device=input_ids.device)
        self.tokens[:, : self.prompt_len] = input_ids
        self.lengths = torch.full((batch,), self.prompt_len, dtype=torch.long, device=input_ids.device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        self.max_new, self.rules = max_new, rules
        self.eos = None if rules.eos is None else rules.eos.to(input_ids.device)

    def append(self, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Append the first ``count`` of ``candidates`` ``[batch, n]`` to each unfinished row, stopping a row at the
        first token that ends it (EOS, max length), exactly as appending them one by one would. Returns the number
        kept per row."""
        steps = torch.arange(candidates.shape[1], device=candidates.device)
        length_after = self.lengths[:, None] + steps + 1  # row length once candidate j is appended
        stop = length_after - self.prompt_len >= self.max_new
        if self.rules.max_length is not None:
            stop |= length_after >= self.rules.max_length
        if self.eos is not None:
            stop |= torch.isin(candidates, self.eos)
        stop &= steps < count[:, None]
        first_stop = torch.where(stop, steps, candidates.shape[1]).amin(dim=1)
        kept = torch.where(stop.any(dim=1), first_stop + 1, count)
        kept = kept.masked_fill(self.done, 0)
        index = self.lengths[:, None] + steps
        written = torch.where(steps < kept[:, None], candidates, self.tokens.gather(1, index))
        self.tokens.scatter_(1, index, written)
        self.lengths += kept
        self.done |= stop.any(dim=1)
        return kept


def _greedy_generate(model, input_ids, mask, rules, pad, max_new, num_draft_tokens, streamer):
    """``mtp_generate`` for greedy decoding with batched ``rules``: same tokens, cache layout and statistics."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    k = num_draft_tokens
    num_layers = len(model.model.layers)
    cache = DeepseekV32Cache(model.config, num_layers=num_layers)
    mtp_cache = DeepseekV32Cache(model.config, num_layers=num_layers)
    seqs = _Sequences(input_ids, pad, max_new, k, rules)
    proposed = [0] * k
    accepted = [0] * k
    # While no row has padding or a rejected draft, both padding masks are all ones: tracking that on the host
    # (from the per-step sync) spares the MTP step its own ``.all()`` sync and lets the main forward skip its mask.
    all_valid = bool(mask.all())
    if streamer is not None:
        streamer.put(input_ids.cpu())

    out = model.model(input_ids, attention_mask=None if all_valid else mask, past_key_values=cache, use_cache=True)
    forwards = 1
    first = rules.pick(model.lm_head(out.last_hidden_state[:, -1]), seqs.lengths)
    kept = seqs.append(first[:, None], torch.ones_like(first))
    done, _, _ = _sync(seqs.done, kept, kept, first[:, None], streamer)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    mtp_mask = mask * torch.cat((mask[:, 1:], torch.ones_like(mask[:, :1])), dim=1)
    drafts = None
    if not all(done):
        next_ids = torch.cat((input_ids[:, 1:], first[:, None]), dim=1)
        last_index = torch.full((batch,), prompt_len - 1, device=device)
        drafts = _draft_greedy(model, rules, seqs.lengths, out.last_hidden_state, next_ids, positions, mtp_mask,
                               mtp_cache, last_index, k, all_valid)  # fmt: skip
    last = first
    steps = torch.arange(k + 1, device=device)

    while not all(done):
        verify = torch.cat((last[:, None], drafts), dim=1)
        mask = torch.cat((mask, torch.ones_like(verify)), dim=1)
        positions = (mask.cumsum(-1) - 1)[:, -(k + 1) :]
        out = model.model(verify, attention_mask=None if all_valid else mask, past_key_values=cache, use_cache=True)
        forwards += 1
        # Position i predicts the token after the row plus drafts 1..i; it counts only if drafts 1..i all matched.
        choice = rules.pick(model.lm_head(out.last_hidden_state), seqs.lengths[:, None] + steps)
        accepted_len = (choice[:, :-1] == drafts).long().cumprod(dim=1).sum(dim=1)
        # Rejected drafts become holes: masked for every later query, skipped by the positions.
        step_mask = (steps[None, :] <= accepted_len[:, None]).long()
        mask[:, -(k + 1) :] = step_mask
        kept = seqs.append(choice, accepted_len + 1)
        was_done = done
        done, num_accepted, _ = _sync(seqs.done, accepted_len, kept, choice, streamer)
        for b in range(batch):
            if not was_done[b]:
                for i in range(k):
                    proposed[i] += 1
                    accepted[i] += int(i < num_accepted[b])
        all_valid = all_valid and min(num_accepted) == k
        if all(done):
            break
        next_ids = torch.where(steps[None, :] <= accepted_len[:, None], choice, pad)
        last = choice.gather(1, accepted_len[:, None])[:, 0]
        mtp_mask = torch.cat((mtp_mask, step_mask), dim=1)
        drafts = _draft_greedy(model, rules, seqs.lengths, out.last_hidden_state, next_ids, positions, mtp_mask,
                               mtp_cache, accepted_len, k, all_valid)  # fmt: skip

    if streamer is not None:
        streamer.end()
    lengths = seqs.lengths.tolist()
    sequences = seqs.tokens[:, : max(lengths)].clone()
    return _finish(sequences, cache, proposed, accepted, sum(lengths) - batch * prompt_len, forwards, batch)


def _finish(sequences, cache, proposed, accepted, generated: int, forwards: int, batch: int):
    """The ``(sequences, cache, output)`` both decoding loops return, with the acceptance statistics."""
    acceptance = [a / p if p else 0.0 for a, p in zip(accepted, proposed)]
    per_forward = generated / max(1, forwards * batch)
    logger.debug(f"MTP acceptance per draft position {acceptance}, {per_forward:.2f} tokens per main forward")
    return sequences, cache, MTPGenerateOutput(
        sequences=sequences,
        past_key_values=cache,
        mtp_acceptance=acceptance,
        tokens_per_forward=per_forward,
        mtp_counts={"proposed": proposed, "accepted": accepted, "main_forwards": forwards},
    )


def _sync(done, accepted_len, kept, candidates, streamer):
    """The step's one host sync: finished rows, accepted drafts and (for the streamer) the kept tokens."""
    packed = torch.cat((done[:, None].long(), accepted_len[:, None], kept[:, None], candidates), dim=1).tolist()
    if streamer is not None:
        tokens = packed[0][3 : 3 + packed[0][2]]  # streaming is batch 1
        if tokens:
            streamer.put(torch.tensor(tokens))
    return [bool(row[0]) for row in packed], [row[1] for row in packed], [row[2] for row in packed]


def _draft_greedy(model, rules, lengths, hidden, next_ids, positions, mtp_mask, mtp_cache, last_index, k, all_valid):
    """``_draft`` for greedy decoding, batched: returns the drafts ``[batch, k]``."""
    rows_range = torch.arange(hidden.shape[0], device=hidden.device)
    logits, mtp_hidden = _mtp_step(model, hidden, next_ids, positions, mtp_mask, mtp_cache, all_valid)
    logits, mtp_hidden = logits[rows_range, last_index], mtp_hidden[rows_range, last_index]
    position = positions[rows_range, last_index] + 1
    drafts = []
    extended = mtp_mask
    for depth in range(k):
        tokens = rules.pick(logits, lengths + depth)  # the row plus the drafts before this one
        drafts.append(tokens)
        if depth + 1 < k:
            # Recursive drafting reuses the MTP module on its own output; these cache entries are temporary.
            extended = torch.cat((extended, torch.ones_like(extended[:, :1])), dim=1)
            logits, mtp_hidden = _mtp_step(model, mtp_hidden[:, None], tokens[:, None], position[:, None], extended,
                                           mtp_cache, all_valid)  # fmt: skip
            logits, mtp_hidden = logits[:, 0], mtp_hidden[:, 0]
            position = position + 1
    if k > 1:
        mtp_cache.crop(-(k - 1))
    return torch.stack(drafts, dim=1)
