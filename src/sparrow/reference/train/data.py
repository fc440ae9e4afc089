"""Training data for the reference target's eyes, made from `sparrow.reference.synthetic`.

Seeds: training videos (the corpus shards here, and the clips the language-model stages render)
come from [0, `EVAL_SEED_START`); the validation shard (`VAL_SEEDS`) and every held-out check,
`sparrow eval-target`'s included, from `EVAL_SEED_START` up, never trained on.

A corpus shard holds, per video (a seed rendered at `RENDER_FRAMES` frames of 128x128, encoded
to mp4 and decoded again, so the model learns from the same compressed pixels it sees at
inference), the frames after the reference processor's resize (uint8, stored small and
normalized at use), per-patch labels for pre-training the tower directly on the ground truth,
and the video's facts (JSON) for captions and questions.

Patch labels (the vision tower's patch grid, `grid` x `grid`): the object that covers the
largest share of the patch's pixels (at least `MIN_COVER`), as its colour / shape / size class
(0 = background), and that object's centre in [0, 1] frame coordinates (for motion: a token that
knows where its object is lets the language model compare positions across frames).

Temporal labels (`temporal_labels`), for the tower that also sees each frame's difference from
an earlier frame (`sparrow.video.processing.temporal_difference`): per patch, how the patch's
object moved between the two frames (still / left / right / up / down), whether it was not
there yet (appeared) or changed colour, and whether an object that covered the patch then has
left the scene since (vanished). They come from the objects' tracks stored with each video.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparrow.reference import assembly, synthetic
from sparrow.video.io import read_video

EVAL_SEED_START = synthetic.EVAL_SEED_START
VAL_SEEDS = range(EVAL_SEED_START + 900_000, EVAL_SEED_START + 900_000 + 200)
SHARD_VIDEOS = 500
RENDER_FRAMES = 8
RENDER_SIZE = 128
MIN_COVER = 0.1
MAX_OBJECTS = 8  # object slots stored per video (the generator's hardest preset draws 5)
MOTIONS = ("still", "left", "right", "up", "down")
MOTION_THRESHOLD = 0.02  # displacement (frame widths) below which an object counts as still
SIZE_NAMES = tuple(synthetic.SIZES)
BACKGROUND_COLOUR_NAMES = tuple(synthetic.BACKGROUND_COLOURS)

DESCRIBE_PROMPTS = (
    "Describe the video in detail.",
    "Describe this video in detail.",
    "What happens in this video? Describe it in detail.",
    "Give a detailed description of the video.",
    "Tell me what you see in the video, in detail.",
)


@dataclass
class Shard:
    """One corpus file's arrays (N videos of T frames, frames S x S, patch grid G x G)."""

    frames: np.ndarray  # (N, T, S, S, 3) uint8, resized as the reference processor does
    colour: np.ndarray  # (N, T, G, G) int64: 0 background, 1 + index into COLOUR_NAMES
    shape: np.ndarray  # (N, T, G, G) int64: 0 background, 1 + index into SHAPES
    size: np.ndarray  # (N, T, G, G) int64: 0 background, 1 + index into SIZE_NAMES
    centre: np.ndarray  # (N, T, G, G, 2) float32 (x, y) in [0, 1] of the patch's object, 0 if none
    owner: np.ndarray  # (N, T, G, G) int64: 0 background, 1 + the patch's object's index
    positions: np.ndarray  # (N, T, MAX_OBJECTS, 2) float32 each object's centre in [0, 1]
    visible: np.ndarray  # (N, T, MAX_OBJECTS) bool (empty slots: never)
    colour_ids: np.ndarray  # (N, T, MAX_OBJECTS) int64 index into COLOUR_NAMES
    count: np.ndarray  # (N, T) int64 objects visible in the frame
    background: np.ndarray  # (N,) int64 index into BACKGROUND_KINDS
    background_colours: np.ndarray  # (N, 4) float32 multi-hot over BACKGROUND_COLOUR_NAMES
    facts: list[synthetic.VideoFacts]


