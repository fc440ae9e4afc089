"""Tree attention for unmodified transformers models, registered as attention implementation
"sparrow".

The model's attention layers call `sparrow_attention` with the cache already holding the new
tokens at its end. Three cases, all without copying the KV cache:

* prefill of a fresh cache (queries == keys): causal SDPA with native GQA;
* one new token (AR decode step): it sees the whole cache, no mask; on a CPU with a cache of
  at least `native.decode_min_length()` tokens it runs the native split-K kernel of
  `sparrow.runtime.native` (faster than SDPA over a long cache; docs/runtime.md), else SDPA;
* q new tokens over a cached prefix (tree verification, or a prompt appended to a cached
  video): the prefix is fully visible and the new tokens see the last m cache positions
  through a (q, m) visibility, the `sparrow_mask` argument (a `TreeMask`, one per forward,
  shared by every layer). On a CPU with a long cache the native kernel of
  `sparrow.runtime.native` reads that visibility directly (faster than SDPA over a long
  cache; docs/runtime.md); otherwise SDPA runs with the query heads that share a KV head
  packed into the query-length axis (GQA packing), so the grouped keys/values are read once
  instead of being repeated per head, under the additive mask the `TreeMask` builds once for
  all layers.

The mask rides through the model as a keyword argument (`model(..., sparrow_mask=mask)`), which
transformers forwards untouched to every attention call: no state is stored on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sparrow.runtime import native

ATTENTION_NAME = "sparrow"


def build_attention_mask(
    visible: torch.Tensor, cache_length: int, groups: int, dtype: torch.dtype
) -> torch.Tensor:
    """The additive mask for the q newest cache positions (the last q of `cache_length`).

    visible: (q, m) bool over the last m cache positions (m >= q; the last q columns are the
    new tokens themselves): True where new token i may attend to that position. Every
    position before those m is visible to all. Returns (1, 1, groups * q, cache_length): 0
    where visible, the dtype's minimum elsewhere, rows tiled once per query head of a KV
    group (the GQA-packed row order of `sparrow_attention`).
    """
    q, m = visible.shape
    mask = torch.zeros(groups * q, cache_length, dtype=dtype, device=visible.device)
    block = torch.zeros(q, m, dtype=dtype, device=visible.device)
    block.masked_fill_(~visible, torch.finfo(dtype).min)
    mask[:, cache_length - m :] = block.repeat(groups, 1)
    return mask[None, None]


@dataclass
class TreeMask:
    """Who sees whom among the q newest cache positions; every older position is visible to all.

    visible: (q, m) bool over the last m of `cache_length` positions (m >= q; the last q
    columns are the new tokens themselves). The native kernel reads `visible`; SDPA reads
    `additive(groups)`, built on first use and then shared by every layer of the forward.
    """

    visible: torch.Tensor
    cache_length: int
    dtype: torch.dtype
    _additive: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def additive(self, groups: int) -> torch.Tensor:
        """The (1, 1, groups * q, cache_length) additive mask of `build_attention_mask`."""
        if groups not in self._additive:
            self._additive[groups] = build_attention_mask(
                self.visible, self.cache_length, groups, self.dtype)
        return self._additive[groups]


def sparrow_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, q, D)
    key: torch.Tensor,  # (B, H_kv, T, D), the last q positions are the new tokens
    value: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sparrow_mask: TreeMask | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if sparrow_mask is None and q_len > 1:
        if q_len != kv_len:
            raise RuntimeError(
                "sparrow attention: several new tokens over a cached prefix need `sparrow_mask`"
            )
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=groups > 1
        )  # (B, H, q, D)
        return out.transpose(1, 2), None
    if query.device.type != "cpu":
        # GPU kernels handle GQA natively and split a long cache over many thread blocks;
        # packing the query heads into the query axis leaves them a handful of blocks, far
        # slower over a long cache (docs/runtime.md). Every head shares one (1, 1, q, T) mask.
        # Known cost: under a mask, SDPA has no fused GQA kernel and falls back to its math
        # kernel, which repeats K/V per query head (a copy of the cache per layer). The
        # copy-free variant (each KV head a batch entry, expanded over its query heads with
        # stride 0, run by the memory-efficient kernel) is slower than the copy over a long
        # cache, as that kernel does not split a long cache over thread blocks
        # (docs/runtime.md). A split-KV tree kernel is what would remove the copy.
        mask = None if sparrow_mask is None else sparrow_mask.additive(1)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2), None  # (B, q, H, D)
    scale = scaling if scaling is not None else head_dim**-0.5
    if sparrow_mask is None:  # AR decode step (q_len == 1)
        out = native.decode_attention(query, key, value, scale)
    else:
        out = native.tree_attention(query, key, value, sparrow_mask.visible, scale)
    if out is not None:  # a native kernel ran (a long cache on a CPU with a compiler)
        return out.transpose(1, 2), None  # (B, q, H, D)
    packed = query.reshape(batch, kv_heads, groups * q_len, head_dim)  # (B, H_kv, G*q, D)
    mask = None if sparrow_mask is None else sparrow_mask.additive(groups)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2), None  # (B, q, H, D)


def no_mask(*args, **kwargs) -> None:
    """Causality is handled inside `sparrow_attention`; transformers builds no mask for it."""
    return


def register() -> str:
    """Register the attention function and its (empty) mask builder; returns the name."""
    AttentionInterface.register(ATTENTION_NAME, sparrow_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, no_mask)
    return ATTENTION_NAME
