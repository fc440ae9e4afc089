"""The Sparrow draft head (METHOD.md section 2): one decoder layer over target features.

    z_t = FC([RMSNorm(Emb(x_{t+1})) ; h_t])        FC: 2d -> d, with bias
    o_t = DecoderLayer(z_t)                          no input norm (EAGLE), no final norm
    logits_{t+2} = lm_head(o_t)                      o_t stands in for h_{t+1} deeper in a tree

Emb and lm_head are the target's, frozen, passed in at call time and never saved with the
draft. The decoder layer is transformers' own LlamaDecoderLayer (SwiGLU MLP, 1-D RoPE) with
its input norm removed; its attention runs through the same tree-aware kernel as the target.

Attention modes decide which positions of the target's sequence the draft sees:
  sparrow  text only (VATA): visual positions never enter the draft's inputs or cache, and
           positions are renumbered contiguously over the text;
  eagle    every position (the EAGLE-full baseline: the draft's cache grows with the video).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from sparrow.decoding.attention import TreeMask, register
from sparrow.decoding.cache import StaticKVCache
from sparrow.errors import CheckpointError

MODES = ("sparrow", "eagle")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
    mode: str = "sparrow"
    mid_layer: int | None = None  # m* for IVSB training: hidden state after m target layers

    def __post_init__(self):
        if self.mode not in MODES:
            raise CheckpointError(f"draft mode {self.mode!r} unknown; choose one of {MODES}")

    @classmethod
    def for_target(cls, target, mode: str = "sparrow") -> DraftConfig:
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
            mid_layer=text.num_hidden_layers // 2,
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

    @property
    def mode(self) -> str:
        return self.config.mode

    def new_cache(self, capacity: int) -> StaticKVCache:
        return StaticKVCache(num_layers=1, max_length=capacity)

    def forward(
        self,
        embeds: torch.Tensor,  # (1, n, d): target embeddings of the next tokens x_{t+1}
        features: torch.Tensor,  # (1, n, d): h_t (target) or the draft's own earlier outputs
        positions: torch.Tensor,  # (1, n) int64: the draft's own 1-D positions
        cache: StaticKVCache,
        sparrow_mask: TreeMask | None = None,  # see attention.py
    ) -> torch.Tensor:  # (1, n, d)
        z = self.fc(torch.cat([self.embed_norm(embeds), features.to(embeds.dtype)], dim=-1))
        cos_sin = self.rotary(z, positions)
        return self.layer(
            z,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            position_embeddings=cos_sin,
            sparrow_mask=sparrow_mask,
        )

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return directory


def init_draft(target, mode: str = "sparrow", seed: int = 0) -> DraftModel:
    """A randomly initialised draft shaped for `target` (reproducible from `seed`)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        draft = DraftModel(DraftConfig.for_target(target, mode))
        std = 0.02
        for module in draft.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    finally:
        torch.random.set_rng_state(generator_state)
    return draft.to(device=target.device, dtype=target.dtype).eval()


def check_compatible(config: DraftConfig, target, source: str = "draft") -> None:
    """Refuse a draft built for another target, naming both."""
    text = target.text_config
    problems = []
    if config.target_model_type != target.config.model_type:
        problems.append(f"model type {config.target_model_type} vs {target.config.model_type}")
    if config.hidden_size != text.hidden_size:
        problems.append(f"hidden size {config.hidden_size} vs {text.hidden_size}")
    if config.vocab_size != text.vocab_size:
        problems.append(f"vocabulary {config.vocab_size} vs {text.vocab_size}")
    if problems:
        raise CheckpointError(
            f"draft {source} does not fit target {target.name}: " + "; ".join(problems)
            + " (draft vs target). Use a draft made for this target "
            "(sparrow draft-init --target ... or sparrow train)."
        )


def load_draft(directory: str | Path, target, mode: str | None = None) -> DraftModel:
    """Load a draft checkpoint directory for `target`; `mode` overrides the saved mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"--draft {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE} there; "
            "create one with `sparrow draft-init --target T --out DIR`"
        )
    try:
        raw = json.loads(config_path.read_text())
        known = {f.name for f in fields(DraftConfig)}
        config = DraftConfig(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"--draft {directory}: malformed {CONFIG_FILE} ({error})") from error
    check_compatible(config, target, source=str(directory))
    if mode is not None:
        config.mode = mode
        config.__post_init__()
    draft = DraftModel(config)
    try:
        state = load_file(str(weights_path))
        draft.load_state_dict(state, strict=True)
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"--draft {directory}: cannot load weights ({error})") from error
    return draft.to(device=target.device, dtype=target.dtype).eval()
