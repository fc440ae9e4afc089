"""The language-model stages' batches: conversations about clips rendered on the fly.

Each step of the caption and long stages trains on conversations about videos rendered from
fresh training seeds (through mp4 and back, as at inference) at one frame count drawn for the
step: detailed descriptions in the reference styles or question/answer turns, loss on the
assistant tokens, about `--caption-tokens` tokens per step. A batch depends on (seed, stage,
step) only, so a resumed stage sees the batches of an uninterrupted one, and `--workers`
processes can build them ahead of the training step (`batches`).
"""

from __future__ import annotations

import argparse
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from sparrow.reference import synthetic
from sparrow.reference.train import data, long
from sparrow.targets.llava import prompt_positions, video_position_step

# Caption stage: frame counts drawn with these weights (16 visual tokens per frame), so the
# language model learns to read short clips and long ones (64 frames = 1,025 visual tokens).
CAPTION_FRAMES = {4: 2, 8: 3, 12: 2, 16: 2, 24: 1, 32: 1, 48: 1, 64: 1}


def frame_weights(spec: str) -> dict[int, int]:
    """`--long-frames` "8:1,384:2" -> {8: 1, 384: 2} (frames: weight of the draw)."""
    try:
        weights = {int(f): int(w) for f, w in (item.split(":") for item in spec.split(",") if item.strip())}
    except ValueError:
        weights = {}
    if not weights or min(weights) < 1 or min(weights.values()) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: give FRAMES:WEIGHT pairs, comma-separated, both "
                                         "positive integers, e.g. 8:1,128:2,384:2")
    return weights


def frame_spec(weights: dict[int, int]) -> str:
    """{8: 1, 384: 2} -> "8:1,384:2", the form `frame_weights` reads."""
    return ",".join(f"{f}:{w}" for f, w in weights.items())


def tokenize_conversation(tokenizer, model_config, messages: list[dict], num_visual_tokens: int):
    """(input_ids (L,), label mask (L,) bool: True where the token is an assistant token the
    model must predict, its end-of-turn token included).

    Built turn by turn (the first user turn through `render_chat`, later turns in SmolLM2's
    template form); tests check the ids equal the template's rendering of the whole conversation.
    """
    from sparrow.video.processing import VideoInputs
    from sparrow.video.prompt import render_chat

    video = VideoInputs(pixel_values_videos=torch.empty(0), video_grid_thw=None,
                        num_visual_tokens=num_visual_tokens, frame_timestamps=[], family="llava_onevision")
    ids = render_chat(tokenizer, model_config, messages[:1], video)[0].tolist()
    mask = [False] * len(ids)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i in range(1, len(messages)):
        message = messages[i]
        if message["role"] == "assistant":
            answer = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [end]
            newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
            ids += answer + newline
            mask += [True] * len(answer) + [False] * len(newline)
        else:
            turn = f"<|im_start|>user\n{message['content']}<|im_end|>\n<|im_start|>assistant\n"
            turn_ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
            ids += turn_ids
            mask += [False] * len(turn_ids)
    return torch.tensor(ids), torch.tensor(mask)


def render_clip(seed: int, num_frames: int, resize, scratch: Path) -> tuple[np.ndarray, synthetic.VideoFacts]:
    """A training video rendered at exactly `num_frames` frames, through mp4 and back (as at
    inference), resized: ((T, S, S, 3) uint8, facts)."""
    from sparrow.video.io import read_video

    scene = synthetic.generate_scene(seed, num_frames, data.RENDER_SIZE, data.RENDER_SIZE)
    path = synthetic.write_scene(scene, scratch / f"{seed}-{num_frames}-{os.getpid()}.mp4")  # workers too
    frames = resize(read_video(path).frames)
    path.unlink()
    return frames, synthetic.scene_facts(scene)


def caption_batch(tokenizer, model_config, resize, scratch: Path, seed: int, step: int, budget: int,
                  per_frame: int, frames: dict[int, int] | None = None, stage: str = "caption",
                  pose_reach: int = 0) -> dict:
    """Step `step`'s batch: one frame count (weighted draw from `frames`, default
    CAPTION_FRAMES), fresh training seeds rendered on the fly, as many conversations as fit
    `budget` tokens (at least one). Each stage draws from its own RNG stream.

    `pose_reach` > 0: a `long.POSE_SHARE` of the rows get `long.skip_positions` up to it (from a stream
    of their own, so the videos and conversations are those of the same step without it) and
    the batch carries `position_ids`. The cut falls inside the video, so the skip stands for
    frames in between: at inference, large distances only ever separate the text from earlier
    frames and frames from frames, never the words of a turn (at least one video token stays
    next to the text after it).

    A clip of more than `long.FULL_GRADIENT_FRAMES` frames: one clip and as many conversations about
    it as fit `budget` tokens after the video (at least one), the batch carrying
    `prefix_length` (the tokens up to the video's last, the same in every row) for
    `long.frozen_prefix_step`; no PoSE (the clip is as long as the videos it stands for)."""
    frames = frames or CAPTION_FRAMES
    rng = random.Random(f"{seed}-{step}" if stage == "caption" else f"{seed}-{stage}-{step}")
    num_frames = rng.choices(list(frames), weights=list(frames.values()))[0]
    frozen = num_frames > long.FULL_GRADIENT_FRAMES  # one clip, its conversations after a frozen prefix
    rows, clips, prefix = _conversations(tokenizer, model_config, resize, scratch, rng, num_frames,
                                         num_frames * per_frame + 1, budget, frozen)
    batch = _padded(rows, tokenizer)
    batch["pixel_values_videos"] = data.video_pixels(np.stack(clips))  # (B or 1, T, C, S, S)
    if frozen:
        assert all(torch.equal(ids[:prefix], rows[0][0][:prefix]) for ids, _ in rows)
        batch["prefix_length"] = torch.tensor(prefix)
    step_size = video_position_step(model_config)
    if pose_reach or step_size != 1:
        skips = random.Random(f"{seed}-{stage}-{step}-positions")
        spread = 0 if frozen else pose_reach  # no PoSE after a frozen prefix
        batch["position_ids"] = _position_ids(rows, model_config.video_token_index, step_size, spread, skips)
    return batch


