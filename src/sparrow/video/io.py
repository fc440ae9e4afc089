"""Decode video files into sampled RGB frames (PyAV), and write frames back to a file.

Sampling rules (the frame indices refer to the decoded frame order, 0 .. total - 1):

- `num_frames=N`: `np.linspace(0, total - 1, N).round()`, i.e. uniform over the whole video,
  first and last frame included (the rule of transformers' Qwen3-VL video processor). If N is
  larger than the video, some frames repeat so that exactly N frames come back.
- `fps=F`: frame `floor(k * source_fps / F)` for k = 0, 1, ... while it lies inside the video, so
  the sampled frames are `1 / F` seconds apart, starting at the first frame; F above the source
  rate gives every frame once.
- neither: every frame.
- `max_frames=M` caps the result: when more than M frames were selected, M frames are taken
  uniformly (the `num_frames` rule) instead.

Only the selected frames are converted to RGB arrays and kept; every other decoded frame is
dropped at once, so memory grows with the number of sampled frames, not with the video length.
With a `transform` (`processing.decode_resizer`: the model's frame size) each kept frame is
resized as it is decoded, so it grows with the model's frame size, not the video's either.
`probe_video` reads a video's size, frame count and duration from its container, decoding
nothing (to refuse what is too large before paying for it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from sparrow.errors import VideoError

# Failures PyAV raises for files that are not videos or are damaged (FFmpegError covers the
# av.error.* family; OSError covers the rest of what the demuxer reports through the OS layer).
_DECODE_ERRORS = (av.error.FFmpegError, OSError, ValueError)


@dataclass
class VideoClip:
    """Frames sampled from one video, with the facts the prompt and positions need.

    `timestamps[i] = frame_indices[i] / fps`, the convention of transformers' `VideoMetadata`
    (exact for constant-frame-rate video, which is what the reference processors assume too).
    """

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: np.ndarray  # (T,) float64 seconds of each sampled frame from the video start
    fps: float  # average frame rate of the source video
    duration: float  # seconds
    path: str
    frame_indices: np.ndarray | None = None  # (T,) int64 index of each frame in the source
    total_frames: int | None = None  # number of frames in the source video

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled sequence (`len(indices) / total * fps`, as in
        transformers' `VideoMetadata.sampled_fps`); Qwen2.5-VL derives its temporal spacing
        from it."""
        if self.total_frames:
            return self.num_frames / self.total_frames * self.fps
        if self.duration > 0:
            return self.num_frames / self.duration
        return self.fps


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says about it (nothing decoded)."""

    width: int
    height: int
    frames: int | None  # None when the container does not record a count
    fps: float
    duration: float | None  # seconds, None when unrecorded


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """The size, frame count, rate and duration of `path`'s first video stream, from its
    container's metadata. Raises VideoError as `read_video` does for what is not a video."""
    path_str = str(path)
    if not Path(path_str).is_file():
        raise VideoError(f"video file not found: {path_str}; check the path")
    with _open(path_str) as container:
        stream = _video_stream(container, path_str)
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise VideoError(f"{path_str} does not record its frame size; re-encode it "
                             "(ffmpeg -i IN OUT.mp4)")
        fps = _frame_rate(stream, container, path_str)
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        frames = stream.frames if stream.frames and stream.frames > 0 else None
    return VideoInfo(int(width), int(height), frames, fps, duration)


def uniform_indices(total: int, count: int) -> np.ndarray:
    """`count` frame indices spread uniformly over `total` frames, first and last included."""
    return np.linspace(0, total - 1, count).round().astype(np.int64)  # (count,)


def fps_indices(total: int, source_fps: float, fps: float) -> np.ndarray:
    """Indices of frames `1 / fps` seconds apart from the first frame, at most every frame."""
    step = max(source_fps / fps, 1.0)  # source frames per sampled frame
    count = max(1, math.ceil(total / step - 1e-9))
    return np.floor(np.arange(count) * step + 1e-9).astype(np.int64).clip(0, total - 1)  # (count,)


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    transform: Callable[[np.ndarray, int, str], np.ndarray] | None = None,
) -> VideoClip:
    """Decode `path` and return the sampled frames (see the module docstring for the rules).
    `transform(frame, num_frames, path)`, if given, maps each kept (H, W, 3) frame as it is
    decoded (num_frames: how many are sampled).

    Raises VideoError (one line: the file and the fix) for a missing file, a file that is not a
    decodable video, a video without frames, and impossible sampling arguments.
    """
    path_str = str(path)
    _check_sampling_args(path_str, num_frames, fps, max_frames)
    if not Path(path_str).is_file():
        raise VideoError(f"video file not found: {path_str}; check the path")

    with _open(path_str) as container:
        stream = _video_stream(container, path_str)
        source_fps = _frame_rate(stream, container, path_str)
        total = stream.frames if stream.frames and stream.frames > 0 else None
        if total is None:  # the container does not record a frame count: count packets
            total = _count_frames(path_str)
    if total == 0:
        raise VideoError(
            f"{path_str} has no decodable video frames; re-encode it (e.g. ffmpeg -i IN OUT.mp4)"
        )

    indices = _select(total, source_fps, num_frames, fps, max_frames)
    kept, decoded = _decode_selected(path_str, indices, transform)
    if kept.keys() != set(indices.tolist()):
        # The recorded frame count was too high (truncated file or inexact metadata): `decoded`
        # is the true count, so sample again over the frames that really decode.
        if decoded == 0:
            raise VideoError(
                f"{path_str} has no decodable video frames; re-encode it (e.g. ffmpeg -i IN OUT.mp4)"
            )
        total = decoded
        indices = _select(total, source_fps, num_frames, fps, max_frames)
        kept, _ = _decode_selected(path_str, indices, transform)

    frames = np.stack([kept[int(index)] for index in indices])  # (T, H, W, 3) uint8
    return VideoClip(
        frames=frames,
        timestamps=indices / source_fps,
        fps=source_fps,
        duration=total / source_fps,
        path=path_str,
        frame_indices=indices,
        total_frames=total,
    )


