"""A chat request turned into the engine's inputs: unsupported options and the server's
limits refused (400), the video read and preprocessed, the conversation rendered to prompt
ids, the sampling settings filled in. Runs on a worker thread: video decoding must not block
the event loop.

The frame sampling, prompt ids and sampling defaults are those of `sparrow.api.answer`, so
the server's answer equals `sparrow generate`'s for the same video, question and settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from sparrow.errors import SparrowError
from sparrow.serve.errors import ApiError
from sparrow.serve.media import video_file
from sparrow.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from sparrow.speculative.sampling import GREEDY, SamplingParams
from sparrow.targets import TargetAdapter
from sparrow.video.io import probe_video, read_video
from sparrow.video.processing import VideoInputs, count_visual_tokens, decode_resizer, preprocess_video
from sparrow.video.prompt import VIDEO_PART, render_chat, video_token_id

if TYPE_CHECKING:  # app.py imports this module: the settings type is for annotations only
    from sparrow.serve.app import ServeSettings


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    input_ids: object  # (1, L) torch.long
    video: VideoInputs | None
    video_key: str | None  # the prefix cache's key: video digest + frame settings
    max_new_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...] = ()  # the answer ends before the first of these strings
    stop_token_ids: tuple[int, ...] = ()  # ...or before one of these tokens
    n: int = 1  # answers (choices)
    logprobs: int | None = None  # alternatives a token, when logprobs are asked for


def prepare_request(req: ChatCompletionRequest | CompletionRequest, target: TargetAdapter,
                    settings: ServeSettings) -> Prepared:
    """Raises ApiError (the checks here), MediaError (where the video comes from) or
    SparrowError (the target refusing the prompt)."""
    if isinstance(req, CompletionRequest):
        return _prepare_prompt(req, target, settings)
    max_new_tokens, num_frames = _check_options(req, settings)
    messages, video_url, image = _template_messages(req)
    if image:  # an image is a one-frame video
        if req.num_frames is not None or req.fps is not None:
            raise ApiError(400, "num_frames and fps apply to videos, not to an image", param="num_frames")
        num_frames = 1
    if not getattr(target.tokenizer, "chat_template", None) and [m["role"] for m in messages] != ["user"]:
        raise ApiError(400, "this model has no chat template, so it cannot tell system, assistant "
                            "and user turns apart: send one user message", param="messages")
    video, video_key = None, None
    if video_url is not None:
        video, video_key = _read_video(video_url, req, num_frames, target, settings, image)
    input_ids = render_chat(target.tokenizer, target.config, messages, video)
    return _prepared(req, target, input_ids, video, video_key, max_new_tokens)


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def _prepare_prompt(req: CompletionRequest, target: TargetAdapter, settings: ServeSettings) -> Prepared:
    """A plain prompt, tokenized as it is (the tokenizer's own special tokens, no template)."""
    _check_common(req)
    for name, value, allowed in (("echo", req.echo, False), ("suffix", req.suffix, None)):
        if value != allowed:
            raise ApiError(400, f"{name} is not supported", param=name)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1 or not prompts[0]:
        raise ApiError(400, "prompt: one non-empty string (a batch of prompts is not supported)",
                       param="prompt")
    max_new_tokens = req.max_tokens or min(DEFAULT_COMPLETION_TOKENS, settings.max_tokens)
    if max_new_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens {max_new_tokens} is over this server's limit of "
                            f"{settings.max_tokens}", param="max_tokens")
    ids = target.tokenizer(prompts[0])["input_ids"]
    placeholder = video_token_id(target.config)
    if placeholder in ids:
        raise ApiError(400, "the prompt holds the model's video token; keep it out of the text",
                       param="prompt")
    return _prepared(req, target, torch.tensor([ids], dtype=torch.long), None, None, max_new_tokens)


def _prepared(req: GenerationRequest, target: TargetAdapter, input_ids, video, video_key,
              max_new_tokens: int) -> Prepared:
    """The checks and settings both endpoints share: context, sampling, stops."""
    context = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if context and input_ids.shape[1] + max_new_tokens > context:
        raise ApiError(400, f"the prompt ({input_ids.shape[1]} tokens) plus max_tokens "
                            f"({max_new_tokens}) exceeds the model's context of {context} tokens")
    given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
             "seed": req.seed}  # the rest keep sparrow's defaults (greedy), as on the CLI
    sampling = replace(GREEDY, **{name: value for name, value in given.items() if value is not None})
    stops, stop_token_ids = _stops(req, target)
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    return Prepared(input_ids, video, video_key, max_new_tokens, sampling, stops, stop_token_ids,
                    n=req.n or 1, logprobs=logprobs)


MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


def _stops(req: GenerationRequest, target: TargetAdapter) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS or any(not stop or len(stop) > MAX_STOP_CHARS for stop in stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings of at most "
                            f"{MAX_STOP_CHARS} characters", param="stop")
    ids = list(req.stop_token_ids or [])
    if len(ids) > 64 or any(not 0 <= token < target.vocab_size for token in ids):
        raise ApiError(400, f"stop_token_ids: at most 64 token ids in [0, {target.vocab_size})",
                       param="stop_token_ids")
    return tuple(stops), tuple(ids)


def _check_common(req: GenerationRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported (the answer is the target's own)", param=name)


def _check_options(req: ChatCompletionRequest, settings: ServeSettings) -> tuple[int, int | None]:
    """Refuse what would change the answer unasked and what is over the server's limits;
    returns (max_new_tokens, num_frames), num_frames None when the request samples by fps."""
    _check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.tools:
        raise ApiError(400, "tools are not supported", param="tools")
    max_new_tokens = req.max_completion_tokens or req.max_tokens or settings.max_tokens
    if max_new_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens {max_new_tokens} is over this server's limit of "
                            f"{settings.max_tokens}", param="max_tokens")
    if req.num_frames is not None and req.fps is not None:
        raise ApiError(400, "give num_frames or fps, not both", param="num_frames")
    num_frames = req.num_frames if req.fps is None else None
    if num_frames is None and req.fps is None:
        num_frames = settings.num_frames
    if num_frames is not None and num_frames > settings.max_frames:
        raise ApiError(400, f"num_frames {num_frames} is over this server's limit of "
                            f"{settings.max_frames}", param="num_frames")
    return max_new_tokens, num_frames


def _template_messages(req: ChatCompletionRequest) -> tuple[list[dict], str | None, bool]:
    """The messages in chat-template form, the url of the (at most one) video or image part,
    and whether it is an image."""
    messages, video_url, image = [], None, False
    for index, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if not content:
            raise ApiError(400, f"messages[{index}].content is empty: give text or a video",
                           param="messages")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = []
            for part in content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                if role != "user":
                    raise ApiError(400, f"messages[{index}]: a video or image can only be in a user "
                                        "message", param="messages")
                if video_url is not None:
                    raise ApiError(400, "only one video or image per request is supported",
                                   param="messages")
                image = part.type == "image_url"
                video_url = part.image_url.url if image else part.video_url.url
                parts.append(VIDEO_PART)
        if role == "user":
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": "".join(p["text"] for p in parts)})
    return messages, video_url, image


def _read_video(video_url: str, req: ChatCompletionRequest, num_frames: int | None,
                target: TargetAdapter, settings: ServeSettings,
                image: bool = False) -> tuple[VideoInputs, str]:
    """The video's (or image's: one frame) model inputs and its prefix-cache key, within the
    frame and visual-token limits."""
    kind = "image" if image else "video"
    with video_file(video_url, settings.media_roots, settings.max_upload_bytes, kind) as (path, digest):
        label = f"the uploaded {kind}" if video_url.startswith("data:") else video_url
        try:
            info = probe_video(path)  # the container's word, before decoding anything
            if info.width * info.height > settings.max_video_pixels:
                raise ApiError(400, f"{label}: {info.width}x{info.height} frames are over this "
                                    f"server's limit of {settings.max_video_pixels} pixels a frame; "
                                    "scale the video down", param="messages")
            # Each frame is scaled to the model's size as it is decoded; with fps, one frame
            # over the limit is read to tell "too many" from "just enough".
            clip = read_video(path, num_frames=num_frames, fps=req.fps,
                              max_frames=None if req.fps is None else settings.max_frames + 1,
                              transform=decode_resizer(target.config, target.processor_config))
        except SparrowError as error:  # name the video as the client did, not our path
            raise ApiError(400, str(error).replace(str(path), label), param="messages") from error
        if clip.num_frames > settings.max_frames:
            raise ApiError(400, f"fps {req.fps:g} samples more than this server's limit of "
                                f"{settings.max_frames} frames; lower fps", param="fps")
        height, width = clip.frames.shape[1:3]
        tokens = count_visual_tokens(target.config, target.processor_config, clip.num_frames,
                                     height, width)
        if tokens > settings.max_visual_tokens:
            raise ApiError(400, f"the video needs {tokens} visual tokens, over this server's "
                                f"limit of {settings.max_visual_tokens}; ask for fewer frames",
                           param="num_frames")
        video = preprocess_video(clip, target.config, target.processor_config, dtype=target.dtype)
    return video, f"{digest}:frames={num_frames}:fps={req.fps}"