def _conversations(tokenizer, model_config, resize, scratch: Path, rng: random.Random, num_frames: int,
                   visual: int, budget: int, frozen: bool) -> tuple[list, list[np.ndarray], int]:
    """(rows: (input_ids, label mask) per conversation, clips: (T, S, S, 3) uint8 frames per
    clip, prefix: the tokens up to the video's last when `frozen`, else 0): conversations about
    fresh clips of `num_frames` frames (`visual` tokens each) until the next would pass `budget`
    tokens (at least one); when `frozen`, all about one clip, the budget counting the tokens
    after its prefix."""
    rows, clips, prefix = [], [], 0
    while True:
        fresh = not (frozen and clips)  # a new clip per conversation, or the long clip once
        if fresh:
            pixels, facts = render_clip(rng.randrange(data.EVAL_SEED_START), num_frames, resize, scratch)
        row = tokenize_conversation(tokenizer, model_config, data.conversation(facts, rng), visual)
        if frozen:  # the budget counts the words after the video, read with gradient
            prefix = int((row[0] == model_config.video_token_index).nonzero()[-1]) + 1
        if rows and sum(len(ids) - prefix for ids, _ in rows) + len(row[0]) - prefix > budget:
            break
        rows.append(row)
        if fresh:
            clips.append(pixels)
    return rows, clips, prefix


def _padded(rows: list, tokenizer) -> dict:
    """The rows right-padded to the longest: input_ids, labels (bool) and attention_mask (B, L)."""
    length = max(len(ids) for ids, _ in rows)
    size = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((size, length), pad, dtype=torch.long)
    labels = torch.zeros((size, length), dtype=torch.bool)
    attention = torch.zeros((size, length), dtype=torch.long)
    for row, (ids, mask) in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = mask
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def _position_ids(rows: list, video_token: int, step_size: float, pose_reach: int,
                  skips: random.Random) -> torch.Tensor:
    """(B, L) the positions inference gives each row's prompt (visual tokens advance by
    `step_size`), a `long.POSE_SHARE` of the rows moved on by PoSE skips inside the video when
    `pose_reach` > 0 (drawn from `skips`)."""
    length = max(len(ids) for ids, _ in rows)
    positions = torch.arange(length, dtype=torch.float32 if step_size != 1 else torch.long)
    positions = positions.repeat(len(rows), 1)  # (B, L); pads keep counting, unread
    for row, (ids, _) in enumerate(rows):
        # the positions inference gives this prompt (visual tokens advance by step_size)...
        own, _ = prompt_positions(ids, video_token, step_size)
        span = int(math.ceil(float(own[0, -1]))) + 1
        if pose_reach and skips.random() < long.POSE_SHARE:
            # ...moved on by PoSE skips inside the video, up to pose_reach positions in all
            video = (ids == video_token).nonzero()[:, 0]
            within = range(int(video[0]) + 1, int(video[-1]) + 1)
            jumps = long.skip_positions(len(ids), pose_reach - span + len(ids), skips, within)
            own = own + (jumps - torch.arange(len(ids)))
        positions[row, : len(ids)] = own[0]
        positions[row, len(ids):] = own[0, -1] + torch.arange(1, length - len(ids) + 1)
    return positions


class _Batches(torch.utils.data.Dataset):
    """Step s -> `caption_batch(..., step=s, ...)`, so that `--workers` processes can render
    and tokenize the batches ahead of the training step (the batch depends on (seed, step)
    only: the same with or without workers, tested)."""

    def __init__(self, first: int, steps: int, *args, **kwargs):
        self.first, self.steps, self.args, self.kwargs = first, steps, args, kwargs

    def __len__(self) -> int:
        return self.steps - self.first

    def __getitem__(self, index: int) -> dict:
        tokenizer, config, resize, scratch, seed, *rest = self.args
        step = self.first + index
        return caption_batch(tokenizer, config, resize, scratch, seed, step, *rest, **self.kwargs)


def batches(first: int, steps: int, workers: int, *args, **kwargs):
    """The batches of steps `first`..`steps`-1 in order (`caption_batch`'s arguments less the
    step), built in `workers` processes ahead of use (0: here, when asked for). Rendering a long
    clip through mp4 and back costs little beside a CPU's training step but much of a GPU's."""
    data_set = _Batches(first, steps, *args, **kwargs)
    if not workers:
        return (data_set[i] for i in range(len(data_set)))
    loader = torch.utils.data.DataLoader(data_set, batch_size=None, num_workers=workers, prefetch_factor=4)
    return iter(loader)
