"""The Sparrow draft head (METHOD.md section 2): one decoder layer over target features.

    z_t = FC([RMSNorm(Emb(x_{t+1})) ; h_t])        FC: 2d -> d, with bias
    o_t = DecoderLayer(z_t)                          no input norm (EAGLE), no final norm
    logits_{t+2} = lm_head(o_t)                      o_t stands in for h_{t+1} deeper in a tree

Emb and lm_head are the target's, frozen, passed in at call time and never saved with the
draft. The decoder layer is transformers' own LlamaDecoderLayer (SwiGLU MLP, 1-D RoPE) with
its input norm removed; its attention runs through the same tree-aware kernel as the target:
over the draft's decoding cache, or causal over a whole sequence without one (training).
Which target positions the draft sees, and what visual positions carry: `sparrow.draft.modes`.

A draft may predict over a reduced vocabulary (EAGLE-3's idea): `vocab` (N,) holds the target
token ids its head covers, the rows of the target's lm_head it uses; the draft never proposes
a token outside them, which costs acceptance but never exactness.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from sparrow.draft.modes import check_mode, check_visual
from sparrow.errors import CheckpointError
from sparrow.runtime.attention import TreeMask, register
from sparrow.runtime.cache import StaticKVCache


@dataclass
class DraftConfig:
    """Everything needed to rebuild a draft, and what it must match in its target."""

    target_model_type: str
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    mode: str = "sparrow"  # positions fed at inference (sparrow.draft.modes)
    visual: str = "none"  # what visual positions carry (sparrow.draft.modes)
    mid_layer: int | None = None  # m* for `visual` mid: hidden state after m target layers
    draft_vocab_size: int | None = None  # N rows of the target's lm_head, or None for all
    training: dict | None = None  # how it was trained (sparrow.training.config), for the record
    # acceptance[d][r]: probability that the target's token at depth d + 1 is the draft's
    # (r + 1)-th choice, measured on held-out data after training (`--tree auto` uses it)
    acceptance: list[list[float]] | None = None

    def __post_init__(self):
        check_mode(self.mode)
        check_visual(self.visual)
        if self.visual == "mid" and self.mid_layer is None:
            raise CheckpointError("draft visual input 'mid' needs mid_layer (m*)")

    @classmethod
    def for_target(
        cls, target, mode: str = "sparrow", visual: str = "none", mid_layer: int | None = None,
        draft_vocab_size: int | None = None,
    ) -> DraftConfig:
        """A draft shaped like `target`'s decoder layers; `mid_layer` defaults to L/2."""
        text = target.text_config
        heads = text.num_attention_heads
        return cls(
            target_model_type=target.config.model_type,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            rms_norm_eps=text.rms_norm_eps,
            max_position_embeddings=max(32768, text.max_position_embeddings),
            mode=mode,
            visual=visual,
            mid_layer=text.num_hidden_layers // 2 if mid_layer is None else mid_layer,
            draft_vocab_size=draft_vocab_size,
        )

    def layer_config(self) -> LlamaConfig:
        config = LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            vocab_size=self.vocab_size,
            num_hidden_layers=1,
        )
        config._attn_implementation = register()
        return config


class DraftModel(nn.Module):
    """One-layer draft head. Owns only its FC, norm and decoder layer."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        layer_config = config.layer_config()
        self.embed_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layer = LlamaDecoderLayer(layer_config, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()  # EAGLE convention: no first input norm
        self.rotary = LlamaRotaryEmbedding(layer_config)
        size = config.draft_vocab_size
        # (N,) int64 target ids of the head's rows (all of them when no reduced vocabulary)
        vocab = torch.arange(size or 0, dtype=torch.long)
        self.register_buffer("vocab", vocab, persistent=size is not None)

    @property
    def mode(self) -> str:
        return self.config.mode

    def head_weight(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """(N, d) rows of the target's lm_head weight (V, d) the draft predicts over."""
        if self.config.draft_vocab_size is None:
            return lm_head_weight
        return lm_head_weight[self.vocab.to(lm_head_weight.device)]

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Target token ids of head rows `indices` (any shape)."""
        if self.config.draft_vocab_size is None:
            return indices
        return self.vocab.to(indices.device)[indices]

    def new_cache(self, capacity: int) -> StaticKVCache:
        return StaticKVCache(num_layers=1, max_length=capacity)

    def forward(
        self,
        embeds: torch.Tensor,  # (B, n, d): target embeddings of the next tokens x_{t+1}
        features: torch.Tensor,  # (B, n, d): h_t (target) or the draft's own earlier outputs
        positions: torch.Tensor,  # (B, n) int64: the draft's own 1-D positions
        cache: StaticKVCache | None = None,
        sparrow_mask: TreeMask | None = None,  # see attention.py
        direct: torch.Tensor | None = None,  # (B, n, d): states fed as they are where...
        direct_mask: torch.Tensor | None = None,  # (B, n) bool: ...True (visual, `mid`/`embed`)
    ) -> torch.Tensor:  # (B, n, d)
        """One pass of the decoder layer. With a `cache` the new positions are appended to it
        (decoding); without one, (B, n) whole sequences run causally (training; right padding
        is harmless: no position sees one after it)."""
        z = self.fc(torch.cat([self.embed_norm(embeds), features.to(embeds.dtype)], dim=-1))
        if direct is not None:
            z = torch.where(direct_mask[..., None], direct.to(z.dtype), z)
        cos_sin = self.rotary(z, positions)
        return self.layer(
            z,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=cos_sin,
            sparrow_mask=sparrow_mask,
        )

    def save(self, directory) -> Path:
        """Write this draft as a checkpoint directory (see `sparrow.draft.checkpoint`)."""
        from sparrow.draft.checkpoint import save_draft

        return save_draft(self, directory)