def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float = 8, codec: str = "libx264"
) -> Path:
    """Encode `frames` (T, H, W, 3) uint8 RGB to `path` (yuv420p, playable everywhere).

    yuv420p needs even sizes: an odd height or width is padded by repeating the last row or
    column. Returns the path written.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise VideoError(
            f"cannot write {path}: frames must be a non-empty (T, H, W, 3) uint8 array, "
            f"got shape {frames.shape} dtype {frames.dtype}"
        )
    if fps <= 0:
        raise VideoError(f"cannot write {path}: fps must be positive, got {fps}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


def _check_sampling_args(
    path: str, num_frames: int | None, fps: float | None, max_frames: int | None
) -> None:
    if num_frames is not None and fps is not None:
        raise VideoError(f"reading {path}: give num_frames or fps, not both")
    if num_frames is not None and num_frames < 1:
        raise VideoError(f"reading {path}: num_frames must be at least 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise VideoError(f"reading {path}: fps must be positive, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"reading {path}: max_frames must be at least 1, got {max_frames}")


def _open(path: str) -> av.container.InputContainer:
    try:
        return av.open(path)
    except _DECODE_ERRORS as error:
        raise VideoError(
            f"cannot open {path} as a video ({_reason(error)}); pass a video file ffmpeg can "
            "decode (mp4, mkv, webm, avi, ...)"
        ) from error


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError(f"{path} has no video stream; pass a file that contains video")
    return container.streams.video[0]


def _frame_rate(stream, container, path: str) -> float:
    """The average frame rate, from the stream's metadata or, failing that, frames / duration."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if stream.frames and container.duration:
        return stream.frames / (container.duration / av.time_base)
    raise VideoError(f"{path} does not record a frame rate; re-encode it with one (ffmpeg -r)")


def _count_frames(path: str) -> int:
    """Frames in the first video stream, counted from its packets (no decoding)."""
    with _open(path) as container:
        try:
            return sum(1 for packet in container.demux(video=0) if packet.size > 0)
        except _DECODE_ERRORS as error:
            raise VideoError(
                f"{path} is damaged ({_reason(error)}); re-encode or replace it"
            ) from error


def _select(
    total: int, source_fps: float, num_frames: int | None, fps: float | None, max_frames: int | None
) -> np.ndarray:
    if num_frames is not None:
        indices = uniform_indices(total, num_frames)
    elif fps is not None:
        indices = fps_indices(total, source_fps, fps)
    else:
        indices = np.arange(total, dtype=np.int64)
    if max_frames is not None and len(indices) > max_frames:
        indices = uniform_indices(total, max_frames)
    return indices  # (T,) int64, non-decreasing


def _decode_selected(path: str, indices: np.ndarray, transform=None) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in order and keep those at `indices` as (H, W, 3) uint8 RGB arrays.

    Returns the kept frames by index and the number of frames decoded. Decoding stops after the
    last wanted frame; when it ends before that, the count is the video's true length (a decode
    error after the first frame ends the video there, which is how a truncated file reads).
    """
    wanted = set(indices.tolist())
    last_wanted = int(indices.max())
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
                    kept[decoded] = rgb if transform is None else transform(rgb, len(indices), path)
                decoded += 1
                if decoded > last_wanted:
                    break
        except _DECODE_ERRORS as error:
            if decoded == 0:
                raise VideoError(
                    f"{path} is damaged ({_reason(error)}); re-encode or replace it"
                ) from error
    return kept, decoded


def _reason(error: BaseException) -> str:
    """The cause of a PyAV/OS error in a few words (without the file name ffmpeg appends)."""
    reason = getattr(error, "strerror", None) or str(error).strip()
    lines = str(reason).splitlines()
    return lines[0] if lines else type(error).__name__