def patch_labels(scene: synthetic.Scene, grid: int) -> dict[str, np.ndarray]:
    """Per-frame, per-patch labels of `scene` on a `grid` x `grid` patch grid."""
    height, width = scene.height, scene.width
    if height % grid or width % grid:
        raise ValueError(f"a {width}x{height} scene does not divide into a {grid}x{grid} grid")
    block_h, block_w = height // grid, width // grid
    frames, objects = scene.num_frames, len(scene.objects)
    cover = np.zeros((frames, objects, grid, grid), dtype=np.float32)
    radii = scene.radii
    for t in range(frames):
        for i, obj in enumerate(scene.objects):
            if not scene.visible[t, i]:
                continue
            cx, cy = scene.positions[t, i]
            mask = synthetic.shape_mask(obj.shape, float(cx), float(cy), radii[i], height, width)
            cover[t, i] = mask.reshape(grid, block_h, grid, block_w).mean(axis=(1, 3))
    # Objects are drawn in id order, so a later object hides an earlier one where they overlap
    # (only colliding objects touch, by a sliver): the max cover picks the dominant object.
    best = cover.argmax(axis=1)  # (T, G, G)
    present = cover.max(axis=1) >= MIN_COVER  # (T, G, G)
    shape_ids = np.array([synthetic.SHAPES.index(o.shape) for o in scene.objects])  # (N,)
    size_ids = np.array([SIZE_NAMES.index(o.size) for o in scene.objects])  # (N,)
    t_index = np.arange(frames)[:, None, None]
    colour = np.where(present, scene.colour_ids[t_index, best] + 1, 0)
    shape = np.where(present, shape_ids[best] + 1, 0)
    size = np.where(present, size_ids[best] + 1, 0)
    centre = scene.positions[t_index, best] / np.array([width, height], dtype=np.float32)  # (T, G, G, 2)
    centre = np.where(present[..., None], centre, 0.0).astype(np.float32)
    if objects > MAX_OBJECTS:
        raise ValueError(f"scene {scene.seed} has {objects} objects; raise MAX_OBJECTS")
    pad = MAX_OBJECTS - objects
    positions = scene.positions / np.array([width, height], dtype=np.float32)  # (T, N, 2)
    return {
        "colour": colour.astype(np.int64),
        "shape": shape.astype(np.int64),
        "size": size.astype(np.int64),
        "centre": centre,
        "owner": np.where(present, best + 1, 0).astype(np.int64),
        "positions": np.pad(positions, ((0, 0), (0, pad), (0, 0))).astype(np.float32),
        "visible": np.pad(scene.visible, ((0, 0), (0, pad))),
        "colour_ids": np.pad(scene.colour_ids, ((0, 0), (0, pad))).astype(np.int64),
        "count": scene.visible.sum(axis=1).astype(np.int64),
    }


def temporal_labels(owner: np.ndarray, positions: np.ndarray, visible: np.ndarray,
                    colour_ids: np.ndarray, now: np.ndarray, before: np.ndarray) -> dict[str, np.ndarray]:
    """What changed on each patch between frame `before` and frame `now` of B videos.

    owner (B, T, G, G), positions (B, T, K, 2), visible (B, T, K), colour_ids (B, T, K): the
    shard's arrays of the B videos; now, before (B,) frame indices (before <= now). Returns, per
    patch (B, G, G): `motion` 0 where the patch has no object visible in both frames, else
    1 + index into MOTIONS of its object's displacement (the larger axis, if it exceeds
    MOTION_THRESHOLD); `appeared` its object was not visible at `before`; `recoloured` its
    object's colour differs from `before`; `vanished` an object covered it at `before` that is
    not visible at `now`.
    """
    rows = np.arange(len(now))
    owner_now, owner_before = owner[rows, now], owner[rows, before]  # (B, G, G)
    obj = np.maximum(owner_now - 1, 0)
    index = (rows[:, None, None], obj)
    here = owner_now > 0
    seen_before = visible[rows, before][index] & here  # (B, G, G)
    delta = positions[rows, now][index] - positions[rows, before][index]  # (B, G, G, 2)
    dx, dy = delta[..., 0], delta[..., 1]
    direction = np.where(np.abs(dx) >= np.abs(dy), np.where(dx < 0, 1, 2), np.where(dy < 0, 3, 4))
    moved = np.maximum(np.abs(dx), np.abs(dy)) >= MOTION_THRESHOLD
    motion = np.where(seen_before, 1 + np.where(moved, direction, 0), 0)
    recoloured = seen_before & (colour_ids[rows, now][index] != colour_ids[rows, before][index])
    gone = ~visible[rows, now][rows[:, None, None], np.maximum(owner_before - 1, 0)]
    return {
        "motion": motion.astype(np.int64),
        "appeared": (here & ~seen_before),
        "recoloured": recoloured,
        "vanished": (owner_before > 0) & gone,
    }


