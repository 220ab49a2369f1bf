"""The generation cache of DeepSeek-V3.2: per layer the normalized KV latent, the shared rope key and the indexer keys.

MLA never needs per-head K/V in the cache: the absorbed decode path scores queries against the latent directly.
Per token and layer that is ``kv_lora_rank + qk_rope_head_dim`` values plus the indexer key (FP8 + one fp32 scale
per 128-block when ``index_fp8``), instead of ``2 x heads x head_dim`` for dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from .configuration import DeepseekV32Config

_LAYER_TENSORS = ("latent", "k_rope", "index_k", "index_k_scale")


@dataclass
class MLALayerCache:
    """Cached tensors of one layer, each ``[batch, tokens, dim]`` (``index_k_scale`` is None without FP8)."""

    latent: torch.Tensor | None = None
    k_rope: torch.Tensor | None = None
    index_k: torch.Tensor | None = None
    index_k_scale: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def tensors(self):
        for name in _LAYER_TENSORS:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def map(self, fn) -> None:
        for name, value in list(self.tensors()):
            setattr(self, name, fn(value))
            buffer = self.extras.get(name)
            if buffer is not None and buffer.data_ptr() != getattr(self, name).data_ptr():
                del self.extras[name]  # the spare-room buffer of `_append` no longer backs the tensor


class DeepseekV32Cache(Cache):
    """Latent MLA + indexer-key cache, created by ``generate`` (or by the model when ``use_cache`` and none is given).

    Supports what generation strategies need: ``get_seq_length``, ``crop`` (negative for assisted decoding),
    ``reorder_cache`` (beam search), ``batch_repeat_interleave`` and ``batch_select_indices``.
    """

    is_compileable = False

    def __init__(self, config: DeepseekV32Config | None = None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("DeepseekV32Cache needs a config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[MLALayerCache() for _ in range(num_layers)])

    # -- writing ------------------------------------------------------------------------------------------------
    def update_mla(
        self, latent: torch.Tensor, k_rope: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new latents / rope keys of ``layer_idx`` and return the full cached tensors."""
        layer = self.layers[layer_idx]
        layer.latent = _append(layer, "latent", latent)
        layer.k_rope = _append(layer, "k_rope", k_rope)
        return layer.latent, layer.k_rope

    def update_index_keys(
        self, index_k: torch.Tensor, index_k_scale: torch.Tensor | None, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append indexer keys (and their FP8 scales) of ``layer_idx`` and return the full cached tensors."""
        layer = self.layers[layer_idx]
        layer.index_k = _append(layer, "index_k", index_k)
        if index_k_scale is not None:
            layer.index_k_scale = _append(layer, "index_k_scale", index_k_scale)
        return layer.index_k, layer.index_k_scale

    # -- reading ------------------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers) or self.layers[layer_idx].latent is None:
            return 0
        return self.layers[layer_idx].latent.shape[1]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_query_offset(self, *args, **kwargs) -> int:
        return self.get_seq_length()

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        return any(layer.latent is not None for layer in self.layers)

    def nbytes_per_token(self) -> int:
        """Bytes the cache holds per token, summed over layers (0 before the first forward)."""
        total = 0
        for layer in self.layers:
            for _, value in layer.tensors():
                total += value[0, 0].numel() * value.element_size() * value.shape[0]
        batch = next((layer.latent.shape[0] for layer in self.layers if layer.latent is not None), 1)
        return total // batch

    # -- editing ------------------------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value removes that many from the end of each layer."""
        for idx, layer in enumerate(self.layers):
            if layer.latent is None:
                continue
            length = self.get_seq_length(idx)
            keep = length + max_length if max_length < 0 else max_length
            if keep < 0:
                raise ValueError(f"cannot remove {-max_length} tokens from layer {idx}, which caches {length}")
            layer.map(lambda t: t[:, :keep])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.map(lambda t: t[indices.to(t.device)])

    def reset(self) -> None:
        for idx in range(len(self.layers)):
            self.layers[idx] = MLALayerCache()

    def activate_past_recording(self) -> None:
        """Assisted decoding hook; cropping needs no recording here."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, tokens={self.get_seq_length()})"


# Spare tokens reserved when a layer's buffer grows: 1/8 of the length, at least 256, so a decode step writes into
# the buffer in place and the whole cache is copied only every ~length/8 steps (torch.cat copied it every step).
_MIN_SPARE = 256


def _append(layer: MLALayerCache, name: str, new: torch.Tensor) -> torch.Tensor:
    """``cat((cached, new), dim=1)`` as a view of a per-layer buffer with spare room, reused while the cached tensor
    is still the front of that buffer (crop keeps it; reorder/select make new tensors, which start a new one)."""
    cached = getattr(layer, name)
    if cached is None:
        return new  # prefill: stored as computed; decode steps start the buffer
    new = new.to(cached.device)
    length, count = cached.shape[1], new.shape[1]
    buffer = layer.extras.get(name)
    reusable = (
        buffer is not None
        and buffer.data_ptr() == cached.data_ptr()
        and buffer.shape[0] == cached.shape[0]
        and buffer.shape[2:] == cached.shape[2:]
        and buffer.stride() == cached.stride()
        and buffer.dtype == new.dtype
        and buffer.shape[1] >= length + count
    )
    if not reusable:
        capacity = length + count + max(_MIN_SPARE, (length + count) // 8)
        buffer = cached.new_empty((cached.shape[0], capacity, *cached.shape[2:]))
        buffer[:, :length] = cached
        layer.extras[name] = buffer
    buffer[:, length : length + count] = new
    return buffer[:, : length + count]
