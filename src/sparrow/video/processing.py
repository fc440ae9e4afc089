"""Turn sampled frames into the video tensors a Hugging Face video LLM takes, per model family.

This replaces transformers' video processors (they need torchvision) with the same arithmetic in
plain torch, driven by the model config and the checkpoint's processor config dict:

- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: `smart_resize` to multiples of patch_size * merge_size,
  rescale + normalize, pad the frame count to a multiple of temporal_patch_size by repeating
  the last frame, then flatten into patches ordered (t, h-block, w-block, h-in-block, w-in-block)
  with each patch laid out (channel, time, row, column).
- LLaVA-OneVision: resize to a square (384 for the real checkpoints), normalize.
- LLaVA-NeXT-Video: resize the shortest edge, center crop (336 for the real checkpoints),
  normalize.

Resizing is transformers' own CPU path: its torchvision backend hands uint8 frames straight to
`torch.nn.functional.interpolate(mode="bicubic", antialias=True, align_corners=False)` (the
native uint8 kernel on CPU), which is what `_resize` calls, so the pixels match the reference
video processors on CPU. The PIL-backend image processors differ by at most a few uint8 levels
(PIL rounds between its horizontal and vertical passes at a different precision).

Deviations from the reference processors (all documented where they happen):
- Qwen3-VL: `min_pixels` / `max_pixels` keys are honoured as aliases of
  `size["shortest_edge"]` / `size["longest_edge"]` (as Qwen2-VL's processor does; Qwen3-VL's
  ignores them), and a one-frame video is sized as if it had temporal_patch_size frames (the
  reference raises).
- LLaVA families: without a processor config the frame size defaults to the vision tower's
  `image_size` (384 / 336 for the real checkpoints, the class defaults of transformers'
  processors are not what the checkpoints ship).
- `cap_pixels_per_frame` (a transitional transformers option, off by default) is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from sparrow.errors import ConfigError, VideoError

if TYPE_CHECKING:  # a type only: the tensor arithmetic here needs no PyAV
    from sparrow.video.io import VideoClip

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
LLAVA_FAMILIES = ("llava_onevision", "llava_next_video")
FAMILIES = QWEN_FAMILIES + LLAVA_FAMILIES

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPORAL_DIFFERENCE_KEY = "sparrow_temporal_difference"  # processor config key, see VideoSettings
HALF = (0.5, 0.5, 0.5)

# PIL resampling codes as stored in preprocessor_config.json -> interpolate mode.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


@dataclass
class VideoInputs:
    """The video tensors of one request, ready for the model's forward.

    `pixel_values_videos` per family:
      Qwen-VL:  (grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2) patches
      LLaVA-OneVision / LLaVA-NeXT-Video: (1, T, 3, S, S) frames, S the vision tower's image_size
    """

    pixel_values_videos: torch.Tensor  # see the class docstring
    video_grid_thw: torch.Tensor | None  # (1, 3) int64 [grid_t, grid_h, grid_w], Qwen-VL only
    num_visual_tokens: int  # placeholder tokens the model fills with this video's features
    frame_timestamps: list[float]  # seconds of each sampled frame (before temporal padding)
    extra: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # qwen2_5_vl: second_per_grid_ts (1,)
    family: str = ""  # model_type of the model these inputs are for

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model forward (and Qwen-VL's get_rope_index)."""
        kwargs = {"pixel_values_videos": self.pixel_values_videos}
        if self.video_grid_thw is not None:
            kwargs["video_grid_thw"] = self.video_grid_thw
        kwargs.update(self.extra)
        return kwargs


@dataclass(frozen=True)
class VideoSettings:
    """Preprocessing settings resolved from the model config and the processor config."""

    family: str
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = 3  # PIL code: 3 bicubic (every supported family), 2 bilinear, 0 nearest
    # Qwen-VL
    patch_size: int = 0
    merge_size: int = 0
    temporal_patch_size: int = 0
    min_pixels: int = 0
    max_pixels: int = 0
    # LLaVA: resize to (height, width), or the shortest edge to `shortest_edge`, then crop.
    resize_to: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop_to: tuple[int, int] | None = None
    image_size: int = 0  # what the vision tower takes (LLaVA)
    # sparrow's extension (LLaVA, the reference target): `temporal_difference` = N > 0 appends to
    # each frame's 3 channels its difference from the frame s = max(1, T // N) earlier (the
    # first s frames: from frame 0), so a per-frame vision tower sees what moved, appeared or
    # changed over ~1/N of the clip. The tower must take 6 channels.
    temporal_difference: int = 0


