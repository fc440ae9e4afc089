"""Decoding and sampling real (small) video files written with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from sparrow.errors import SparrowError, VideoError
from sparrow.video.io import VideoClip, read_video, write_video

NUM_FRAMES, FPS = 20, 10.0
LEVEL_STEP = 12  # frame i is a flat gray image of level i * LEVEL_STEP


def gray_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    levels = np.arange(count, dtype=np.uint8) * LEVEL_STEP
    return np.broadcast_to(levels[:, None, None, None], (count, height, width, 3)).copy()


def frame_numbers(clip: VideoClip) -> np.ndarray:
    """Which source frame each sampled frame is, read back from its gray level."""
    return np.round(clip.frames[:, 8:24, 8:40].mean(axis=(1, 2, 3)) / LEVEL_STEP).astype(int)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("videos") / "gray.mp4"
    return str(write_video(path, gray_frames(NUM_FRAMES), fps=FPS))


def test_num_frames_samples_uniformly_over_the_whole_video(video_path):
    clip = read_video(video_path, num_frames=5)
    expected = np.linspace(0, NUM_FRAMES - 1, 5).round().astype(int)  # [0, 5, 10, 14, 19]
    assert clip.frames.shape == (5, 32, 48, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_array_equal(clip.frame_indices, expected)
    np.testing.assert_array_equal(frame_numbers(clip), expected)
    np.testing.assert_allclose(clip.timestamps, expected / FPS)
    assert clip.fps == FPS and clip.total_frames == NUM_FRAMES
    assert clip.duration == pytest.approx(NUM_FRAMES / FPS)
    assert clip.path == video_path


def test_fps_sampling_spaces_frames_by_one_over_fps(video_path):
    clip = read_video(video_path, fps=2.5)
    np.testing.assert_array_equal(clip.frame_indices, [0, 4, 8, 12, 16])
    np.testing.assert_array_equal(frame_numbers(clip), [0, 4, 8, 12, 16])
    np.testing.assert_allclose(clip.timestamps, [0.0, 0.4, 0.8, 1.2, 1.6])
    assert clip.sampled_fps == pytest.approx(2.5)


def test_fps_above_the_source_rate_gives_every_frame_once(video_path):
    clip = read_video(video_path, fps=100)
    np.testing.assert_array_equal(clip.frame_indices, np.arange(NUM_FRAMES))


def test_max_frames_caps_by_uniform_resampling(video_path):
    assert len(read_video(video_path).frames) == NUM_FRAMES
    clip = read_video(video_path, fps=10, max_frames=4)
    np.testing.assert_array_equal(clip.frame_indices, [0, 6, 13, 19])


def test_more_frames_than_the_video_repeats_frames(video_path):
    clip = read_video(video_path, num_frames=NUM_FRAMES + 5)
    assert len(clip.frames) == NUM_FRAMES + 5
    np.testing.assert_array_equal(frame_numbers(clip), clip.frame_indices)


def test_container_without_frame_count_is_counted(tmp_path):
    path = write_video(tmp_path / "gray.mkv", gray_frames(12), fps=6)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska records no frame count
    clip = read_video(path, num_frames=4)
    assert clip.total_frames == 12
    np.testing.assert_array_equal(frame_numbers(clip), [0, 4, 7, 11])


def test_write_video_pads_odd_sizes_for_yuv420p(tmp_path):
    clip = read_video(write_video(tmp_path / "odd.mp4", gray_frames(3, 31, 45), fps=8))
    assert clip.frames.shape == (3, 32, 46, 3)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.mp4"
    with pytest.raises(VideoError, match="not found") as error:
        read_video(path, num_frames=4)
    assert str(path) in str(error.value)


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n")
    with pytest.raises(VideoError, match="cannot open") as error:
        read_video(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_mp4(tmp_path, video_path):
    data = Path(video_path).read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError) as error:
        read_video(path, num_frames=4)
    assert str(path) in str(error.value)


def test_truncated_mp4_with_its_index_up_front_samples_the_frames_that_decode(tmp_path):
    """A faststart mp4 (index first) cut short still opens and claims all its frames."""
    frames = np.random.default_rng(0).integers(0, 40, (NUM_FRAMES, 32, 48, 3), dtype=np.uint8)
    frames += (np.arange(NUM_FRAMES, dtype=np.uint8) * 10)[:, None, None, None]
    whole = tmp_path / "faststart.mp4"
    with av.open(str(whole), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt = 32, 48, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = whole.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) * 6 // 10])
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == NUM_FRAMES
    clip = read_video(path, num_frames=4)
    assert 1 < clip.total_frames < NUM_FRAMES
    np.testing.assert_array_equal(
        clip.frame_indices, np.linspace(0, clip.total_frames - 1, 4).round().astype(int)
    )
    levels = np.round((clip.frames.mean(axis=(1, 2, 3)) - 20) / 10).astype(int)
    np.testing.assert_array_equal(levels, clip.frame_indices)


def test_corrupt_frames(tmp_path, video_path):
    data = bytearray(Path(video_path).read_bytes())
    for index in range(64, len(data) // 2):  # scramble the encoded frames, keep the index
        data[index] ^= 0x5A
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(VideoError) as error:
        read_video(path, num_frames=4)
    assert str(path) in str(error.value)


def test_file_without_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match="no video stream") as error:
        read_video(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 0}, "num_frames must be at least 1"),
        ({"fps": 0.0}, "fps must be positive"),
        ({"fps": -2.0}, "fps must be positive"),
        ({"num_frames": 4, "fps": 2.0}, "not both"),
        ({"max_frames": 0}, "max_frames must be at least 1"),
    ],
)
def test_bad_sampling_arguments(video_path, kwargs, message):
    with pytest.raises(VideoError, match=message) as error:
        read_video(video_path, **kwargs)
    assert video_path in str(error.value)
    assert isinstance(error.value, SparrowError)


def test_write_video_rejects_non_frames(tmp_path):
    with pytest.raises(VideoError, match="uint8"):
        write_video(tmp_path / "bad.mp4", np.zeros((2, 8, 8, 3), np.float32))
