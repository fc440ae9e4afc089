"""A preallocated, in-place KV cache that unmodified transformers models write into.

Each layer owns one buffer of `max_length` positions; `update` writes the new keys/values at
the current length and returns views of the filled part, so nothing is concatenated or copied
per step (DynamicCache copies the whole cache every step with `torch.cat`). Rolling back is
setting the length; keeping the accepted path of a verified tree is one gather per layer over
the few tree positions (`keep`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class StaticKVLayer(CacheLayerMixin):
    """One layer's keys and values in a preallocated buffer, filled up to `length`."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length
        self.length = 0
        self.key_buffer: torch.Tensor | None = None  # (B, kv_heads, max_length, head_dim)
        self.value_buffer: torch.Tensor | None = None  # (B, kv_heads, max_length, head_dim)
        # Views of the filled part, what the model attends to: (B, kv_heads, length, head_dim)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def set_length(self, length: int) -> None:
        self.length = length
        if self.key_buffer is not None:
            self.keys = self.key_buffer[:, :, :length]
            self.values = self.value_buffer[:, :, :length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.key_buffer = key_states.new_empty(batch, heads, self.max_length, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(
            batch, heads, self.max_length, value_states.shape[-1]
        )
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_length:
            raise RuntimeError(
                f"KV cache overflow: {end} positions needed, {self.max_length} allocated"
            )
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.set_length(end)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length

    def crop(self, tokens_to_remove: int) -> None:
        # transformers' convention: a negative value removes that many tokens.
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.set_length(max(0, self.length + tokens_to_remove))

    def reset(self) -> None:
        self.set_length(0)

    def keep(self, start: int, offsets: torch.Tensor) -> None:
        """Keep positions `start + offsets` (increasing) as `start, start+1, ...`; drop the rest."""
        if self.key_buffer is None:
            return
        source = start + offsets
        count = int(offsets.numel())
        self.key_buffer[:, :, start : start + count] = self.key_buffer.index_select(2, source)
        self.value_buffer[:, :, start : start + count] = self.value_buffer.index_select(2, source)
        self.set_length(start + count)


class StaticKVCache(Cache):
    """The cache of a whole model: one `StaticKVLayer` per decoder layer, all the same length."""

    def __init__(self, num_layers: int, max_length: int):
        super().__init__(layers=[StaticKVLayer(max_length) for _ in range(num_layers)])
        self.max_length = max_length

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Forget every position at or after `length`."""
        for layer in self.layers:
            layer.set_length(min(layer.length, length))

    def keep(self, start: int, offsets: torch.Tensor) -> None:
        """Compact to the accepted path: positions `start + offsets` move to `start, start+1, ...`.

        `offsets` (n,) int64, increasing, relative to `start` (the cache length before the
        verified tree was appended). Everything after the kept positions is dropped.
        """
        if self.layers[0].is_initialized:
            offsets = offsets.to(self.layers[0].device)
        if bool((offsets == torch.arange(offsets.numel(), device=offsets.device)).all()):
            self.truncate(start + int(offsets.numel()))  # already in place: no copy
            return
        for layer in self.layers:
            layer.keep(start, offsets)