def block_owner(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object of each 2x2 block of patches, as the language model sees a frame.

    LLaVA-OneVision halves every frame's grid of projected patches before the language model
    (`apply_pooling`: bilinear to half size, on an even grid the mean of each 2x2 block), so a
    visual token is a block. owner (..., G, G) per patch (0 background, 1 + object index) ->
    (block owner (..., G/2, G/2), pick (..., G/2, G/2)): the object covering most of the
    block's patches (the first such patch wins a tie; background only where no object is), and
    which of the block's patches (0-3, row-major) is one of it, to read its per-patch labels.
    """
    quads = to_blocks(owner)  # (..., G/2, G/2, 4)
    same = (quads[..., :, None] == quads[..., None, :]).sum(-1)  # patches sharing each one's owner
    pick = np.where(quads > 0, same, 0).argmax(-1)
    return np.take_along_axis(quads, pick[..., None], -1)[..., 0], pick


def to_blocks(values: np.ndarray, axis: int = -2) -> np.ndarray:
    """Per-patch values with the (G, G) grid at `axis`, `axis + 1` -> the grid's 2x2 blocks:
    (..., G, G, *rest) -> (..., G/2, G/2, 4, *rest), a block's patches in row-major order."""
    axis %= values.ndim
    lead, (rows, cols), rest = values.shape[:axis], values.shape[axis:axis + 2], values.shape[axis + 2:]
    split = values.reshape(*lead, rows // 2, 2, cols // 2, 2, *rest)
    return np.moveaxis(split, axis + 1, axis + 2).reshape(*lead, rows // 2, cols // 2, 4, *rest)


def build_shard(
    path: str | os.PathLike,
    seeds: list[int],
    image_size: int,
    patch_size: int,
    resize,
    progress: bool = True,
) -> Path:
    """Render, encode, decode and label `seeds` into one .npz shard at `path` (atomic).

    `resize`: (T, H, W, 3) uint8 frames -> (T, S, S, 3) uint8, the reference processor's resize.
    """
    path = Path(path)
    grid = image_size // patch_size
    columns: dict[str, list] = {k: [] for k in ("frames", "colour", "shape", "size", "centre", "owner",
                                                "positions", "visible", "colour_ids", "count")}
    backgrounds, background_colours, facts = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in tqdm(seeds, desc=f"corpus {path.name}", unit="video", disable=not progress):
            scene = synthetic.generate_scene(seed, RENDER_FRAMES, RENDER_SIZE, RENDER_SIZE)
            video = synthetic.write_scene(scene, Path(scratch) / f"{seed}.mp4")
            clip = read_video(video)
            columns["frames"].append(resize(clip.frames))
            for key, value in patch_labels(scene, grid).items():
                columns[key].append(value)
            backgrounds.append(synthetic.BACKGROUND_KINDS.index(scene.background.kind))
            multi_hot = np.zeros(len(BACKGROUND_COLOUR_NAMES), dtype=np.float32)
            multi_hot[[BACKGROUND_COLOUR_NAMES.index(c) for c in scene.background.colours]] = 1
            background_colours.append(multi_hot)
            facts.append(synthetic.scene_facts(scene).to_dict())
            video.unlink()
    partial = path.with_suffix(".partial.npz")
    np.savez(
        partial,
        **{key: np.stack(values) for key, values in columns.items()},
        background=np.array(backgrounds, dtype=np.int64),
        background_colours=np.stack(background_colours),
        facts=np.array(json.dumps(facts)),
    )
    os.replace(partial, path)
    return path


def resize_fn():
    """The reference processor's resize, as uint8 (normalization is exactly invertible here)."""
    from sparrow.video.io import VideoClip
    from sparrow.video.processing import preprocess_video

    config = assembly.reference_config(assembly.TOWER, assembly.ROPE_SCALING)

    def resize(frames: np.ndarray) -> np.ndarray:
        clip = VideoClip(frames=frames, timestamps=np.zeros(len(frames)), fps=1.0, duration=1.0,
                         path="<synthetic>", frame_indices=np.arange(len(frames)),
                         total_frames=len(frames))
        pixels = preprocess_video(clip, config, assembly.PROCESSOR_CONFIG).pixel_values_videos[0]
        pixels = pixels[:, :3]  # the frames (any temporal-difference channels are made at use)
        return (pixels * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return resize


def ensure_corpus(corpus_dir: Path, train_shards: int) -> tuple[list[Path], Path]:
    """Build missing shards (train-000.npz ... and val.npz); existing ones are kept."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    tower = assembly.TOWER
    resize = None
    train = [corpus_dir / f"train-{i:03d}.npz" for i in range(train_shards)]
    val = corpus_dir / "val.npz"
    jobs = [(p, list(range(i * SHARD_VIDEOS, (i + 1) * SHARD_VIDEOS))) for i, p in enumerate(train)]
    jobs.append((val, list(VAL_SEEDS)))
    for path, seeds in jobs:
        if path.is_file():
            continue
        resize = resize or resize_fn()
        build_shard(path, seeds, tower["image_size"], tower["patch_size"], resize)
    return train, val


def load_shard(path: str | os.PathLike) -> Shard:
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key != "facts"}
        missing = set(Shard.__dataclass_fields__) - set(arrays) - {"facts"}
        if missing:
            raise ValueError(f"{path} was built by an older version (no {', '.join(sorted(missing))}); "
                             "delete it (or its corpus directory) and the training rebuilds it")
        facts = [synthetic.VideoFacts.from_dict(item) for item in json.loads(str(data["facts"]))]
    return Shard(**arrays, facts=facts)


def load_corpus(paths: list[str | os.PathLike]) -> Shard:
    """The shards at `paths` as one Shard, filled in place shard by shard, so that memory holds
    the corpus plus one shard (a list of shards and their concatenation would hold it twice)."""
    if len(paths) == 1:
        return load_shard(paths[0])
    sizes = []
    for path in paths:
        with np.load(path) as data:
            sizes.append(len(data["background"]))
    ends = np.cumsum(sizes)
    fields: dict[str, np.ndarray] = {}
    facts: list[synthetic.VideoFacts] = []
    for path, end, size in zip(paths, ends, sizes, strict=True):
        shard = load_shard(path)
        for name in Shard.__dataclass_fields__:
            if name == "facts":
                continue
            value = getattr(shard, name)
            if name not in fields:
                fields[name] = np.empty((int(ends[-1]), *value.shape[1:]), dtype=value.dtype)
            fields[name][end - size:end] = value
        facts.extend(shard.facts)
        del shard
    return Shard(**fields, facts=facts)


def normalize(frames: np.ndarray) -> torch.Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32 with the reference processor's mean/std (0.5)."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).to(torch.float32)
    return ((pixels - 127.5) / 127.5).contiguous()


def video_pixels(frames: np.ndarray) -> torch.Tensor:
    """(B, T, S, S, 3) uint8 -> (B, T, C, S, S): what the reference processor makes of the
    videos: normalized, plus the temporal-difference channels its config asks for."""
    from sparrow.video.processing import TEMPORAL_DIFFERENCE_KEY, temporal_difference

    pixels = normalize(frames)
    parts = assembly.PROCESSOR_CONFIG.get(TEMPORAL_DIFFERENCE_KEY, 0)
    if parts:
        pixels = torch.stack([temporal_difference(video, parts) for video in pixels])
    return pixels


def pair_pixels(now: np.ndarray, before: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 frames and the earlier frames they are compared with -> (B, C, S, S):
    each frame as the reference processor feeds it to the tower (with its difference from the
    earlier frame when the processor config asks for temporal differences)."""
    from sparrow.video.processing import TEMPORAL_DIFFERENCE_KEY, temporal_difference

    pixels = normalize(now)
    if not assembly.PROCESSOR_CONFIG.get(TEMPORAL_DIFFERENCE_KEY, 0):
        return pixels
    earlier = normalize(before)
    pairs = zip(earlier, pixels, strict=True)
    return torch.stack([temporal_difference(torch.stack([b, n]), 2)[1] for b, n in pairs])


def conversation(facts: synthetic.VideoFacts, rng: random.Random, qa_turns: int = 3,
                 describe_share: float = 0.6) -> list[dict]:
    """A training conversation about one video: a detailed description (one of the reference
    styles) or a few question/answer turns; the video is in the first user turn."""
    video_part = {"type": "video"}
    if rng.random() < describe_share:
        prompt = rng.choice(DESCRIBE_PROMPTS)
        answer = synthetic.describe(facts, rng.randrange(synthetic.NUM_STYLES))
        return [
            {"role": "user", "content": [video_part, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": answer},
        ]
    candidates = synthetic.questions(facts)
    pairs = rng.sample(candidates, k=min(qa_turns, len(candidates)))
    messages: list[dict] = []
    for i, (question, answer) in enumerate(pairs):
        content = [video_part, {"type": "text", "text": question}] if i == 0 else question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages
