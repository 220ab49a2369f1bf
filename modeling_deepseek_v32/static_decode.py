"""Static-shape decode with an optional CUDA graph: ``generate(..., cache_implementation="static")``.

Decode is launch-bound (over a thousand small ops per token, benchmarks/NOTES.md), so replaying one captured CUDA
graph per step removes the Python and launch overhead. A graph fixes every shape and address, and the dynamic cache
(``cache.py``) lets the cached length shape tensors. The static path therefore:

* keeps each layer's latent / rope key / indexer key in buffers of a fixed capacity (``DeepseekV32StaticCache``),
  with the write slot, the per-row RoPE positions and the key validity (``key_valid [B, capacity]``) in device
  tensors that the step itself advances;
* runs the unchanged attention and indexer modules against those full buffers through ``_StepView``, which reports
  ``capacity - 1`` cached tokens: every slot is then causally visible to the new query and ``key_valid`` alone masks
  the padding and the slots not written yet. The indexer scores all ``capacity`` keys and takes its top-k over
  them (a fixed width); when fewer valid keys exist than ``index_topk`` it selects all of them, which is the set
  the dynamic path's dense branch attends to, so both compute the same function.

Prefill (and any step with more than one new token) runs the dynamic path and copies its cache into the buffers.
On CPU the same step runs eagerly: it is the oracle the tests compare with the dynamic path. On CUDA the first
``_WARMUP_STEPS`` steps run eagerly on a side stream (Triton compiles, MoE pointer tables, cuBLAS workspaces), then
the step is captured once per (batch, capacity) and replayed. ``DEEPSEEK_V32_CUDA_GRAPHS=0`` keeps it eager.

Supported: greedy search and sampling, any batch size, left padding, bf16/fp16/fp32 and FP8 checkpoints.
Not supported (clear errors): beam search and other cache reordering, assisted decoding, ``use_mtp=True`` (stays on
the dynamic cache), hidden-state outputs or ``inputs_embeds`` during decode steps.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import kernels as _kernels
from .cache import DeepseekV32Cache, MLALayerCache
from .moe import DeepseekV32MoE

logger = logging.getLogger(__name__)

_GRAPH_ENV_VAR = "DEEPSEEK_V32_CUDA_GRAPHS"
# Eager steps before capture: the first compiles Triton kernels and builds lazy state, the second checks that it ran
# without host synchronization (a captured sync would fail).
_WARMUP_STEPS = 2
# Capacity is rounded up so nearby prompt/generation lengths reuse the same buffers and graph.
_CAPACITY_MULTIPLE = 256
# Decoders (buffers + graph) kept per model; each holds a full-capacity cache, so only the most recent few.
_MAX_DECODERS = 2


class DeepseekV32StaticCache(DeepseekV32Cache):
    """A fixed-capacity cache for ``DeepseekV32ForCausalLM``; created by ``generate(cache_implementation="static")``
    or directly (``DeepseekV32StaticCache(model, batch_size, max_cache_len)``) and passed as ``past_key_values``.

    The buffers belong to a decoder kept on the model and reused by later caches of the same shape, so a second
    ``generate`` call replays the graph captured by the first. ``get_seq_length`` is a host-side count.
    """

    is_compileable = False  # keeps transformers from wrapping the forward in torch.compile

    def __init__(self, model, batch_size: int, max_cache_len: int):
        base = getattr(model, "model", model)
        super().__init__(base.config, num_layers=len(base.layers))
        if max_cache_len <= 0 or batch_size <= 0:
            raise ValueError(f"static cache needs a positive batch size and length, got {batch_size}, {max_cache_len}")
        # Prefixed names: transformers' Cache defines read-only properties (max_cache_len, batch_size, ...) that
        # differ between versions, so state is stored under names no version uses and exposed through our own.
        self._static_model = base
        self._static_batch = batch_size
        self._static_capacity = -(-max_cache_len // _CAPACITY_MULTIPLE) * _CAPACITY_MULTIPLE
        self._static_length = 0
        self._static_decoder: StaticDecoder | None = None

    @property
    def max_cache_len(self) -> int:
        return self._static_capacity

    @property
    def batch(self) -> int:
        return self._static_batch

    @property
    def length(self) -> int:
        return self._static_length

    @property
    def decoder(self) -> StaticDecoder | None:
        return self._static_decoder

    @classmethod
    def from_cache(cls, model, cache: DeepseekV32Cache, max_cache_len: int, attention_mask=None, position_ids=None):
        """A static cache holding what ``cache`` (a filled dynamic cache) holds, with room for ``max_cache_len``
        tokens in all. ``attention_mask`` [B, cached] marks padding as it did when the cache was filled."""
        length = cache.get_seq_length()
        batch = cache.layers[0].latent.shape[0]
        static = cls(model, batch, max(max_cache_len, length + 1))
        static._store(cache, 0, length, attention_mask, position_ids)
        return static

    # -- state --------------------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    @property
    def is_initialized(self) -> bool:
        return self.length > 0

    def nbytes_per_token(self) -> int:
        if self.decoder is None:
            return 0
        total = sum(t[0, 0].numel() * t.element_size() for layer in self.decoder.layers for _, t in layer.tensors())
        return total

    def layer_views(self, layer_idx: int) -> MLALayerCache:
        """The cached tokens of one layer as ``[B, length, dim]`` views of the buffers (for inspection and tests)."""
        if self.decoder is None:
            return MLALayerCache()
        buffers = self.decoder.layers[layer_idx]
        return MLALayerCache(**{name: t[:, : self.length] for name, t in buffers.tensors()})

    # -- editing ------------------------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        keep = self.length + max_length if max_length < 0 else min(max_length, self.length)
        if keep < 0:
            raise ValueError(f"cannot remove {-max_length} tokens from a cache of {self.length}")
        if self.decoder is not None and keep < self.length:
            decoder = self.decoder
            decoder.key_valid[:, keep:] = False
            decoder.positions.copy_(decoder.key_valid[:, :keep].sum(-1))
            decoder.slot.fill_(keep)
        self._static_length = keep

    def reset(self) -> None:
        self.crop(0)

    def update_mla(self, *args, **kwargs):
        raise RuntimeError("DeepseekV32StaticCache is written by DeepseekV32Model.forward, not by single layers")

    update_index_keys = update_mla

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "DeepseekV32StaticCache supports greedy search and sampling only (no beam search, no cache reordering or "
            "batch expansion); use the default dynamic cache for these"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch={self.batch}, tokens={self.length}, capacity={self.max_cache_len})"

    # -- filling ------------------------------------------------------------------------------------------------
    def _store(self, cache: DeepseekV32Cache, start: int, stop: int, attention_mask, position_ids) -> None:
        """Copy tokens ``start:stop`` of the dynamic ``cache`` into the buffers and advance the device state."""
        if stop > self.max_cache_len:
            raise ValueError(f"{stop} tokens do not fit the static cache of {self.max_cache_len}")
        if self._static_decoder is None:
            self._static_decoder = _acquire_decoder(self._static_model, self.batch, self.max_cache_len, cache)
        decoder = self.decoder
        for layer_idx, buffers in enumerate(decoder.layers):
            source = cache.layers[layer_idx]
            for name, buffer in buffers.tensors():
                buffer[:, start:stop].copy_(getattr(source, name)[:, start:stop])
        if attention_mask is None:
            decoder.key_valid[:, start:stop] = True
        else:
            decoder.key_valid[:, start:stop] = attention_mask[:, start:stop].to(decoder.key_valid.device, torch.bool)
        if position_ids is not None:
            decoder.positions.copy_(position_ids[:, -1] + 1)
        else:
            decoder.positions.copy_(decoder.key_valid[:, :stop].sum(-1))
        decoder.slot.fill_(stop)
        self._static_length = stop

    def _as_dynamic(self) -> DeepseekV32Cache:
        """A dynamic cache viewing the cached tokens (for a multi-token step on a filled static cache)."""
        dynamic = DeepseekV32Cache(num_layers=len(self.layers))
        if self.length:
            for layer_idx in range(len(self.decoder.layers)):
                dynamic.layers[layer_idx] = self.layer_views(layer_idx)
        return dynamic


class _StepView:
    """What attention and indexer see as ``past_key_values`` during a static step: ``capacity - 1`` cached tokens
    (so the new query's causal horizon covers every slot; ``key_valid`` masks unwritten slots and padding), and
    writes at the device-side slot. Returns the full buffers, whose shapes never change."""

    def __init__(self, decoder: StaticDecoder):
        self.decoder = decoder
        self.horizon = decoder.capacity - 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.horizon

    def _write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        if buffer.element_size() == 1 and buffer.dtype.is_floating_point:
            # index_copy_ has no FP8 implementation; the bytes are what is copied anyway.
            buffer, new = buffer.view(torch.uint8), new.view(torch.uint8)
        buffer.index_copy_(1, self.decoder.slot, new)

    def update_mla(self, latent, k_rope, layer_idx):
        buffers = self.decoder.layers[layer_idx]
        self._write(buffers.latent, latent)
        self._write(buffers.k_rope, k_rope)
        return buffers.latent, buffers.k_rope

    def update_index_keys(self, index_k, index_k_scale, layer_idx):
        buffers = self.decoder.layers[layer_idx]
        self._write(buffers.index_k, index_k)
        if index_k_scale is not None:
            self._write(buffers.index_k_scale, index_k_scale)
        return buffers.index_k, buffers.index_k_scale


class StaticDecoder:
    """Full-capacity buffers, the device-side decode state and (on CUDA) the captured step of one model, batch
    size and capacity."""

    def __init__(self, base_model, batch: int, capacity: int, specs: list[dict], device: torch.device):
        self.batch, self.capacity, self.device = batch, capacity, device
        self.layers = [
            MLALayerCache(**{name: torch.zeros(batch, capacity, *shape, dtype=dtype, device=device)
                             for name, (dtype, shape) in spec.items()})
            for spec in specs
        ]  # fmt: skip
        # Zeros, not empty: unwritten slots are read (then masked) by the full-width scans and must be finite.
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.new_valid = torch.ones(batch, dtype=torch.bool, device=device)
        self.use_graph = device.type == "cuda" and os.environ.get(_GRAPH_ENV_VAR, "").strip() != "0"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_output: torch.Tensor | None = None
        self.stream = torch.cuda.Stream(device) if self.use_graph else None
        self.eager_steps = 0
        self.fingerprint = _fingerprint(base_model)
        self.moe_layers = sum(isinstance(layer.mlp, DeepseekV32MoE) for layer in base_model.decoder_layers)

    def reset(self) -> None:
        for buffers in self.layers:
            for _, tensor in buffers.tensors():
                tensor.zero_()
        self.key_valid.zero_()
        self.positions.zero_()
        self.slot.zero_()

    # -- one step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, base_model, input_ids, new_valid, position_ids) -> torch.Tensor:
        """Final normed hidden states ``[B, 1, hidden]`` of one decode step (inputs are copied into static buffers)."""
        self.input_ids.copy_(input_ids)
        if new_valid is None:
            self.new_valid.fill_(True)
        else:
            self.new_valid.copy_(new_valid)
        if position_ids is not None:
            self.positions.copy_(position_ids[:, -1])
        if self.graph is not None:
            self.graph.replay()
            return self.graph_output.clone()
        if not self.use_graph:
            return self._body(base_model)
        if self.eager_steps < _WARMUP_STEPS:
            return self._warmup_step(base_model)
        if self._capture(base_model):
            self.graph.replay()
            return self.graph_output.clone()
        return self._body(base_model)

    def _body(self, base_model) -> torch.Tensor:
        """The static-shape decode step: no shape or host value depends on the cached length."""
        self.key_valid.index_copy_(1, self.slot, self.new_valid[:, None])
        cos, sin = base_model.rotary_emb(self.positions[:, None])
        hidden = base_model.embed_tokens(self.input_ids)
        view = _StepView(self)
        token_valid = self.new_valid[:, None]
        for layer in base_model.decoder_layers:
            # DeepseekV32DecoderLayer.forward with the new token's validity for the MoE statistics: the layer would
            # take it from key_valid's last column, which in a static buffer is not the new token.
            attn_out = layer.self_attn(layer.input_layernorm(hidden), cos, sin, self.key_valid, view)
            hidden = hidden + attn_out
            normed = layer.post_attention_layernorm(hidden)
            moe = isinstance(layer.mlp, DeepseekV32MoE)
            hidden = hidden + (layer.mlp(normed, token_valid) if moe else layer.mlp(normed))
        hidden = base_model.norm(hidden)
        self.positions.add_(self.new_valid.long())
        self.slot.add_(1)
        return hidden

    def _warmup_step(self, base_model) -> torch.Tensor:
        before = _kernels.calls["grouped_moe"]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            hidden = self._body(base_model)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.eager_steps += 1
        if self.moe_layers and _kernels.calls["grouped_moe"] - before < self.moe_layers:
            # The per-expert loop reads expert counts on the host: a graph cannot contain that synchronization.
            self.use_graph = False
            logger.warning("static cache: the grouped MoE kernel did not run (see the kernels log), so decode steps "
                           "run eagerly without a CUDA graph")  # fmt: skip
        return hidden

    def _capture(self, base_model) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                output = self._body(base_model)
        except Exception as error:  # never break generation: keep running the same step eagerly
            self.use_graph = False
            logger.warning("static cache: CUDA graph capture failed (%s: %s); decode steps run eagerly",
                           type(error).__name__, error)  # fmt: skip
            return False
        # Capturing recorded the step without running it; the caller replays it for this token.
        self.graph, self.graph_output = graph, output
        return True


def _fingerprint(base_model) -> tuple:
    """Addresses of every parameter and buffer: a captured graph reads them, so any change invalidates it."""
    return tuple(t.data_ptr() for t in itertools.chain(base_model.parameters(), base_model.buffers()))


def _specs_of(base_model, cache: DeepseekV32Cache) -> list[dict]:
    specs = []
    for layer_idx in range(base_model.config.num_hidden_layers):
        layer = cache.layers[layer_idx]
        specs.append({name: (t.dtype, tuple(t.shape[2:])) for name, t in layer.tensors()})
    return specs


def _acquire_decoder(base_model, batch: int, capacity: int, cache: DeepseekV32Cache) -> StaticDecoder:
    """The model's decoder for this shape (reset for a new sequence), built or rebuilt when needed."""
    specs = _specs_of(base_model, cache)
    device = cache.layers[0].latent.device
    key = (batch, capacity, device, repr(specs))
    pool = base_model.__dict__.setdefault("_static_decoders", collections.OrderedDict())
    decoder = pool.pop(key, None)
    if decoder is not None and decoder.fingerprint != _fingerprint(base_model):
        decoder = None  # weights moved or were replaced: the graph would read stale addresses
    if decoder is None:
        while len(pool) >= _MAX_DECODERS:
            pool.popitem(last=False)
        decoder = StaticDecoder(base_model, batch, capacity, specs, device)
    else:
        decoder.reset()
    pool[key] = decoder
    return decoder


def release_static_decoders(model) -> None:
    """Free the static caches' buffers and graphs kept on ``model`` (they are rebuilt on the next use)."""
    base = getattr(model, "model", model)
    base.__dict__.pop("_static_decoders", None)


def static_forward(base_model, input_ids, attention_mask, position_ids, cache: DeepseekV32StaticCache, inputs_embeds,
                   output_hidden_states) -> BaseModelOutputWithPast:  # fmt: skip
    """``DeepseekV32Model.forward`` with a static cache: one-token steps take the static (graphed) step, anything
    longer runs the dynamic path and is copied into the buffers."""
    new = (input_ids if input_ids is not None else inputs_embeds).shape
    batch, seq = new[0], new[1]
    if base_model.training:
        raise ValueError("DeepseekV32StaticCache is for inference; call model.eval() first")
    if batch != cache.batch:
        raise ValueError(f"the static cache was made for batch {cache.batch}, got {batch}")
    if cache.length + seq > cache.max_cache_len:
        raise ValueError(
            f"the static cache holds {cache.max_cache_len} tokens: {cache.length} cached + {seq} new do not fit"
        )
    if attention_mask is not None and attention_mask.shape != (batch, cache.length + seq):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {cache.length + seq})"
        )
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids[None].expand(batch, -1)
    if seq > 1 or cache.length == 0:
        dynamic = cache._as_dynamic()
        output = base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=dynamic, inputs_embeds=inputs_embeds, use_cache=True,
                            output_hidden_states=output_hidden_states)  # fmt: skip
        cache._store(dynamic, cache.length, cache.length + seq, attention_mask, position_ids)
        output.past_key_values = cache
        return output
    if input_ids is None or output_hidden_states:
        raise ValueError("static-cache decode steps take `input_ids` and return no hidden states; use the dynamic cache")
    total = cache.length + 1
    if position_ids is None and total > base_model.config.max_position_embeddings:
        raise ValueError(f"input of {total} tokens exceeds max_position_embeddings={base_model.config.max_position_embeddings}")
    new_valid = None if attention_mask is None else attention_mask[:, -1]
    hidden = cache.decoder.step(base_model, input_ids, new_valid, position_ids)
    cache._static_length = total
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
