"""Build the input ids of a video question, with the placeholder tokens the model fills.

The chat template renders a video as the family's single placeholder ("<|vision_start|>
<|video_pad|><|vision_end|>" for Qwen-VL, "<video>" for LLaVA); the processor then expands the
placeholder token to one token per visual feature. We do the same on token ids:

- Qwen2-VL / Qwen2.5-VL / LLaVA: the placeholder id becomes `num_visual_tokens` copies.
- Qwen3-VL: the placeholder id becomes, for each temporal patch group g,
  `"<{t_g:.1f} seconds>" <|vision_start|> <|video_pad|> * tokens_per_group <|vision_end|>`,
  t_g the mean time of the group's first and last frame (Qwen3VLProcessor.replace_video_token
  and _calculate_timestamps). As in transformers 5.x only the pad token is replaced, so the
  template's own vision_start / vision_end still wrap the whole video.

Splicing ids instead of strings gives the same ids as the reference: special tokens split the
text before the tokenizer's model runs, so a timestamp between two of them tokenizes alone.
"""

from __future__ import annotations

import torch

from sparrow.errors import ConfigError
from sparrow.video.processing import QWEN_FAMILIES, VideoInputs, model_family

VIDEO_PART = {"type": "video"}  # a conversation's video content part (template form)

TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE, VIDEO_TOKEN_TYPE = 1, 2


def video_token_id(model_config) -> int:
    """The id of the token the model replaces with video features."""
    for name in ("video_token_id", "video_token_index"):
        value = getattr(model_config, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(
        f"{model_config.model_type} config names no video token id; set video_token_id in config.json"
    )


def build_video_prompt(
    tokenizer,
    model_config,
    video: VideoInputs | None,
    question: str,
    system: str | None = None,
    chat_template: str | None = None,
) -> torch.Tensor:
    """Input ids (1, L) of one user turn (the video, then `question`) and the generation prompt.

    Uses `chat_template` if given (e.g. a processor's chat_template.json), else the tokenizer's;
    without either, a plain "placeholder\\nquestion" prompt. `video=None` gives a text-only prompt.
    """
    content = ([VIDEO_PART] if video is not None else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return render_chat(tokenizer, model_config, messages, video, chat_template)


def render_chat(
    tokenizer,
    model_config,
    messages: list[dict],
    video: VideoInputs | None,
    chat_template: str | None = None,
) -> torch.Tensor:
    """Input ids (1, L) of `messages` plus the generation prompt.

    `messages` use the template form: {"role": ..., "content": str or a list of
    {"type": "text", "text": ...} / {"type": "video"} parts}; at most one video part, and
    `video` holds its frames (None when there is no video part).
    """
    family = model_family(model_config)
    placeholder_id = video_token_id(model_config)
    video_parts = sum(
        1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p == VIDEO_PART
    )
    if video_parts != (0 if video is None else 1):
        raise ConfigError(f"the conversation holds {video_parts} video parts; give at most one video")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    else:  # build_video_prompt's plain form: the turns' contents, one per line
        placeholder = _placeholder_text(tokenizer, model_config, family)
        pieces = []
        for message in messages:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            pieces += [placeholder if p == VIDEO_PART else p["text"] for p in parts]
        text = "\n".join(pieces)
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    found = ids.count(placeholder_id)
    if found != video_parts:
        raise ConfigError(
            f"the prompt holds {found} video placeholder tokens, expected {video_parts}; "
            "keep the model's video token out of the text"
        )
    if video is not None:
        at = ids.index(placeholder_id)
        ids = (
            ids[:at]
            + _video_tokens(tokenizer, model_config, family, video, placeholder_id)
            + ids[at + 1 :]
        )
    return torch.tensor([ids], dtype=torch.long)  # (1, L)


def mm_token_type_ids(input_ids: torch.Tensor, model_config) -> torch.Tensor:
    """(B, L) int64 modality of each token: 0 text, 1 image, 2 video (Qwen-VL's forward and
    get_rope_index need it)."""
    types = (input_ids == video_token_id(model_config)).to(torch.long) * VIDEO_TOKEN_TYPE
    image_id = getattr(model_config, "image_token_id", None)
    if image_id is not None:
        types[input_ids == image_id] = IMAGE_TOKEN_TYPE
    return types  # (B, L)


def qwen3_group_timestamps(frame_timestamps: list[float], temporal_patch_size: int) -> list[float]:
    """One time per temporal patch group: pad with the last frame's time to a multiple of the
    group size, then average each group's first and last time (Qwen3VLProcessor)."""
    times = list(frame_timestamps)
    if remainder := len(times) % temporal_patch_size:
        times.extend(times[-1] for _ in range(temporal_patch_size - remainder))
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2
        for i in range(0, len(times), temporal_patch_size)
    ]


def _placeholder_text(tokenizer, model_config, family: str) -> str:
    """What the family's chat templates render for a video part."""
    pad = tokenizer.convert_ids_to_tokens(video_token_id(model_config))
    if family in QWEN_FAMILIES:
        start = tokenizer.convert_ids_to_tokens(model_config.vision_start_token_id)
        end = tokenizer.convert_ids_to_tokens(model_config.vision_end_token_id)
        return f"{start}{pad}{end}"
    return pad


def _video_tokens(
    tokenizer, model_config, family: str, video: VideoInputs, placeholder_id: int
) -> list[int]:
    """The ids that replace the single placeholder token."""
    if family != "qwen3_vl":
        return [placeholder_id] * video.num_visual_tokens
    grid_t = int(video.video_grid_thw[0, 0])
    per_group = video.num_visual_tokens // grid_t
    temporal_patch_size = model_config.vision_config.temporal_patch_size
    start, end = model_config.vision_start_token_id, model_config.vision_end_token_id
    group_times = qwen3_group_timestamps(video.frame_timestamps, temporal_patch_size)
    if len(group_times) != grid_t:
        raise ConfigError(
            f"the video has {len(video.frame_timestamps)} frame timestamps but {grid_t} temporal groups; "
            "build VideoInputs with preprocess_video"
        )
    ids: list[int] = []
    for seconds in group_times:
        ids += tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"]
        ids += [start] + [placeholder_id] * per_group + [end]
    return ids
