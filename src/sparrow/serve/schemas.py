"""The body of POST /v1/chat/completions: OpenAI's chat format plus a few sparrow fields.

Validated strictly (`max_tokens: "5"` or `true`, `stream: "yes"` are type errors, not
coerced). Top-level fields outside this model are refused with 400, except IGNORED_FIELDS,
which OpenAI clients send freely and which cannot change the answer; fields modelled here
but not supported in every form (penalties, tools, echo, suffix) are refused by the
request's checks (prepare.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparrow.speculative.generate import MAX_LOGPROBS
from sparrow.speculative.sampling import MIN_TEMPERATURE

MAX_SEED = 2**63 - 1
MAX_CHOICES = 16  # n: answers generated one after another, each as long as max_tokens allows

# Accepted and ignored: metadata about the caller or the response's storage.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                            "prompt_cache_key", "parallel_tool_calls"})


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class VideoURL(BaseModel):
    url: str = Field(description="file:///abs/path.mp4, a plain path under a --media-root, "
                                 "or data:video/mp4;base64,...")


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


class ImageURL(BaseModel):
    url: str = Field(description="data:image/png;base64,... or a path under a --media-root; an "
                                 "image is read as a one-frame video")
    detail: Literal["auto", "low", "high"] | None = Field(default=None, description="accepted, ignored")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | VideoPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints share: the model, the decoding settings, the stops."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="default 0 (greedy)")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000, description="sparrow: 0 = off")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES, description="answers to generate; "
                          "with a seed, choice i samples with seed + i")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the answer ends "
                                       "before the first one")
    stop_token_ids: list[int] | None = Field(default=None, description="sparrow (as vLLM): tokens that "
                                             "end the answer, excluded from its text")
    presence_penalty: float | None = Field(default=None, description="not supported: 0 or absent")
    frequency_penalty: float | None = Field(default=None, description="not supported: 0 or absent")

    @field_validator("temperature")
    @classmethod
    def _samplable(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"{value:g} is too small to sample with: use 0 for greedy decoding "
                             f"or at least {MIN_TEMPERATURE:g}")
        return value


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, description="the target's log-probability of each "
                                  "answer token (raw: before temperature, top-k, top-p)")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                     description="with logprobs: this many most likely tokens a position")
    tools: list | None = Field(default=None, description="not supported")
    num_frames: int | None = Field(default=None, ge=1, description="sparrow: frames sampled uniformly")
    fps: float | None = Field(default=None, gt=0, le=1000, description="sparrow: sample by rate instead")


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: a plain prompt, continued as it is (no chat template)."""

    prompt: str | list[str] = Field(description="the text to continue (a list: exactly one string)")
    max_tokens: int | None = Field(default=None, ge=1, description="default 16, as OpenAI's")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="the target's "
                                 "log-probability of each answer token and of this many most "
                                 "likely tokens a position (raw: before temperature, top-k, top-p)")
    echo: bool = Field(default=False, description="not supported: false")
    suffix: str | None = Field(default=None, description="not supported: absent")
    best_of: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
