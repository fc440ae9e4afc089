"""Per-family video preprocessing and prompts, checked against the tiny models of the real
transformers classes and, where they import without torchvision, the reference processors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparrow.errors import ConfigError
from sparrow.targets.tiny import FAMILIES, processor_config, tiny_config, tiny_model, tiny_tokenizer
from sparrow.video.io import VideoClip, read_video, write_video
from sparrow.video.processing import (
    OPENAI_CLIP_MEAN,
    TEMPORAL_DIFFERENCE_KEY,
    VideoInputs,
    count_visual_tokens,
    decode_resizer,
    frames_for_budget,
    preprocess_video,
    smart_resize,
    video_settings,
)
from sparrow.video.prompt import (
    build_video_prompt,
    mm_token_type_ids,
    qwen3_group_timestamps,
    video_token_id,
)

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def random_clip(num_frames: int, height: int = 48, width: int = 64, seed: int = 0) -> VideoClip:
    frames = np.random.default_rng(seed).integers(
        0, 256, (num_frames, height, width, 3), dtype=np.uint8
    )
    fps = 4.0
    return VideoClip(
        frames=frames,
        timestamps=np.arange(num_frames) / fps,
        fps=fps,
        duration=num_frames / fps,
        path="random.mp4",
        frame_indices=np.arange(num_frames),
        total_frames=num_frames,
    )


@pytest.fixture(scope="module")
def models() -> dict:
    return {family: tiny_model(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> str:
    frames = np.random.default_rng(1).integers(0, 256, (9, 48, 64, 3), dtype=np.uint8)
    return str(write_video(tmp_path_factory.mktemp("videos") / "noise.mp4", frames, fps=4))


def video_features(model, inputs: VideoInputs) -> int:
    """How many feature vectors the model's vision path makes for `inputs`."""
    config = model.config
    if config.model_type in QWEN:
        output = model.model.get_video_features(
            inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw
        )
        return sum(part.shape[0] for part in output.pooler_output)
    output = model.model.get_video_features(
        inputs.pixel_values_videos,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    return output.pooler_output.shape[1]


@pytest.mark.parametrize("num_frames", [3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_video_through_the_tiny_model(models, video_path, family, num_frames):
    model, tokenizer = models[family], tiny_tokenizer(family)
    clip = read_video(video_path, num_frames=num_frames)
    inputs = preprocess_video(clip, model.config, processor_config(family))

    pixels = inputs.pixel_values_videos
    if family in QWEN:
        patch = 16 if family == "qwen3_vl" else 14
        grid_t, grid_h, grid_w = inputs.video_grid_thw[0].tolist()
        assert grid_t == math.ceil(num_frames / 2)
        assert pixels.shape == (grid_t * grid_h * grid_w, 3 * 2 * patch * patch)
        assert inputs.num_visual_tokens == grid_t * grid_h * grid_w // 4
    else:
        assert pixels.shape == (1, num_frames, 3, 56, 56)
        assert inputs.video_grid_thw is None
    assert inputs.num_visual_tokens == video_features(model, inputs)
    assert inputs.frame_timestamps == pytest.approx(clip.timestamps.tolist())

    input_ids = build_video_prompt(tokenizer, model.config, inputs, "What moves?")
    assert (input_ids == video_token_id(model.config)).sum() == inputs.num_visual_tokens
    kwargs = inputs.model_kwargs()
    if family in QWEN:
        kwargs["mm_token_type_ids"] = mm_token_type_ids(input_ids, model.config)
    with torch.no_grad():
        logits = model(input_ids=input_ids, **kwargs).logits
    assert logits.shape[:2] == input_ids.shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt(models, family):
    model = models[family]
    input_ids = build_video_prompt(
        tiny_tokenizer(family), model.config, None, "Hi?", system="Be brief."
    )
    assert not (input_ids == video_token_id(model.config)).any()
    with torch.no_grad():
        assert model(input_ids=input_ids).logits.shape[:2] == input_ids.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_without_chat_template_puts_the_video_first(family):
    tokenizer = tiny_tokenizer(family)
    tokenizer.chat_template = None
    config = tiny_config(family)
    inputs = preprocess_video(random_clip(2), config, processor_config(family))
    text = tokenizer.decode(build_video_prompt(tokenizer, config, inputs, "Why?")[0])
    first = "<|vision_start|>" if family in QWEN else "<video>"
    assert text.replace(" ", "").startswith(first) and text.replace(" ", "").endswith("Why?")


@pytest.mark.parametrize("num_frames", [3, 6])
def test_qwen3_prompt_has_one_timestamp_block_per_temporal_group(num_frames):
    config, tokenizer = tiny_config("qwen3_vl"), tiny_tokenizer("qwen3_vl")
    clip = random_clip(num_frames)  # frames at 0, 0.25, 0.5, ... seconds
    inputs = preprocess_video(clip, config, {**processor_config("qwen3_vl"), "max_pixels": 10**6})
    grid_t, grid_h, grid_w = inputs.video_grid_thw[0].tolist()
    per_group = grid_h * grid_w // 4
    assert grid_t == math.ceil(num_frames / 2) and per_group > 1

    text = tokenizer.decode(build_video_prompt(tokenizer, config, inputs, "Q")[0]).replace(" ", "")
    times = qwen3_group_timestamps(inputs.frame_timestamps, 2)
    # mean time of each pair of frames; an odd clip repeats its last frame's time
    expected = [
        (clip.timestamps[i] + clip.timestamps[min(i + 1, num_frames - 1)]) / 2
        for i in range(0, num_frames, 2)
    ]
    assert times == pytest.approx(expected)
    blocks = "".join(
        f"<{seconds:.1f}seconds><|vision_start|>{'<|video_pad|>' * per_group}<|vision_end|>"
        for seconds in times
    )
    # The template's own vision_start / vision_end wrap the blocks (transformers 5.x behaviour).
    assert f"<|vision_start|>{blocks}<|vision_end|>Q" in text
    assert text.count("seconds>") == grid_t


def test_mm_token_type_ids_mark_only_video_tokens():
    config = tiny_config("qwen2_vl")
    inputs = preprocess_video(random_clip(4), config, processor_config("qwen2_vl"))
    input_ids = build_video_prompt(tiny_tokenizer("qwen2_vl"), config, inputs, "Q")
    types = mm_token_type_ids(input_ids, config)
    assert types.shape == input_ids.shape
    assert set(types.unique().tolist()) == {0, 2}
    assert (types == 2).sum() == inputs.num_visual_tokens
    assert torch.equal(types == 2, input_ids == config.video_token_id)


def test_qwen2_5_seconds_per_temporal_patch():
    config = tiny_config("qwen2_5_vl")
    clip = read_clip_like(num_frames=4, total_frames=16, fps=8.0)  # 4 of 16 frames: 2 frames/s
    inputs = preprocess_video(clip, config, processor_config("qwen2_5_vl"))
    assert inputs.model_kwargs()["second_per_grid_ts"].tolist() == [pytest.approx(1.0)]
    assert "second_per_grid_ts" not in preprocess_video(clip, tiny_config("qwen2_vl"), None).extra


def read_clip_like(num_frames: int, total_frames: int, fps: float) -> VideoClip:
    clip = random_clip(num_frames)
    clip.frame_indices = np.linspace(0, total_frames - 1, num_frames).round().astype(np.int64)
    clip.timestamps, clip.fps, clip.total_frames = clip.frame_indices / fps, fps, total_frames
    return clip


def test_qwen_patch_layout():
    """Patch n holds (channel, time, row, column) of one patch; patches run over time groups,
    then merge x merge blocks row-major, then patches inside a block (Qwen2VL patchify)."""
    config = tiny_config("qwen2_vl")
    processor = {"image_mean": [0.0] * 3, "image_std": [1.0] * 3, "rescale_factor": 1.0}
    clip = random_clip(3, height=56, width=112)  # a valid size: no resize; 3 frames pad to 4
    inputs = preprocess_video(clip, config, {**processor, "min_pixels": 1, "max_pixels": 10**6})
    grid_t, grid_h, grid_w = inputs.video_grid_thw[0].tolist()
    assert (grid_t, grid_h, grid_w) == (2, 4, 8)
    video = np.concatenate([clip.frames, clip.frames[-1:]]).astype(np.float32)  # (4, H, W, 3)
    patches = inputs.pixel_values_videos.view(-1, 3, 2, 14, 14).numpy()
    index = 0
    for t in range(grid_t):
        for block_row in range(grid_h // 2):
            for block_col in range(grid_w // 2):
                for row in range(2):
                    for col in range(2):
                        top, left = (block_row * 2 + row) * 14, (block_col * 2 + col) * 14
                        expected = video[2 * t : 2 * t + 2, top : top + 14, left : left + 14]
                        np.testing.assert_array_equal(
                            patches[index], expected.transpose(3, 0, 1, 2)
                        )
                        index += 1


def test_family_defaults_match_the_real_checkpoints():
    qwen2 = video_settings(tiny_config("qwen2_vl"), None)
    assert qwen2.image_mean == OPENAI_CLIP_MEAN and (qwen2.patch_size, qwen2.merge_size) == (14, 2)
    assert (qwen2.min_pixels, qwen2.max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
    qwen3 = video_settings(tiny_config("qwen3_vl"), None)
    assert qwen3.image_mean == (0.5, 0.5, 0.5) and qwen3.patch_size == 16
    onevision = video_settings(tiny_config("llava_onevision"), None)
    assert onevision.image_mean == (0.5, 0.5, 0.5) and onevision.resize_to == (56, 56)
    next_video = video_settings(tiny_config("llava_next_video"), None)
    assert next_video.image_mean == OPENAI_CLIP_MEAN
    assert (next_video.shortest_edge, next_video.crop_to) == (56, (56, 56))
    # shortest edge 56, then a centre crop of a 48x80 frame -> 56x93 -> 56x56
    inputs = preprocess_video(random_clip(2, 48, 80), tiny_config("llava_next_video"), None)
    assert inputs.pixel_values_videos.shape == (1, 2, 3, 56, 56)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_count_without_pixels_matches_preprocessing(family):
    config = tiny_config(family)
    for num_frames, height, width in [(1, 48, 64), (5, 90, 160), (8, 200, 120)]:
        inputs = preprocess_video(random_clip(num_frames, height, width), config, None)
        assert (
            count_visual_tokens(config, None, num_frames, height, width) == inputs.num_visual_tokens
        )
    budget = count_visual_tokens(config, None, 6, 90, 160)
    assert frames_for_budget(config, None, budget, 90, 160, max_frames=64) >= 6


def test_llava_token_formulas():
    onevision, next_video = tiny_config("llava_onevision"), tiny_config("llava_next_video")
    # 56 / 14 = 4 patches a side; OneVision pools to ceil(4/2)^2 = 4 per frame + 1 newline
    assert count_visual_tokens(onevision, None, 7, 10, 10) == 7 * 4 + 1
    # NeXT-Video pools 4x4 with stride 2 to 2x2 = 4 per frame, no newline
    assert count_visual_tokens(next_video, None, 7, 10, 10) == 7 * 4


def test_processor_config_that_contradicts_the_model_is_an_error():
    with pytest.raises(ConfigError, match="patch_size"):
        video_settings(tiny_config("qwen2_vl"), {"patch_size": 16})
    with pytest.raises(ConfigError, match="vision tower takes"):
        preprocess_video(
            random_clip(2), tiny_config("llava_onevision"), {"size": {"height": 64, "width": 64}}
        )


# --- against transformers' own processors (their PIL backends import without torchvision) ---


def test_smart_resize_matches_transformers():
    pytest.importorskip("PIL")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_ref
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_ref

    for height, width in [(20, 30), (90, 160), (360, 640), (1080, 1920), (33, 2000), (700, 500)]:
        for low, high in [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28)]:
            assert smart_resize(height, width, 28, low, high) == qwen2_ref(
                height, width, 28, low, high
            )
        for frames in (2, 3, 16, 64):
            low, high = 128 * 32 * 32, 32 * 32 * 768
            ours = smart_resize(height, width, 32, low, high, frames, 2)
            assert ours == qwen3_ref(frames, height, width, 2, 32, low, high)


def qwen_image_reference(family: str, frame: np.ndarray, processor: dict) -> torch.Tensor:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    reference = Qwen2VLImageProcessorPil(
        min_pixels=processor["min_pixels"],
        max_pixels=processor["max_pixels"],
        patch_size=processor["patch_size"],
        image_mean=processor["image_mean"],
        image_std=processor["image_std"],
    )
    return reference(images=[frame], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("family", QWEN)
def test_qwen_pixels_match_the_reference_processor_exactly_without_resize(family):
    """A frame already at a valid size: one frame (padded to two) patchifies exactly like the
    reference image processor, which repeats an image over the temporal patch."""
    pytest.importorskip("PIL")
    factor = 32 if family == "qwen3_vl" else 28
    processor = {
        **processor_config(family),
        "min_pixels": factor**2,
        "max_pixels": 2 * 64 * factor**2,
    }
    processor["image_mean"], processor["image_std"] = list(OPENAI_CLIP_MEAN), [0.2, 0.3, 0.4]
    clip = random_clip(1, height=2 * factor, width=4 * factor)
    ours = preprocess_video(clip, tiny_config(family), processor).pixel_values_videos
    reference = qwen_image_reference(family, clip.frames[0], processor)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_qwen_resized_pixels_match_the_reference_within_resampling_differences():
    """With a resize, PIL (the image processor) and torch's uint8 bicubic kernel (the video
    processor's CPU path, and ours) may differ by a level or two in a few pixels."""
    pytest.importorskip("PIL")
    processor = processor_config("qwen2_vl")
    processor = {**processor, "min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}
    y, x = np.mgrid[0:90, 0:120]
    frame = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 9) for c in range(3)], -1)
    clip = random_clip(1, 90, 120)
    clip.frames = frame.clip(0, 255).astype(np.uint8)[None]
    ours = preprocess_video(clip, tiny_config("qwen2_vl"), processor).pixel_values_videos
    reference = qwen_image_reference("qwen2_vl", clip.frames[0], processor)
    assert ours.shape == reference.shape
    difference = (ours - reference).abs() * 0.5 * 255  # in uint8 levels (std 0.5)
    assert difference.max() <= 3 and (difference > 0.5).float().mean() < 0.02


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_llava_pixels_match_the_reference_image_processors(family):
    pytest.importorskip("PIL")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    clip = random_clip(2, 48, 80)
    config = tiny_config(family)
    ours = preprocess_video(clip, config, None).pixel_values_videos[0]  # (T, 3, 56, 56)
    if family == "llava_onevision":
        reference = SiglipImageProcessorPil(size={"height": 56, "width": 56})
    else:
        reference = CLIPImageProcessorPil(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
        )
    expected = reference(images=list(clip.frames), return_tensors="pt")["pixel_values"]
    std = 0.5 if family == "llava_onevision" else 0.26
    difference = (ours - expected).abs() * std * 255  # in uint8 levels
    assert ours.shape == expected.shape
    assert difference.max() <= 3 and (difference > 0.5).float().mean() < 0.05


# ---- temporal difference channels (sparrow's extension for per-frame towers) ---------------


def _six_channel_llava(seed: int = 0):
    from transformers import AutoModelForImageTextToText

    config = tiny_config("llava_onevision")
    config.vision_config.num_channels = 6
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize(("num_frames", "stride"), [(9, 2), (3, 1), (16, 4)])
def test_temporal_difference_channels(num_frames, stride):
    model = _six_channel_llava()
    settings = {**processor_config("llava_onevision"), TEMPORAL_DIFFERENCE_KEY: 4}
    clip = random_clip(num_frames, seed=num_frames)
    inputs = preprocess_video(clip, model.config, settings)
    plain_config = tiny_config("llava_onevision")
    plain = preprocess_video(clip, plain_config, processor_config("llava_onevision"))
    pixels, frames = inputs.pixel_values_videos[0], plain.pixel_values_videos[0]  # (T, 6 | 3, S, S)
    assert pixels.shape == (num_frames, 6, 56, 56)
    assert torch.equal(pixels[:, :3], frames)  # the frames themselves, unchanged
    for t in range(num_frames):
        assert torch.equal(pixels[t, 3:], frames[t] - frames[max(0, t - stride)])
    assert (pixels[0, 3:] == 0).all()
    assert inputs.num_visual_tokens == video_features(model, inputs)  # the tower takes them
    input_ids = build_video_prompt(tiny_tokenizer("llava_onevision"), model.config, inputs, "What moves?")
    with torch.no_grad():
        logits = model(input_ids=input_ids, **inputs.model_kwargs()).logits
    assert torch.isfinite(logits).all()


def test_temporal_difference_must_match_the_tower():
    clip = random_clip(4)
    with pytest.raises(ConfigError, match=f"takes 3 channels.*{TEMPORAL_DIFFERENCE_KEY}"):
        preprocess_video(clip, tiny_config("llava_onevision"),
                         {**processor_config("llava_onevision"), TEMPORAL_DIFFERENCE_KEY: 4})
    with pytest.raises(ConfigError, match="takes 6 channels"):
        preprocess_video(clip, _six_channel_llava().config, processor_config("llava_onevision"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(120, 200), (30, 40)])
def test_frames_resized_while_decoding_give_the_same_inputs(tmp_path, family, shape):
    """`decode_resizer` (the server and `prepare_video` scale each frame as it is decoded)
    changes nothing: preprocess_video finds the frames at size and the pixels are identical."""
    frames = np.random.default_rng(2).integers(0, 256, (9, *shape, 3), dtype=np.uint8)
    path = write_video(tmp_path / "clip.mp4", frames, fps=4)
    config, processor = tiny_config(family), processor_config(family)
    for num_frames in (3, 4):
        whole = read_video(path, num_frames=num_frames)
        scaled = read_video(path, num_frames=num_frames, transform=decode_resizer(config, processor))
        assert scaled.frames.shape[1:3] != whole.frames.shape[1:3]  # resized while decoding
        a, b = preprocess_video(whole, config, processor), preprocess_video(scaled, config, processor)
        assert torch.equal(a.pixel_values_videos, b.pixel_values_videos)
        assert a.num_visual_tokens == b.num_visual_tokens
