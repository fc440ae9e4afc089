"""The target adapter: one object per loaded video LLM, over the UNMODIFIED transformers model.

An adapter owns everything about the target that the decoding loop must not know: how the
model wants its video inputs, its position scheme (1-D RoPE or Qwen's M-RoPE), its KV cache
(preallocated, in place) and which positions are visual. The loop sees four operations:

    prefill(input_ids, video)        -> PrefillOutput   (fills the cache with the prompt)
    forward(tokens, depths, mask)    -> StepOutput      (appends q tokens: AR step or tree)
    keep(offsets)                    -> None            (keep the accepted path of the last forward)
    truncate(length)                 -> None            (roll the cache back)

Positions of appended tokens are `next_position + depth`, where `next_position` is the
rotary position the next committed token takes (cache length for 1-D RoPE, cache length +
rope_deltas for M-RoPE). Hidden states returned are the last hidden state after the final
norm: the feature that feeds lm_head, which is what the draft consumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from sparrow.errors import CheckpointError
from sparrow.runtime.attention import TreeMask, register
from sparrow.runtime.cache import StaticKVCache
from sparrow.runtime.linear import pack_linears, unpack_linears
from sparrow.video.prompt import video_token_id

if TYPE_CHECKING:
    from sparrow.video.processing import VideoInputs


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # (V,) float32: next-token logits after the prompt
    hidden: torch.Tensor  # (L, d): last hidden state at every prompt position
    visual_mask: torch.Tensor  # (L,) bool: True at visual-token positions
    input_ids: torch.Tensor  # (L,) int64: the prompt, placeholders included
    # layer m -> (L, d) hidden state after m decoder layers (0: the input embeddings, the
    # projector's output at visual positions), for the layers `prefill(layers=...)` asked for
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class PrefixState:
    """A prompt's prefilled state, kept to answer a later prompt that starts the same way
    (a follow-up question about the same video) without prefilling the video again."""

    input_ids: torch.Tensor  # (P,) int64
    keys: list[torch.Tensor]  # per layer (1, kv_heads, P, head_dim)
    values: list[torch.Tensor]  # per layer (1, kv_heads, P, head_dim)
    hidden: torch.Tensor  # (P, d) last hidden states (what the draft is started from)
    visual_mask: torch.Tensor  # (P,) bool
    position_offset: float  # rotary position of cache slot i is i + position_offset
    video_fingerprint: str | None = None  # content hash of the video's pixel inputs
    # layer m -> (P, d), the prompt's `prefill(layers=...)` states (a draft that reads them)
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.hidden, self.input_ids, self.visual_mask,
                   *self.layer_hidden.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def common_length(self, input_ids: torch.Tensor) -> int:
        """Length of the common prefix of `input_ids` (L,) and this state's prompt, at most
        L - 1 (the last prompt token must run: its logits choose the first answer token)."""
        ids = input_ids.reshape(-1).to(self.input_ids.device)
        n = min(ids.shape[0] - 1, self.input_ids.shape[0])
        if n <= 0:
            return 0
        differs = (ids[:n] != self.input_ids[:n]).nonzero()
        return int(differs[0]) if differs.numel() else n


@dataclass
class StepOutput:
    logits: torch.Tensor  # (q, V) float32
    hidden: torch.Tensor  # (q, d)


class TargetAdapter:
    """Base adapter. Subclasses say how the family builds prompt positions and video inputs."""

    family: str = ""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer=None,
        processor_config: dict | None = None,
        name: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.processor_config = processor_config
        self.name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self._was_training = model.training
        self._attention = self.text_config._attn_implementation
        self._adapt()
        self.num_layers: int = self.text_config.num_hidden_layers
        self.hidden_size: int = self.text_config.hidden_size
        self.vocab_size: int = self.text_config.vocab_size
        self.cache: StaticKVCache | None = None
        # rotary position of cache slot i is i + position_offset (int for integer schemes; a
        # float for LLaVA models with a fractional video position step, see targets.llava)
        self.position_offset: float = 0
        self.prompt: PrefillOutput | None = None  # the last prefilled prompt
        self._prompt_video: str | None = None  # fingerprint of its video

    # ---- what wrapping changes on the model, and undoing it ------------------------------
    def _adapt(self) -> None:
        """The three changes decoding needs (see `wrap_model`): eval mode; the language
        model's attention through the tree-aware kernel (the vision tower keeps its own); CPU
        fp32 linears through oneDNN's packed kernels (`sparrow.runtime.linear`: same
        parameters and state_dict, same results to fp32 rounding)."""
        self.model.eval()
        self.text_config._attn_implementation = register()
        pack_linears(self.model)

    def unwrap(self) -> PreTrainedModel:
        """Undo what wrapping changed on the model (attention implementation, packed linears,
        eval mode) and return it as it was given. The adapter must not decode afterwards."""
        unpack_linears(self.model)
        self.text_config._attn_implementation = self._attention
        self.model.train(self._was_training)
        return self.model

    @contextmanager
    def unwrapped(self) -> Iterator[PreTrainedModel]:
        """The model as it was given, for the duration of a `with` block (e.g. to run
        transformers' own `generate` on it); the adapter's changes come back after."""
        try:
            yield self.unwrap()
        finally:
            self._adapt()

    # ---- family hooks -------------------------------------------------------------------
    def video_token_id(self) -> int:
        """The placeholder token the model fills with video features."""
        return video_token_id(self.config)

    def _prompt_positions(
        self, input_ids: torch.Tensor, video: VideoInputs | None
    ) -> tuple[torch.Tensor, float]:
        """Positions of the prompt ((1, L) or (3, 1, L)) and the offset of later text tokens."""
        raise NotImplementedError

    def _prefill_kwargs(self, input_ids: torch.Tensor, video: VideoInputs | None) -> dict:
        return {} if video is None else self._video_kwargs(video)

    def _video_kwargs(self, video: VideoInputs) -> dict:
        """The video's forward arguments, on the model's device."""
        return {key: value.to(self.device) for key, value in video.model_kwargs().items()}

    # ---- properties ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    @property
    def next_position(self) -> float:
        return self.cache_length + self.position_offset

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.text_config.eos_token_id
        if ids is None:
            return []
        return [ids] if isinstance(ids, int) else list(ids)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the target (frozen; the draft shares them)."""
        return self.model.get_input_embeddings()(token_ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from last hidden states (the draft shares the target's head)."""
        return self.model.get_output_embeddings()(hidden)

    # ---- operations ---------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        video: VideoInputs | None = None,
        capacity: int = 0,
        layers: tuple[int, ...] = (),
        prefix: PrefixState | None = None,
    ) -> PrefillOutput:
        """Run the prompt (with its video) through the target into a fresh cache.

        input_ids: (1, L) or (L,). `capacity` extra cache slots are reserved for generated and
        tree tokens. `layers` (m, ...) asks for the hidden states after m decoder layers (0: the
        input embeddings), for drafts that see visual positions through them and for training.
        `prefix`: a state from `snapshot()`; when it covers the start of this prompt (video
        included), only the rest of the prompt runs, over a copy of its cached keys/values.
        Pass the video too when you have it: a prefix made from other pixels is then refused
        (without the video, the caller vouches that the prefix holds the same one). With
        `layers`, the prefix is used only if it holds those layers' states (a prefill with
        at least those `layers`); otherwise the whole prompt runs.
        """
        input_ids = input_ids.reshape(1, -1).to(self.device)
        length = input_ids.shape[1]
        if prefix is not None:
            reused = prefix.common_length(input_ids[0])
            visual = (input_ids[0] == self.video_token_id()).nonzero()
            if visual.numel() and int(visual[-1]) >= reused:
                reused = 0  # the video itself differs or is not all cached: prefill it all
            if video is not None and video_fingerprint(video) != prefix.video_fingerprint:
                reused = 0  # same token layout, other pixels
            if not set(layers) <= set(prefix.layer_hidden):
                reused = 0  # the states a draft reads were not kept: compute them
            if reused:
                return self._prefill_from(prefix, reused, input_ids, capacity, layers)
        self.cache = StaticKVCache(self.num_layers, length + capacity)
        position_ids, self.position_offset = self._prompt_positions(input_ids, video)
        captured: dict[int, torch.Tensor] = {}
        handles = [self._capture_layer_output(m, captured) for m in sorted(set(layers))]
        try:
            out = self.model.model(
                input_ids=input_ids,
                position_ids=position_ids.to(self.device),
                cache=self.cache,
                use_cache=True,
                **self._prefill_kwargs(input_ids, video),
            )
        finally:
            for handle in handles:
                handle.remove()
        hidden = out.last_hidden_state[0]  # (L, d)
        logits = self.lm_head(hidden[-1:]).float()[0]  # (V,)
        video_id = self.video_token_id()
        self.prompt = PrefillOutput(
            logits=logits,
            hidden=hidden,
            visual_mask=(input_ids[0] == video_id),
            input_ids=input_ids[0],
            layer_hidden=captured,
        )
        self._prompt_video = None if video is None else video_fingerprint(video)
        return self.prompt

    def _prefill_from(
        self, prefix: PrefixState, reused: int, input_ids: torch.Tensor, capacity: int,
        layers: tuple[int, ...] = (),
    ) -> PrefillOutput:
        """Restore the first `reused` prompt positions from `prefix`, run the rest."""
        length = input_ids.shape[1]
        self.cache = StaticKVCache(self.num_layers, length + capacity)
        for layer, keys, values in zip(self.cache.layers, prefix.keys, prefix.values, strict=True):
            layer.lazy_initialization(keys, values)
            layer.update(keys[:, :, :reused], values[:, :, :reused])
        self.position_offset = prefix.position_offset
        captured: dict[int, torch.Tensor] = {}
        handles = [self._capture_layer_output(m, captured) for m in sorted(set(layers))]
        try:
            rest = self.forward(input_ids[0, reused:])  # causal over the restored prefix
        finally:
            for handle in handles:
                handle.remove()
        self._prompt_video = prefix.video_fingerprint
        self.prompt = PrefillOutput(
            logits=rest.logits[-1],
            hidden=torch.cat([prefix.hidden[:reused], rest.hidden]),
            visual_mask=input_ids[0] == self.video_token_id(),
            input_ids=input_ids[0],
            layer_hidden={m: torch.cat([prefix.layer_hidden[m][:reused], captured[m]]) for m in captured},
        )
        return self.prompt

    def snapshot(self) -> PrefixState:
        """A copy of the last prompt's prefilled state (call after prefill or generate: the
        prompt's cache slots are never overwritten by decoding)."""
        if self.prompt is None:
            raise RuntimeError("snapshot() needs a prefill first")
        length = self.prompt.input_ids.shape[0]
        return PrefixState(
            input_ids=self.prompt.input_ids.clone(),
            keys=[layer.key_buffer[:, :, :length].clone() for layer in self.cache.layers],
            values=[layer.value_buffer[:, :, :length].clone() for layer in self.cache.layers],
            hidden=self.prompt.hidden.clone(),
            visual_mask=self.prompt.visual_mask.clone(),
            position_offset=self.position_offset,
            video_fingerprint=self._prompt_video,
            layer_hidden={m: h.clone() for m, h in self.prompt.layer_hidden.items()},
        )

    def _capture_layer_output(self, layer: int, store: dict[int, torch.Tensor]):
        """Record in store[layer] the hidden state after `layer` decoder layers (0: the input
        embeddings) of the next forward; returns the hook's handle."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}], got {layer}")
        layers = self.model.model.language_model.layers
        if layer == 0:
            def hook(module, args, kwargs, output):
                store[0] = (kwargs.get("hidden_states", args[0] if args else None))[0]
            return layers[0].register_forward_hook(hook, with_kwargs=True)

        def hook_out(module, args, kwargs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            store[layer] = tensor[0]
        return layers[layer - 1].register_forward_hook(hook_out, with_kwargs=True)

    @torch.no_grad()
    def forward(
        self,
        token_ids: torch.Tensor,
        depths: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
    ) -> StepOutput:
        """Append q tokens after the cache and return their logits and hidden states.

        token_ids: (q,). depths: (q,) position of each token relative to `next_position`
        (default 0..q-1, a chain). tree_mask: (q, q) bool, True where token i may see token j
        (default causal). The cache keeps all q; call `keep` to retain the accepted path.
        """
        if self.cache is None:
            raise RuntimeError("prefill() must run before forward()")
        q = token_ids.shape[0]
        if depths is None:
            depths = torch.arange(q)
        positions = (depths.to(self.device) + self.next_position)[None]  # (1, q)
        sparrow_mask = None
        if q > 1:
            if tree_mask is None:
                tree_mask = torch.ones(q, q, dtype=torch.bool).tril()
            sparrow_mask = TreeMask(tree_mask.to(self.device), self.cache_length + q, self.dtype)
        out = self.model.model(
            input_ids=token_ids.reshape(1, q).to(self.device),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            sparrow_mask=sparrow_mask,
        )
        hidden = out.last_hidden_state[0]  # (q, d)
        return StepOutput(logits=self.lm_head(hidden).float(), hidden=hidden)

    def keep(self, start: int, offsets: torch.Tensor) -> None:
        """Keep cache positions `start + offsets` (the accepted path) and drop the others."""
        self.cache.keep(start, offsets)

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)


def video_fingerprint(video: VideoInputs) -> str:
    """Content hash of a video's model inputs (pixels and grid), for prefix reuse."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in sorted(video.model_kwargs().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_processor_config(directory: Path) -> dict | None:
    """The checkpoint's preprocessing settings (video processor first), if it ships any."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = directory / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise CheckpointError(
                    f"{path}: not valid JSON ({error}); fix or remove it"
                ) from error
    return None