def model_family(model_config) -> str:
    """The family of a supported video LLM config (its `model_type`)."""
    family = getattr(model_config, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError(
            f"model type {family!r} is not a supported video LLM; use one of {', '.join(FAMILIES)}"
        )
    return family


def video_settings(model_config, processor_config: dict[str, Any] | None) -> VideoSettings:
    """Resolve the preprocessing of `model_config`'s family.

    `processor_config` is what the checkpoint's (video_)preprocessor_config.json holds; keys it
    lacks take the family defaults of the real checkpoints. Sizes that the model itself fixes
    (patch sizes, the tower's image size) come from the model config, and a processor config
    that contradicts them is an error rather than a crash deep inside the vision tower.
    """
    family = model_family(model_config)
    config = dict(processor_config or {})
    vision = model_config.vision_config
    if family in QWEN_FAMILIES:
        qwen3 = family == "qwen3_vl"
        settings = {
            "patch_size": vision.patch_size,
            "merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
        }
        for key, value in settings.items():
            if key in config and config[key] != value:
                raise ConfigError(
                    f"processor config has {key}={config[key]} but the model's vision tower uses "
                    f"{value}; fix {key} in preprocessor_config.json"
                )
        # transformers' video processor defaults: (128 .. 768) * factor**2 pixels; per frame for
        # Qwen2/2.5-VL, for the whole clip for Qwen3-VL (its smart_resize counts frames).
        factor = vision.patch_size * vision.spatial_merge_size
        # Precedence as in Qwen2VLVideoProcessor.__init__: top-level min/max_pixels over `size`
        # (older checkpoints spell size's keys min_pixels / max_pixels).
        size = config.get("size") or {}
        min_pixels = config.get(
            "min_pixels", size.get("shortest_edge", size.get("min_pixels", 128 * factor * factor))
        )
        max_pixels = config.get(
            "max_pixels", size.get("longest_edge", size.get("max_pixels", 768 * factor * factor))
        )
        default_mean, default_std = (HALF, HALF) if qwen3 else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return VideoSettings(
            family=family,
            image_mean=_triple(config.get("image_mean", default_mean)),
            image_std=_triple(config.get("image_std", default_std)),
            rescale_factor=config.get("rescale_factor", 1 / 255),
            do_resize=config.get("do_resize", True),
            do_rescale=config.get("do_rescale", True),
            do_normalize=config.get("do_normalize", True),
            resample=config.get("resample", 3),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            **settings,
        )

    side = vision.image_size
    size = config.get("size") or {}
    resize_to, shortest_edge, crop_to = None, None, None
    if "height" in size and "width" in size:
        resize_to = (size["height"], size["width"])
    elif "shortest_edge" in size and "longest_edge" not in size:
        shortest_edge = size["shortest_edge"]
    elif size:
        raise ConfigError(
            f"processor config size {size} is not supported; use height/width or shortest_edge"
        )
    elif family == "llava_onevision":
        resize_to = (side, side)
    else:
        shortest_edge = side
    # LLaVA-NeXT-Video center-crops by default (its processor's do_center_crop=True).
    if config.get("do_center_crop", family == "llava_next_video"):
        crop = config.get("crop_size") or {"height": side, "width": side}
        crop_to = (crop["height"], crop["width"])
    default_mean, default_std = (
        (HALF, HALF) if family == "llava_onevision" else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    )
    temporal = int(config.get(TEMPORAL_DIFFERENCE_KEY, 0))
    channels = getattr(vision, "num_channels", 3)
    if channels != (6 if temporal else 3):
        raise ConfigError(
            f"the vision tower takes {channels} channels but the processor config makes "
            f"{6 if temporal else 3} ({TEMPORAL_DIFFERENCE_KEY}={temporal}); set "
            f"{TEMPORAL_DIFFERENCE_KEY} in preprocessor_config.json to match the tower "
            "(0 for 3 channels, N > 0 for 6)"
        )
    return VideoSettings(
        family=family,
        image_mean=_triple(config.get("image_mean", default_mean)),
        image_std=_triple(config.get("image_std", default_std)),
        rescale_factor=config.get("rescale_factor", 1 / 255),
        do_resize=config.get("do_resize", True),
        do_rescale=config.get("do_rescale", True),
        do_normalize=config.get("do_normalize", True),
        resample=config.get("resample", 3),
        resize_to=resize_to,
        shortest_edge=shortest_edge,
        crop_to=crop_to,
        image_size=side,
        temporal_difference=temporal,
    )


def preprocess_video(
    clip: VideoClip,
    model_config,
    processor_config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> VideoInputs:
    """Resize, normalize and (Qwen-VL) patchify `clip` exactly as `model_config`'s processor does."""
    settings = video_settings(model_config, processor_config)
    frames = np.asarray(clip.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0 or frames.dtype != np.uint8:
        raise VideoError(
            f"{clip.path}: expected (T, H, W, 3) uint8 RGB frames, got {frames.dtype} {frames.shape}"
        )
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    num_frames, _, height, width = video.shape
    timestamps = [float(t) for t in clip.timestamps]

    if settings.family in QWEN_FAMILIES:
        new_h, new_w = _qwen_frame_size(settings, num_frames, height, width, clip.path)
        video = _resize(video, new_h, new_w, settings)
        pixels = _rescale_and_normalize(video, settings)  # (T, 3, h, w) float32
        patches, grid_thw = _patchify(pixels, settings)
        merge = settings.merge_size
        extra = {}
        if settings.family == "qwen2_5_vl":
            # Seconds spanned by one temporal patch; get_rope_index spaces the temporal position
            # ids by tokens_per_second * this (Qwen2_5_VLProcessor._process_videos).
            seconds = settings.temporal_patch_size / clip.sampled_fps
            extra["second_per_grid_ts"] = torch.tensor([seconds], dtype=torch.float32)  # (1,)
        return VideoInputs(
            pixel_values_videos=patches.to(dtype),
            video_grid_thw=torch.tensor([grid_thw], dtype=torch.int64),  # (1, 3)
            num_visual_tokens=math.prod(grid_thw) // (merge * merge),
            frame_timestamps=timestamps,
            extra=extra,
            family=settings.family,
        )

    new_h, new_w = _llava_frame_size(settings, height, width)
    video = _resize(video, new_h, new_w, settings)
    if settings.crop_to is not None:
        video = _center_crop(video, *settings.crop_to, path=clip.path)
    if video.shape[-2:] != (settings.image_size, settings.image_size):
        raise ConfigError(
            f"the processor config makes {tuple(video.shape[-2:])} frames but the vision tower takes "
            f"{settings.image_size}x{settings.image_size}; fix size/crop_size in preprocessor_config.json"
        )
    pixels = _rescale_and_normalize(video, settings)  # (T, 3, S, S) float32
    if settings.temporal_difference:
        pixels = temporal_difference(pixels, settings.temporal_difference)  # (T, 6, S, S)
    return VideoInputs(
        pixel_values_videos=pixels.unsqueeze(0).to(dtype),  # (1, T, C, S, S)
        video_grid_thw=None,
        num_visual_tokens=_llava_tokens(model_config, num_frames),
        frame_timestamps=timestamps,
        family=settings.family,
    )


def decode_resizer(model_config, processor_config: dict[str, Any] | None = None):
    """A `read_video` transform that resizes each frame, as it is decoded, to the size
    `preprocess_video` resizes it to (which then finds it at size and leaves it): one
    full-size frame in memory at a time instead of all of them. The result is identical, as
    the resize treats each frame alone."""
    settings = video_settings(model_config, processor_config)

    def resize(frame: np.ndarray, num_frames: int, path: str) -> np.ndarray:
        height, width = frame.shape[:2]
        if settings.family in QWEN_FAMILIES:
            size = _qwen_frame_size(settings, num_frames, height, width, path)
        else:
            size = _llava_frame_size(settings, height, width)
        video = torch.from_numpy(frame).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        return _resize(video, *size, settings)[0].permute(1, 2, 0).contiguous().numpy()

    return resize


def count_visual_tokens(
    model_config, processor_config: dict[str, Any] | None, num_frames: int, height: int, width: int
) -> int:
    """Visual tokens that `num_frames` frames of height x width cost, without touching pixels."""
    return _count_tokens(
        model_config, video_settings(model_config, processor_config), num_frames, height, width
    )


def frames_for_budget(
    model_config,
    processor_config: dict[str, Any] | None,
    max_visual_tokens: int,
    height: int,
    width: int,
    max_frames: int = 4096,
) -> int:
    """The most frames (<= max_frames) whose visual tokens fit in `max_visual_tokens`; 0 if none.

    A plain scan: Qwen3-VL's clip-wide pixel budget makes the count non-monotonic in frames.
    """
    settings = video_settings(model_config, processor_config)
    fitting = [
        num_frames
        for num_frames in range(1, max_frames + 1)
        if _count_tokens(model_config, settings, num_frames, height, width) <= max_visual_tokens
    ]
    return max(fitting, default=0)


def _count_tokens(
    model_config, settings: VideoSettings, num_frames: int, height: int, width: int
) -> int:
    if settings.family in QWEN_FAMILIES:
        new_h, new_w = _qwen_frame_size(settings, num_frames, height, width, "<frames>")
        grid_t = -(-num_frames // settings.temporal_patch_size)
        patch, merge = settings.patch_size, settings.merge_size
        return grid_t * (new_h // patch) * (new_w // patch) // (merge * merge)
    return _llava_tokens(model_config, num_frames)


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    num_frames: int = 1,
    temporal_factor: int = 1,
) -> tuple[int, int]:
    """transformers' Qwen `smart_resize`: the frame size nearest (height, width) in aspect whose
    sides are multiples of `factor` and whose pixel count lies in [min_pixels, max_pixels].

    With `temporal_factor > 1` this is Qwen3-VL's variant, which first enlarges frames smaller
    than `factor` and counts pixels over the clip (frames rounded to a multiple of
    temporal_factor); with the defaults it is Qwen2-VL's per-frame rule.
    """
    if temporal_factor > 1 and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _qwen_frame_size(
    settings: VideoSettings, num_frames: int, height: int, width: int, path: str
) -> tuple[int, int]:
    factor = settings.patch_size * settings.merge_size
    if not settings.do_resize:
        if height % factor or width % factor:
            raise ConfigError(
                f"{path}: with do_resize=false frames must be multiples of {factor} pixels, "
                f"got {height}x{width}"
            )
        return height, width
    try:
        if settings.family == "qwen3_vl":
            # The reference raises for fewer frames than temporal_patch_size; such a clip is
            # padded to temporal_patch_size frames anyway, so size it as that many.
            frames = max(num_frames, settings.temporal_patch_size)
            new_h, new_w = smart_resize(
                height,
                width,
                factor,
                settings.min_pixels,
                settings.max_pixels,
                frames,
                settings.temporal_patch_size,
            )
        else:
            new_h, new_w = smart_resize(
                height, width, factor, settings.min_pixels, settings.max_pixels
            )
    except ValueError as error:
        raise VideoError(f"{path}: {error}; crop the video to a less extreme shape") from error
    if new_h < factor or new_w < factor:
        raise ConfigError(
            f"{path}: min_pixels={settings.min_pixels} is too small to size {height}x{width} frames; raise it"
        )
    return new_h, new_w


def _llava_frame_size(settings: VideoSettings, height: int, width: int) -> tuple[int, int]:
    if not settings.do_resize:
        return height, width
    if settings.resize_to is not None:
        return settings.resize_to
    # get_resize_output_image_size(default_to_square=False): the short side becomes the size,
    # the long side keeps the aspect ratio (truncated).
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = settings.shortest_edge, int(settings.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _llava_tokens(model_config, num_frames: int) -> int:
    """Video features the LLaVA model produces for `num_frames` frames.

    OneVision (get_video_features + apply_pooling): each frame's P x P patch grid is bilinearly
    pooled to ceil(P/2) x ceil(P/2), then ONE image_newline is appended for the whole video.
    NeXT-Video (vision_resampler): each frame's P x P grid is pooled with kernel = stride =
    spatial_pool_stride (floor), no newline.
    """
    vision = model_config.vision_config
    grid = vision.image_size // vision.patch_size  # P
    if model_config.model_type == "llava_onevision":
        return num_frames * math.ceil(grid / 2) ** 2 + 1
    stride = model_config.spatial_pool_stride
    return num_frames * (grid // stride) ** 2


def _resize(video: torch.Tensor, height: int, width: int, settings: VideoSettings) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, height, width) uint8, as torchvision's resize does on CPU."""
    if video.shape[-2:] == (height, width):
        return video
    mode = _RESAMPLE_MODES.get(settings.resample)
    if mode is None:
        raise ConfigError(
            f"processor config resample={settings.resample} is not supported; "
            "use 3 (bicubic), 2 (bilinear) or 0"
        )
    if mode == "nearest-exact":
        return F.interpolate(video, size=(height, width), mode=mode)
    return F.interpolate(
        video, size=(height, width), mode=mode, align_corners=False, antialias=True
    )


def _center_crop(video: torch.Tensor, height: int, width: int, path: str) -> torch.Tensor:
    """(T, 3, H, W) -> (T, 3, height, width), the top-left corner rounded down as transformers does."""
    frame_h, frame_w = video.shape[-2:]
    if height > frame_h or width > frame_w:
        raise ConfigError(
            f"{path}: crop_size {height}x{width} exceeds the resized frame {frame_h}x{frame_w}; "
            "fix size/crop_size in preprocessor_config.json"
        )
    top, left = int((frame_h - height) / 2.0), int((frame_w - width) / 2.0)
    return video[..., top : top + height, left : left + width]


def temporal_difference(pixels: torch.Tensor, parts: int) -> torch.Tensor:
    """(T, 3, H, W) -> (T, 6, H, W): each frame, then its difference from the frame
    s = max(1, T // parts) earlier (frames before s: from frame 0; frame 0's is zero)."""
    stride = max(1, pixels.shape[0] // parts)
    earlier = pixels[(torch.arange(pixels.shape[0]) - stride).clamp(min=0)]
    return torch.cat([pixels, pixels - earlier], dim=1)


def _rescale_and_normalize(video: torch.Tensor, settings: VideoSettings) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> float32, fused like transformers: (x - mean/r) / (std/r), r = rescale_factor."""
    pixels = video.to(torch.float32)
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(3, 1, 1)
    if settings.do_normalize:
        if settings.do_rescale:
            mean, std = (
                mean * (1.0 / settings.rescale_factor),
                std * (1.0 / settings.rescale_factor),
            )
        return (pixels - mean) / std
    if settings.do_rescale:
        return pixels * settings.rescale_factor
    return pixels


def _patchify(pixels: torch.Tensor, settings: VideoSettings) -> tuple[torch.Tensor, list[int]]:
    """(T, 3, H, W) -> patches (grid_t * grid_h * grid_w, 3 * tp * p * p) and [grid_t, grid_h, grid_w].

    Mirrors Qwen2VLVideoProcessor.patchify: the frame count is padded to a multiple of tp by
    repeating the last frame; patches run over time groups, then merge_size x merge_size
    blocks in row-major order, then the patches inside a block, so that the vision tower's
    merger sees each block's patches next to each other.
    """
    tp, patch, merge = settings.temporal_patch_size, settings.patch_size, settings.merge_size
    if pad := -pixels.shape[0] % tp:
        pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
    num_frames, channels, height, width = pixels.shape
    grid_t, grid_h, grid_w = num_frames // tp, height // patch, width // patch
    patches = pixels.view(
        grid_t, tp, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    # -> (grid_t, h-block, w-block, h-in-block, w-in-block, channel, time, row, column)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * tp * patch * patch)
    return flat, [grid_t, grid_h, grid_w]


def _triple(values) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    return tuple(float(value) for value in values)
