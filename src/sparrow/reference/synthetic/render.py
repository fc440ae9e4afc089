"""Pixels: the background image, the frames of a scene, and its mp4."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sparrow.reference.synthetic.scenes import Background, Scene
from sparrow.reference.synthetic.shapes import _local_mask
from sparrow.reference.synthetic.vocabulary import BACKGROUND_COLOURS, COLOUR_NAMES, COLOURS
from sparrow.video.io import write_video


def render_background(background: Background, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 background image."""
    first = np.array(BACKGROUND_COLOURS[background.colours[0]], dtype=np.float64)  # (3,)
    if background.kind in ("plain", "noise"):
        image = np.broadcast_to(first, (height, width, 3)).copy()  # (H, W, 3)
        if background.kind == "noise":  # blocky grain, the same in every frame
            cell = max(2, min(height, width) // 16)
            rng = np.random.default_rng(background.seed)
            grain = rng.normal(0.0, 14.0, size=(height // cell + 1, width // cell + 1)).clip(-28, 28)
            grain = np.repeat(np.repeat(grain, cell, axis=0), cell, axis=1)[:height, :width]  # (H, W)
            image += grain[:, :, None]
        return image.clip(0, 255).round().astype(np.uint8)
    second = np.array(BACKGROUND_COLOURS[background.colours[1]], dtype=np.float64)  # (3,)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)  # (H, W) each
    coordinate = {"horizontal": xs, "vertical": ys, "diagonal": xs + ys}[background.orientation]
    if background.kind == "gradient":
        weight = coordinate / max(coordinate.max(), 1.0)  # (H, W) in [0, 1]
    else:  # stripes: bands of half a period, period = 1/8 of the shorter side
        half_period = max(2, min(height, width) // 16)
        weight = (coordinate // half_period) % 2
    image = first * (1 - weight[:, :, None]) + second * weight[:, :, None]
    return image.round().astype(np.uint8)


def render_frames(scene: Scene) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: objects drawn in id order over the background, without
    anti-aliasing, so every object pixel has exactly its palette colour."""
    background = render_background(scene.background, scene.height, scene.width)  # (H, W, 3)
    frames = np.repeat(background[None], scene.num_frames, axis=0)  # (T, H, W, 3)
    palette = np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.uint8)  # (C, 3)
    radii = scene.radii
    for t in range(scene.num_frames):
        for i, obj in enumerate(scene.objects):
            if not scene.visible[t, i]:
                continue
            cx, cy = scene.positions[t, i]
            region, mask = _local_mask(obj.shape, float(cx), float(cy), radii[i], scene.height, scene.width)
            frames[t][region][mask] = palette[scene.colour_ids[t, i]]
    return frames


def write_scene(scene: Scene, path: str | os.PathLike) -> Path:
    """Render `scene` and encode it to `path` (mp4, H.264) at the scene's fps."""
    return write_video(path, render_frames(scene), fps=scene.fps)
