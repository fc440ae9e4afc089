"""Tree attention for unmodified transformers models, registered as attention implementation
"sparrow".

The model's attention layers call `sparrow_attention` with the cache already holding the new
tokens at its end. Three cases, all without copying the KV cache:

* prefill of a fresh cache (queries == keys): causal SDPA with native GQA;
* one new token (AR decode step): it sees the whole cache, no mask; on a CPU with a cache of
  at least `native.MIN_LENGTH` tokens it runs the native split-K kernel of
  `sparrow.decoding.native` (2x SDPA's speed at 25k tokens), else SDPA;
* q new tokens over a cached prefix (tree verification, or a prompt appended to a cached
  video): the prefix is fully visible and the new tokens see each other through a (q, q)
  mask. Query heads that share a KV head are packed into the query-length axis (GQA packing),
  so the grouped keys/values are read once instead of being repeated per head, and the mask
  is the prebuilt `sparrow_mask` argument (one per forward, shared by every layer).

The mask rides through the model as a keyword argument (`model(..., sparrow_mask=mask)`), which
transformers forwards untouched to every attention call: no state is stored on the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sparrow.decoding import native

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


def sparrow_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, q, D)
    key: torch.Tensor,  # (B, H_kv, T, D), the last q positions are the new tokens
    value: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sparrow_mask: torch.Tensor | None = None,  # (1, 1, G*q, T) from build_attention_mask
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
        # packing the query heads into the query axis leaves them a handful of blocks (H100,
        # 25k cache, per layer: decode 0.27 vs 2.48 ms fp32). The first q mask rows are those
        # of KV group 0: the (1, 1, q, T) mask every head shares.
        # Known cost: under a mask, SDPA has no fused GQA kernel and falls back to its math
        # kernel, which repeats K/V per query head (a copy of the cache per layer). Measured on
        # an H200 (fp32, 25k cache, verify of 16): this path 16.3 ms; the copy-free variant
        # (each KV head a batch entry, expanded over its query heads with stride 0, run by the
        # memory-efficient kernel) 40.6 ms, as that kernel does not split a long cache over
        # thread blocks. A split-KV tree kernel is what would remove the copy.
        mask = None if sparrow_mask is None else sparrow_mask[:, :, :q_len]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2), None  # (B, q, H, D)
    if q_len == 1 and sparrow_mask is None:  # AR decode step over a long cache: native kernel
        scale = scaling if scaling is not None else head_dim**-0.5
        out = native.decode_attention(query, key, value, scale)
        if out is not None:
            return out.transpose(1, 2), None  # (B, 1, H, D)
    packed = query.reshape(batch, kv_heads, groups * q_len, head_dim)  # (B, H_kv, G*q, D)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=sparrow_mask, scale=scaling)
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2), None  # (B, q, H, D)


def _no_mask(*args, **kwargs) -> None:
    """Causality is handled inside `sparrow_attention`; transformers builds no mask for it."""
    return


def register() -> str:
    """Register the attention function and its (empty) mask builder; returns the name."""
    AttentionInterface.register(ATTENTION_NAME, sparrow_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME
