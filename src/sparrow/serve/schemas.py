"""The body of POST /v1/chat/completions: OpenAI's chat format plus a few sparrow fields.

Unknown top-level fields are ignored (OpenAI clients send fields such as `user` or
`stream_options` freely); fields that would change the answer and are not supported
(`n` > 1, `stop`, penalties, logprobs, tools) are refused with 400 instead of ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1


def _utf8(text: str) -> str:
    text.encode("utf-8")  # lone surrogates (legal in JSON escapes) raise here: a 400, not a 500
    return text


class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _encodable(cls, value: str) -> str:
        return _utf8(value)


class VideoURL(BaseModel):
    url: str = Field(description="file:///abs/path.mp4, a plain path under a --media-root, "
                                 "or data:video/mp4;base64,...")


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | VideoPart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _encodable(cls, value):
        return _utf8(value) if isinstance(value, str) else value


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="default 0 (greedy)")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000, description="sparrow: 0 = off")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    stop: str | list[str] | None = Field(default=None, description="not supported: must be empty")
    presence_penalty: float | None = Field(default=None, description="not supported: 0 or absent")
    frequency_penalty: float | None = Field(default=None, description="not supported: 0 or absent")
    logprobs: bool | None = Field(default=None, description="not supported: false or absent")
    tools: list | None = Field(default=None, description="not supported")
    num_frames: int | None = Field(default=None, ge=1, description="sparrow: frames sampled uniformly")
    fps: float | None = Field(default=None, gt=0, le=1000, description="sparrow: sample by rate instead")
