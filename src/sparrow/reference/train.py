"""Train the reference target's eyes: `python -m sparrow.reference.train RUN_DIR ...`.

Stages, each resumable exactly (checkpoints every `--save-every` steps, written atomically;
the batch of step s is drawn from an RNG seeded by (seed, s), so a resumed run sees the same
data as an uninterrupted one):

1. `eyes`: the vision tower alone, supervised directly by the generator's ground truth through
   linear heads on its last hidden states: per patch the colour / shape / size class of the
   object covering it and that object's centre, and (the tower also sees each frame's
   difference from an earlier one) how that object moved since the earlier frame, whether it
   appeared or changed colour, and whether an object that was on the patch has left; per frame
   the background kind and colours and the object count. Cheap (no language model), and it
   makes the tower's features state the facts linearly before the language model sees them.
   The labels are per 2x2 block of patches (its main object's): LLaVA-OneVision pools the
   projected patches 2x2 before the language model, and eyes trained per patch (64 a frame)
   lost exactly what mattered there: the tower read a moving patch's direction at 0.98, a
   linear probe on the tokens SmolLM2 received at 0.15 (chance 0.25), and the caption stage
   never learned motion (0.10 at step 1,000). The heads read each of a block's four patches on
   its own, every one labelled with its block's facts (`--eyes-read every-patch`, the
   default), so that every patch state carries them and the projector (applied per patch,
   before the pooling) need not rebuild them from a mean. `--eyes-read block-mean` reads each
   block's mean instead; measured on the same corpus, seeds and steps, every-patch left the
   projector's pooled tokens much closer to their word-embedding targets (align stage: squared
   error 0.046 of the targets' power against 0.147, block region read back 0.73 against 0.33,
   moving direction 0.58 against 0.44) and a linear probe on the tokens SmolLM2 receives read
   the moving direction at 0.73 against 0.67 (160 held-out clips).
1b. `align`: the projector alone (tower frozen, no language model), its pooled output (the
   visual tokens as the LM receives them) regressed onto SmolLM2's word embeddings of what is
   on each block ('small red circle', 'beige noisy'), so the
   language model can read the visual tokens from the first caption step. Without it the
   projector learned through the LM: after 250 caption steps the descriptions were fluent but
   ignored the video (held-out key-fact score 0.15, every background "plain grey") and the
   visual tokens' norm had grown to 27x that of a word embedding.
2. `caption`: the whole reference model on conversations about videos rendered on the fly
   from fresh training seeds at 4 to 64 frames (`CAPTION_FRAMES`; through mp4 and back, as at
   inference): detailed descriptions in the reference styles or question/answer turns, loss on
   the assistant tokens, about `--caption-tokens` tokens per step.
   Trained: the projector, the image newline, and LoRA adapters on SmolLM2's linear layers
   (the tower stays as stage 1 left it). bf16 autocast where the CPU has it (`autocast`).
2b. `long`: the caption stage continued (from its final weights, lower learning rates) on
   long clips, up to 384 frames (~6,150 visual tokens), half the steps on short clips of 8-64
   frames (`LONG_FRAMES`), so that short videos stay read (MODEL_CARD.md, stage 2c). Trained
   only to 64 frames, the model answered videos of 383 frames (6,129 tokens) with a sentence or
   two (held-out key-fact score 0.34 on 2 videos, against 0.75 at 64 frames). A 6k-token step
   costs ~50 s on 2 threads (CPU flash attention forward + backward is half of it), so this
   stage is short and comes last. `--long-pose-reach N` spreads half the rows' position ids up
   to N (`skip_positions`, PoSE; default `LONG_POSE_REACH`), so that ~6k-token steps also meet
   the relative distances of a 25k-token video: measured against consecutive positions, it read
   6k- and 25k-token videos better and 1.5k-token ones as well. Visual tokens advance the
   position by `--video-position-step` (default 1/4, `assembly.VIDEO_POSITION_STEP`) in these
   stages as at inference. Clips of more than `FULL_GRADIENT_FRAMES` (512) frames, e.g.
   `--long-frames ...,1024:1,1600:2` for 16k- and 25k-token videos, train after a frozen
   prefix (`frozen_prefix_step`): read once without gradient, then ~18 conversations about the
   clip learn from its cached states (a 1,024-frame step: 191 s on 2 threads in bf16).
3. `export`: write the shipped weights (tower, projector, newline, LoRA factors) of the last
   language-model stage that ran to one safetensors file, which `sparrow.reference` merges
   into SmolLM2 at assembly.

Sittings: `--continue-from WEIGHTS` starts a run directory from an exported weights file
instead of from the eyes stage: the tower, projector, newline and LoRA factors (fp16 in the
file) are the file's, the language-model stage goes on at the step the file records, with fresh
AdamW moments re-warmed over `REWARM_STEPS` steps (the batches are those of an uninterrupted
run: they depend on (seed, step) only). The machines this project trains on are fresh every
session and only the repository carries over, so a run of many hours is trained in sittings,
each continuing from the previous sitting's export (kept in the repository's checkpoints/);
the file records the steps at which its optimizer started fresh (`caption_fresh_optimizer_at`),
which with the defaults is the whole recipe, and each start of a language-model stage logs the
CPU capability and precision it trains with (the machines differ: `autocast`).

Devices: the eyes and align stages run on the CPU; the language-model stages take `--device`
(e.g. cuda: bf16 autocast there) and `--workers N` processes that render and tokenize batches
ahead of the step. On one H200 a long-stage step took 0.57 s (two runs sharing the GPU; ~46 s on
2 threads of an AVX2 EPYC), the batches built by 5 workers each.

Seeds: training videos use seeds [0, 10**6); validation and `sparrow eval-target` use seeds
from `EVAL_SEED_START` up, never trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparrow.reference import assembly, synthetic
from sparrow.reference import train_data as data
from sparrow.targets.llava import prompt_positions, video_position_step
from sparrow.video.processing import count_visual_tokens

EVAL_SEED_START = synthetic.EVAL_SEED_START
VAL_SEEDS = range(EVAL_SEED_START + 900_000, EVAL_SEED_START + 900_000 + 200)
SHARD_VIDEOS = 500
# Caption stage: frame counts drawn with these weights (16 visual tokens per frame), so the
# language model learns to read short clips and long ones (64 frames = 1,025 visual tokens).
CAPTION_FRAMES = {4: 2, 8: 3, 12: 2, 16: 2, 24: 1, 32: 1, 48: 1, 64: 1}
EVAL_FRAMES = ((16, 8), (64, 4))  # (frames, videos) of the held-out check during caption training
# Long stage: long clips (one conversation per step) and as many short ones, so that the stage
# goes on with the caption stage's work on short videos instead of trading it away (MODEL_CARD.md,
# stage 2c: +0.05 / +0.09 at 0.5k / 1.5k tokens against 8:1,32:1,96:1,128:2,192:2,256:2,384:2).
LONG_FRAMES = {8: 2, 16: 2, 32: 2, 64: 2, 96: 1, 128: 1, 192: 1, 256: 2, 384: 1}
LONG_EVAL_FRAMES = ((16, 8), (64, 4), (384, 2))
# Long stage with --long-pose-reach: this share of the rows get skip positions (`skip_positions`).
POSE_SHARE = 0.5
# PoSE against consecutive positions from the same caption weights (200 steps each, H200, 8
# held-out videos a length, plain positions, reach 26,000): key-fact accuracy 0.530 / 0.688 /
# 0.467 at 1.5k / 6k / 25k visual tokens against 0.519 / 0.537 / 0.402 (the caption stage alone:
# 0.430 at 6k, 0.298 at 25k). MODEL_CARD.md, "Long stage". The default reach is a 25,600-token
# video's span at the default video position step (6,400 positions) and its prompt, rounded up.
LONG_POSE_REACH = 7000
# Long stage: clips of more frames than this are too long to backpropagate through on a CPU
# (a 512-frame step, 8,193 visual tokens, takes ~77 s on 2 threads in bf16; a 25k-token one would
# take ~10 min and more memory than the machine has). Such a clip is read once without gradient
# and several conversations about it learn from its cached states: the words learn to read a
# long video, the video's own states stay those of the current weights (`frozen_prefix_step`).
FULL_GRADIENT_FRAMES = 512
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REWARM_STEPS = 20  # learning-rate re-warm-up after a sitting starts with fresh AdamW moments


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def _resize_fn():
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
        resize = resize or _resize_fn()
        data.build_shard(path, seeds, tower["image_size"], tower["patch_size"], resize)
    return train, val


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------------------------


def _save(path: Path, state: dict) -> None:
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _to_cpu(state):
    """`state` (nested dicts / lists of tensors, e.g. an optimizer's state_dict) on the CPU, so
    that a checkpoint written on a GPU loads anywhere."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(value) for value in state)
    return state


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Stage 1: eyes
# ---------------------------------------------------------------------------------------------


def build_tower() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**assembly.TOWER))


class EyesHeads(nn.Module):
    """Linear read-outs of the tower's last hidden states at the visual tokens' 2x2 blocks
    (B frames, P blocks, hidden H): each block's mean state, or one of its patches (`eyes_view`)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = nn.Linear(hidden, len(synthetic.COLOUR_NAMES) + 1)
        self.shape = nn.Linear(hidden, len(synthetic.SHAPES) + 1)
        self.size = nn.Linear(hidden, len(data.SIZE_NAMES) + 1)
        self.centre = nn.Linear(hidden, 2)
        self.background = nn.Linear(hidden, len(synthetic.BACKGROUND_KINDS))
        self.background_colours = nn.Linear(hidden, len(data.BACKGROUND_COLOUR_NAMES))
        self.count = nn.Linear(hidden, 8)  # objects visible in the frame
        self.motion = nn.Linear(hidden, 1 + len(data.MOTIONS))  # 0: no object seen in both frames
        self.changes = nn.Linear(hidden, len(CHANGES))  # appeared / recoloured / vanished logits

    def losses(self, states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """states (B, P, H); batch labels flattened to (B, P) / (B, P, 2) / (B,)."""
        pooled = states.mean(dim=1)  # (B, H)
        metrics, total = {}, 0.0
        for name in ("colour", "shape", "size"):
            logits = getattr(self, name)(states)  # (B, P, C)
            target = batch[name]  # (B, P)
            objects = target > 0
            # Objects cover ~10% of the patches: a loss over all patches is mostly "background"
            # and left shape at chance (0.19 after 500 steps), so object patches get their own.
            total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            if objects.any():
                total = total + 2 * F.cross_entropy(logits[objects], target[objects])
            correct = (logits.argmax(-1) == target)
            metrics[f"{name}_acc_objects"] = correct[objects].float().mean().item() if objects.any() else 1.0
            metrics[f"{name}_acc"] = correct.float().mean().item()
        objects = batch["colour"] > 0  # (B, P)
        if objects.any():
            centre_error = (self.centre(states)[objects] - batch["centre"][objects]).abs()
            total = total + 10 * centre_error.mean()
            metrics["centre_mae"] = centre_error.mean().item()
        if "motion" in batch:
            total = total + self._temporal(states, batch, metrics)
        for name in ("background", "count"):
            logits = getattr(self, name)(pooled)
            total = total + F.cross_entropy(logits, batch[name])
            metrics[f"{name}_acc"] = (logits.argmax(-1) == batch[name]).float().mean().item()
        logits = self.background_colours(pooled)
        total = total + F.binary_cross_entropy_with_logits(logits, batch["background_colours"])
        metrics["background_colours_acc"] = ((logits > 0) == (batch["background_colours"] > 0.5)).all(
            -1).float().mean().item()
        metrics["loss"] = total.item()
        return total, metrics

    def _temporal(self, states: torch.Tensor, batch: dict, metrics: dict) -> torch.Tensor:
        """Motion of each patch's object (on patches whose object is in both frames; moving
        ones weigh 4x, being rarer) and the three changes (positives weigh 8x)."""
        target = batch["motion"]  # (B, P): 0 none, 1 still, 2.. a direction
        labelled, moving = target > 0, target > 1
        logits = self.motion(states)
        total = 0.0
        if labelled.any():
            weight = 1 + 3 * moving[labelled].float()
            loss = F.cross_entropy(logits[labelled], target[labelled], reduction="none")
            total = (loss * weight).sum() / weight.sum()
            correct = logits.argmax(-1) == target
            metrics["motion_acc"] = correct[labelled].float().mean().item()
            metrics["moving_acc"] = correct[moving].float().mean().item() if moving.any() else 1.0
        changes = self.changes(states)  # (B, P, 3)
        for i, name in enumerate(CHANGES):
            truth = batch[name].float()  # (B, P)
            total = total + F.binary_cross_entropy_with_logits(
                changes[..., i], truth, pos_weight=torch.tensor(8.0))
            said = changes[..., i] > 0
            positive = truth > 0
            metrics[f"{name}_recall"] = said[positive].float().mean().item() if positive.any() else 1.0
            metrics[f"{name}_false_rate"] = said[~positive].float().mean().item()
        return total


CHANGES = ("appeared", "recoloured", "vanished")
PAIR_STRIDES = (1, 2, 3)  # frames between a pair's earlier and later frame (8-frame clips)


def _frame_batch(shard: data.Shard, rng: np.random.Generator, size: int) -> dict:
    """`size` frames, each with the earlier frame the tower compares it with (PAIR_STRIDES
    before it, or frame 0, as the processor does at the start of a clip), and their labels per
    2x2 block of patches (a visual token after LLaVA-OneVision's pooling; `data.block_owner`):
    those of the object covering most of the block, and what happened to it since the earlier
    frame."""
    n, t = shard.frames.shape[:2]
    videos, frames = rng.integers(0, n, size), rng.integers(0, t, size)
    before = np.maximum(frames - rng.choice(PAIR_STRIDES, size), 0)
    owner, pick = data.block_owner(shard.owner[videos])  # (B, T, G/2, G/2) every frame's blocks
    chosen = pick[np.arange(size), frames]  # (B, G/2, G/2)

    def flat(labels: np.ndarray) -> torch.Tensor:  # (N, T, G, G, ...) -> (B, blocks, ...)
        quads = data.to_blocks(labels[videos, frames], 1)  # (B, G/2, G/2, 4, ...)
        index = chosen.reshape(*chosen.shape, 1, *([1] * (quads.ndim - 4)))
        return torch.from_numpy(np.take_along_axis(quads, index, 3).squeeze(3)).flatten(1, 2)

    temporal = data.temporal_labels(owner, shard.positions[videos], shard.visible[videos],
                                    shard.colour_ids[videos], frames, before)
    return {
        "pixels": data.pair_pixels(shard.frames[videos, frames], shard.frames[videos, before]),
        **{name: torch.from_numpy(value).flatten(1, 2) for name, value in temporal.items()},
        "colour": flat(shard.colour), "shape": flat(shard.shape), "size": flat(shard.size),
        "centre": flat(shard.centre),
        "count": torch.from_numpy(shard.count[videos, frames]),
        "background": torch.from_numpy(shard.background[videos]),
        "background_colours": torch.from_numpy(shard.background_colours[videos]),
    }


def tower_states(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, P, H): the hidden states LLaVA-OneVision takes (vision_feature_layer -1, 'full')."""
    return tower(pixels, output_hidden_states=True).hidden_states[-1]


def block_patches(states: torch.Tensor) -> torch.Tensor:
    """(B, G*G, H) per patch -> (B, 4, G*G/4, H): [b, k, n] is patch k (row-major within its
    2x2 block) of block n (row-major over the grid's blocks)."""
    batch, patches, hidden = states.shape
    grid = math.isqrt(patches)
    return (states.reshape(batch, grid // 2, 2, grid // 2, 2, hidden).permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, 4, patches // 4, hidden))


def pooled(states: torch.Tensor) -> torch.Tensor:
    """(B, G*G, H) per patch -> (B, G*G/4, H): the mean of each 2x2 block, which is what
    LLaVA-OneVision's `apply_pooling` (bilinear halving of an even grid) makes of a frame's
    projected patches before the language model sees them."""
    return block_patches(states).mean(1)


EYES_READS = ("every-patch", "block-mean")  # the first is the default


def eyes_view(states: torch.Tensor, batch: dict, read: str) -> tuple[torch.Tensor, dict]:
    """What the eyes heads read, with matching labels. "block-mean": the mean of each 2x2 block
    (B, G*G/4, H), as the language model receives it. "every-patch": each of a block's four
    patches on its own, every one labelled with its block's facts (4B, G*G/4, H): view 4b + k
    holds patch k (row-major within the block) of every block of frame b, so each patch state
    must carry its block's facts, not only their mean."""
    if read == "block-mean":
        return pooled(states), batch
    if read != "every-patch":
        raise ValueError(f"unknown eyes read {read!r}: one of {EYES_READS}")
    labels = {name: value if name == "pixels" else value.repeat_interleave(4, 0)
              for name, value in batch.items()}
    return block_patches(states).flatten(0, 1), labels


def train_eyes(run: Path, train: list[Path], val: Path, steps: int, batch: int, lr: float,
               seed: int, save_every: int, eval_every: int, stop_at: int | None = None,
               read: str = EYES_READS[0]) -> Path:
    """Stage 1 up to `steps` (resuming from run/eyes.pt); `stop_at` stops early after saving,
    as an interruption would (the schedule still spans `steps`). `read`: see `eyes_view`."""
    checkpoint, log = run / "eyes.pt", run / "eyes.jsonl"
    torch.manual_seed(seed)
    tower = build_tower()
    heads = EyesHeads(assembly.TOWER["hidden_size"])
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if "heads" not in state:
            raise SystemExit(f"{checkpoint} holds the tower of {state.get('continued_from')} "
                             "(--continue-from), not an eyes stage to resume: use a new run directory "
                             "for the eyes stage")
        if state.get("read", "block-mean") != read:
            raise SystemExit(f"{checkpoint} was trained with --eyes-read {state.get('read', 'block-mean')}, "
                             f"not {read}: use a new run directory, or the same --eyes-read")
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resuming eyes at step {start}/{steps}", flush=True)
    if start >= steps:
        return checkpoint
    corpus = data.load_corpus(train)
    held_out = data.load_shard(val)
    schedule = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    began = time.perf_counter()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="eyes", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step)
        batch_data = _frame_batch(corpus, np.random.default_rng([seed, step]), batch)
        tower.train()
        loss, metrics = heads.losses(*eyes_view(tower_states(tower, batch_data["pixels"]), batch_data, read))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done = step + 1
        if done % eval_every == 0 or done == steps:
            tower.eval()
            with torch.no_grad():
                val_batch = _frame_batch(held_out, np.random.default_rng([seed, 2**31]), 512)
                states = tower_states(tower, val_batch["pixels"])
                _, val_metrics = heads.losses(*eyes_view(states, val_batch, read))
            _log(log, {"step": done, "train": metrics, "val": val_metrics,
                       "elapsed_s": round(time.perf_counter() - began, 1)})
            tqdm.write(f"eyes step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in val_metrics.items()))
        if done % save_every == 0 or done in (steps, stop_at):
            _save(checkpoint, {"tower": tower.state_dict(), "heads": heads.state_dict(),
                               "optimizer": optimizer.state_dict(), "step": done, "read": read})
        if done == stop_at:
            break
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Stage 1b: align the projector to SmolLM2's word embeddings
# ---------------------------------------------------------------------------------------------

BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "noisy", "stripes": "striped"}


def word_embedding(tokenizer, embeddings: torch.Tensor, word: str) -> torch.Tensor:
    """(D,) SmolLM2's input embedding of ' word' (mean over its tokens if it has several)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return embeddings[ids].mean(dim=0)


def region_index(centre: torch.Tensor) -> torch.Tensor:
    """(...,) index into `synthetic.REGIONS` of (..., 2) points (x, y) in [0, 1], as
    `synthetic.region_of` reads them."""
    third = lambda v: torch.where(v < 1 / 3, 0, torch.where(v > 2 / 3, 2, 1))  # noqa: E731
    centre = centre.double()  # the thirds as Python floats, exactly as region_of compares
    return 3 * third(centre[..., 1]) + third(centre[..., 0])


def region_table(tokenizer, embeddings: torch.Tensor) -> torch.Tensor:
    """(9, D) per region of `synthetic.REGIONS` the mean embedding of its words ('top', 'left')."""
    return torch.stack([phrase_embedding(tokenizer, embeddings, region) for region in synthetic.REGIONS])


# The words the descriptions use for what happens, mixed into a patch's align target when it
# happens on that patch (`data.MOTIONS` order after "still", then CHANGES order).
MOTION_WORDS = ("moves left", "moves right", "moves up", "moves down")
CHANGE_WORDS = ("enters", "changes colour", "leaves")


def phrase_embedding(tokenizer, embeddings: torch.Tensor, phrase: str) -> torch.Tensor:
    """(D,) the mean of the word embeddings of a phrase's words."""
    return torch.stack([word_embedding(tokenizer, embeddings, w) for w in phrase.split()]).mean(dim=0)


def patch_targets(tokenizer, embeddings: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, P, D) what each patch's projected feature should look like: the mean word embedding
    of the object on it and of where that object is ('small', 'red', 'circle', 'top left': the
    third of the frame its centre is in, the words the descriptions use), or of the background
    ('beige', 'noisy'). Why the position: a visual token's place in the frame is otherwise only
    its index among the frame's 16 tokens, and a caption model aligned without it (step 1,000
    of 3,000) named the right objects (0.91) but put them in near-random places and got
    almost no events right (motion 0.40, enter / leave / colour change 0).
    What happens on the patch since the earlier frame the tower compares it with joins the
    mean as one more term each: its object's motion ('moves left'), 'enters', 'changes
    colour'; on the background, 'leaves' where an object has just gone."""
    def table(words: list[str]) -> torch.Tensor:  # (len(words), D)
        return torch.stack([phrase_embedding(tokenizer, embeddings, w) for w in words])

    sizes = table(list(data.SIZE_NAMES))
    colours = table(list(synthetic.COLOUR_NAMES))
    shapes = table(list(synthetic.SHAPES))
    kinds = table([BACKGROUND_WORDS[k] for k in synthetic.BACKGROUND_KINDS])
    bg_colours = table(list(data.BACKGROUND_COLOUR_NAMES))
    objects = batch["colour"] > 0  # (B, P)
    index = lambda labels: (labels - 1).clamp(min=0)  # noqa: E731
    where = region_table(tokenizer, embeddings)[region_index(batch["centre"])]  # (B, P, D)
    thing = sizes[index(batch["size"])] + colours[index(batch["colour"])] + shapes[index(batch["shape"])]
    thing, terms = thing + where, torch.full(objects.shape, 4.0)
    hot = batch["background_colours"]  # (B, 4)
    background = (hot @ bg_colours + kinds[batch["background"]])[:, None, :].expand_as(thing)  # (B, P, D)
    background_terms = (hot.sum(-1, keepdim=True) + 1).expand(objects.shape)
    if "motion" in batch:
        motions, changes = table(list(MOTION_WORDS)), table(list(CHANGE_WORDS))
        moving = (batch["motion"] > 1).float()  # (B, P)
        thing = thing + moving[..., None] * motions[(batch["motion"] - 2).clamp(min=0)]
        terms = terms + moving
        for i, name in enumerate(CHANGES[:2]):  # appeared, recoloured: on the object
            happened = batch[name].float()
            thing, terms = thing + happened[..., None] * changes[i], terms + happened
        left = batch["vanished"].float()  # on what is background now
        background, background_terms = background + left[..., None] * changes[2], background_terms + left
    return torch.where(objects[..., None], thing / terms[..., None],
                       background / background_terms[..., None])  # (B, P, D)


def train_align(run: Path, train: list[Path], val: Path, steps: int, batch: int, lr: float, seed: int,
                eval_every: int) -> Path:
    """Stage 1b: train the projector alone (tower frozen, no language model) so that a patch's
    visual token starts out near the word embeddings of what is on it; the caption stage then
    starts from tokens SmolLM2 can already read, instead of learning the mapping through the LM.
    Cheap (a few minutes); object patches weigh 5x (they are ~10% of the patches)."""
    checkpoint, log = run / "align.pt", run / "align.jsonl"
    if checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["step"] >= steps:
        return checkpoint
    torch.manual_seed(seed)
    model, tokenizer = assembly.build_reference(assembly.TOWER, _tower_state(run / "eyes.pt"),
                                                 assembly.ROPE_SCALING, seed=seed,
                                                 video_position_step=assembly.VIDEO_POSITION_STEP)
    tower, projector = model.model.vision_tower.eval(), model.model.multi_modal_projector
    embeddings = model.model.language_model.embed_tokens.weight.detach()  # (V, D)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    corpus = data.load_corpus(train)
    held_out = data.load_shard(val)

    regions = region_table(tokenizer, embeddings)  # (9, D)
    motions = torch.stack([phrase_embedding(tokenizer, embeddings, w) for w in MOTION_WORDS])  # (4, D)

    def loss_of(frames: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            states = tower_states(tower, frames["pixels"])  # (B, P, H)
        target = patch_targets(tokenizer, embeddings, frames)  # (B, P, D)
        tokens = pooled(projector(states))  # (B, blocks, D): the visual tokens SmolLM2 reads
        error = (tokens - target).pow(2).mean(-1)  # (B, P)
        objects = frames["colour"] > 0
        weight = 1 + 4 * objects.float()
        # Where the object is, read back from its tokens: the region whose target (same object
        # words, that region's words) is nearest.
        terms = (4 + frames["appeared"].float() + frames["recoloured"].float()
                 + (frames["motion"] > 1).float())[objects][:, None, None]  # (N, 1, 1) words averaged
        truth = region_index(frames["centre"][objects])  # (N,)
        others = target[objects][:, None] + (regions[None] - regions[truth][:, None]) / terms  # (N, 9, D)
        read = (tokens[objects][:, None] - others).pow(2).sum(-1).argmin(-1) == truth
        metrics = {"val_relative_error": (error.mean() / target.pow(2).mean(-1).mean()).item(),
                   "val_region_accuracy": read.float().mean().item()}
        moving = frames["motion"][objects] > 1  # and which way it moves, among the four
        if moving.any():
            direction = frames["motion"][objects][moving] - 2  # (M,)
            shift = (motions[None] - motions[direction][:, None]) / terms[moving]  # (M, 4, D)
            others = target[objects][moving][:, None] + shift
            read = (tokens[objects][moving][:, None] - others).pow(2).sum(-1).argmin(-1) == direction
            metrics["val_motion_accuracy"] = read.float().mean().item()
        return (error * weight).sum() / weight.sum(), metrics

    for step in tqdm(range(steps), desc="align", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, _ = loss_of(_frame_batch(corpus, np.random.default_rng([seed, 7, step]), batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                _, metrics = loss_of(_frame_batch(held_out, np.random.default_rng([seed, 2**31]), 256))
            _log(log, {"step": step + 1, "train_loss": loss.item(), **metrics})
            tqdm.write(f"align step {step + 1}: held-out squared error / target power "
                       f"{metrics['val_relative_error']:.3f}, region read from object tokens "
                       f"{metrics['val_region_accuracy']:.3f}, motion of moving objects "
                       f"{metrics.get('val_motion_accuracy', float('nan')):.3f}")
    _save(checkpoint, {"projector": projector.state_dict(), "step": steps})
    return checkpoint


def _tower_state(eyes: Path) -> dict:
    tower = torch.load(eyes, weights_only=True)["tower"]
    return {f"model.vision_tower.{k}": v for k, v in tower.items()}


# ---------------------------------------------------------------------------------------------
# Stage 2: caption
# ---------------------------------------------------------------------------------------------


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))


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


def skip_positions(length: int, reach: int, rng: random.Random, within: range | None = None,
                   chunks: int = 2) -> torch.Tensor:
    """Position ids (length,) for a sequence of `length` tokens that span up to `reach`
    positions: the sequence is cut at random (each piece after a cut starts at an index drawn
    from `within`, default anywhere) into `chunks` contiguous pieces and each piece after the
    first is moved on by a skip (sorted uniform draws in [0, reach - length]), so positions stay
    in order, consecutive inside a piece, and below `reach`.

    PoSE (Zhu et al., ICLR 2024, arXiv 2309.10400): trained this way, a model meets relative
    distances up to `reach` while attending over `length` real tokens only, which is what a
    ~6k-token long-stage step can teach about 25k-token videos (a real 25k step costs ~10x).
    Training only; at inference the model reads its own consecutive positions."""
    positions = torch.arange(length)
    within = range(1, length) if within is None else within
    if reach <= length or len(within) < chunks - 1:
        return positions
    cuts = sorted(rng.sample(within, chunks - 1))
    skips = sorted(rng.randint(0, reach - length) for _ in range(chunks - 1))
    for cut, skip in zip(cuts, skips, strict=True):
        positions[cut:] = torch.arange(cut, length) + skip
    return positions


def _caption_batch(tokenizer, model_config, resize, scratch: Path, seed: int, step: int, budget: int,
                   per_frame: int, frames: dict[int, int] | None = None, stage: str = "caption",
                   pose_reach: int = 0) -> dict:
    """Step `step`'s batch: one frame count (weighted draw from `frames`, default
    CAPTION_FRAMES), fresh training seeds rendered on the fly, as many conversations as fit
    `budget` tokens (at least one). Each stage draws from its own RNG stream.

    `pose_reach` > 0: a `POSE_SHARE` of the rows get `skip_positions` up to it (from a stream
    of their own, so the videos and conversations are those of the same step without it) and
    the batch carries `position_ids`. The cut falls inside the video, so the skip stands for
    frames in between: at inference, large distances only ever separate the text from earlier
    frames and frames from frames, never the words of a turn (at least one video token stays
    next to the text after it).

    A clip of more than `FULL_GRADIENT_FRAMES` frames: one clip and as many conversations about
    it as fit `budget` tokens after the video (at least one), the batch carrying
    `prefix_length` (the tokens up to the video's last, the same in every row) for
    `frozen_prefix_step`; no PoSE (the clip is as long as the videos it stands for)."""
    frames = frames or CAPTION_FRAMES
    rng = random.Random(f"{seed}-{step}" if stage == "caption" else f"{seed}-{stage}-{step}")
    num_frames = rng.choices(list(frames), weights=list(frames.values()))[0]
    visual = num_frames * per_frame + 1
    frozen = num_frames > FULL_GRADIENT_FRAMES  # one clip, its conversations after a frozen prefix
    rows, clips, prefix = [], [], 0
    while True:
        fresh = not (frozen and clips)  # a new clip per conversation, or the long clip once
        if fresh:
            pixels, facts = render_clip(rng.randrange(EVAL_SEED_START), num_frames, resize, scratch)
        row = tokenize_conversation(tokenizer, model_config, data.conversation(facts, rng), visual)
        if frozen:  # the budget counts the words after the video, read with gradient
            prefix = int((row[0] == model_config.video_token_index).nonzero()[-1]) + 1
        if rows and sum(len(ids) - prefix for ids, _ in rows) + len(row[0]) - prefix > budget:
            break
        rows.append(row)
        if fresh:
            clips.append(pixels)
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
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
             "pixel_values_videos": data.video_pixels(np.stack(clips))}  # (B or 1, T, C, S, S)
    if frozen:
        assert all(torch.equal(ids[:prefix], rows[0][0][:prefix]) for ids, _ in rows)
        batch["prefix_length"] = torch.tensor(prefix)
    step_size = video_position_step(model_config)
    if pose_reach or step_size != 1:
        skips = random.Random(f"{seed}-{stage}-{step}-positions")
        positions = torch.arange(length, dtype=torch.float32 if step_size != 1 else torch.long)
        positions = positions.repeat(size, 1)  # (B, L); pads keep counting, unread
        for row, (ids, _) in enumerate(rows):
            # the positions inference gives this prompt (visual tokens advance by step_size)...
            own, _ = prompt_positions(ids, model_config.video_token_index, step_size)
            span = int(math.ceil(float(own[0, -1]))) + 1
            if pose_reach and not frozen and skips.random() < POSE_SHARE:
                # ...moved on by PoSE skips inside the video, up to pose_reach positions in all
                video = (ids == model_config.video_token_index).nonzero()[:, 0]
                within = range(int(video[0]) + 1, int(video[-1]) + 1)
                jumps = skip_positions(len(ids), pose_reach - span + len(ids), skips, within)
                own = own + (jumps - torch.arange(len(ids)))
            positions[row, : len(ids)] = own[0]
            positions[row, len(ids):] = own[0, -1] + torch.arange(1, length - len(ids) + 1)
        batch["position_ids"] = positions
    return batch


class _Batches(torch.utils.data.Dataset):
    """Step s -> `_caption_batch(..., step=s, ...)`, so that `--workers` processes can render
    and tokenize the batches ahead of the training step (the batch depends on (seed, step)
    only: the same with or without workers, tested)."""

    def __init__(self, first: int, steps: int, *args, **kwargs):
        self.first, self.steps, self.args, self.kwargs = first, steps, args, kwargs

    def __len__(self) -> int:
        return self.steps - self.first

    def __getitem__(self, index: int) -> dict:
        tokenizer, config, resize, scratch, seed, *rest = self.args
        step = self.first + index
        return _caption_batch(tokenizer, config, resize, scratch, seed, step, *rest, **self.kwargs)


def batches(first: int, steps: int, workers: int, *args, **kwargs):
    """The batches of steps `first`..`steps`-1 in order (`_caption_batch`'s arguments less the
    step), built in `workers` processes ahead of use (0: here, when asked for). Rendering a
    384-frame clip through mp4 and back takes ~1 s of one core: nothing beside a CPU's ~100 s
    step, but the larger part of a GPU's."""
    data_set = _Batches(first, steps, *args, **kwargs)
    if not workers:
        return (data_set[i] for i in range(len(data_set)))
    loader = torch.utils.data.DataLoader(data_set, batch_size=None, num_workers=workers, prefetch_factor=4)
    return iter(loader)


def language_states(model, batch: dict) -> torch.Tensor:
    """The language model's last hidden states (B, L, D) of a training batch, every row one
    sequence under plain causal attention.

    The mask passed is all ones, not the padding mask (see `caption_loss`): SDPA still takes its
    causal path, and transformers does not read position ids that jump (`skip_positions`) as
    packed sequences, which it does whenever there is neither a mask nor a cache (tested)."""
    ids = batch["input_ids"]
    return model.model(input_ids=ids, pixel_values_videos=batch["pixel_values_videos"],
                       attention_mask=torch.ones_like(ids), position_ids=batch.get("position_ids"),
                       use_cache=False).last_hidden_state


def caption_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross entropy on the label positions only (the lm_head runs on those alone).

    The rows are right-padded and attention is causal, so no real token can see a pad: the
    padding mask is left out, which changes no label's loss (tested) and lets SDPA take its
    causal path, skipping the masked half of every score matrix (with the mask it computes all
    of it); on a 3 x 687-token batch a step took 13.6-14.4 s instead of 16.2-16.6 s, fp32, 2
    threads of an AVX2 EPYC."""
    hidden = language_states(model, batch)  # (B, L, D)
    predict = batch["labels"][:, 1:]  # (B, L-1): token i+1 is a label -> predict it from i
    logits = model.lm_head(hidden[:, :-1][predict])  # (N, V)
    return F.cross_entropy(logits.float(), batch["input_ids"][:, 1:][predict])


def frozen_prefix_step(model, batch: dict, device: str = "cpu") -> float:
    """Forward and backward of a batch that carries `prefix_length` (one long clip, several
    conversations about it): the prefix (the prompt up to the video's last token) is read once
    without gradient into a cache, then each conversation's remaining tokens are read after it
    with gradient, and backpropagated one at a time (so only one conversation's graph is held).
    The loss, gradients included, is `caption_loss`'s label-weighted mean, except that nothing
    flows into the prefix's states: the tower and projector get no gradient, the language model
    learns how the words read the video. Returns the loss."""
    from transformers import DynamicCache

    cut = int(batch["prefix_length"])
    ids, labels = batch["input_ids"], batch["labels"]
    if labels[:, : cut + 1].any():
        raise ValueError("a frozen prefix (and the token after it) holds no label")
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(len(ids), 1)
    count = int(labels[:, 1:].sum())
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad(), autocast(device):
        model.model(input_ids=ids[:1, :cut], pixel_values_videos=batch["pixel_values_videos"],
                    attention_mask=torch.ones_like(ids[:1, :cut]), position_ids=positions[:1, :cut],
                    past_key_values=cache, use_cache=True)
    total = 0.0
    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        with autocast(device):
            words = ids[row:row + 1, cut:length]
            hidden = model.model(input_ids=words, attention_mask=torch.ones_like(ids[row:row + 1, :length]),
                                 position_ids=positions[row:row + 1, cut:length], past_key_values=cache,
                                 use_cache=True).last_hidden_state
            predict = labels[row:row + 1, cut + 1:length]
            logits = model.lm_head(hidden[:, :-1][predict])
            loss = F.cross_entropy(logits.float(), words[:, 1:][predict], reduction="sum") / count
        loss.backward()
        cache.crop(cut - length)  # back to the prefix for the next conversation, which must
        for layer in cache.layers:  # not reach this one's graph through the cropped keys' slices
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        total += loss.item()
    return total


def caption_step(model, batch: dict, device: str = "cpu") -> float:
    """Forward and backward of one language-model batch (`caption_loss`, or
    `frozen_prefix_step` for a batch that carries `prefix_length`). Returns the loss."""
    if "prefix_length" in batch:
        return frozen_prefix_step(model, batch, device)
    with autocast(device):
        loss = caption_loss(model, batch)
    loss.backward()
    return loss.item()


def build_caption_model(eyes: Path, rank: int, video_position_step: float = assembly.VIDEO_POSITION_STEP):
    """The reference model with the stage-1 tower (and stage-1b projector when run/align.pt
    exists), visual tokens advancing the position by `video_position_step`, LoRA injected,
    trainable parts selected."""
    from peft import inject_adapter_in_model

    state = _tower_state(eyes)
    align = eyes.parent / "align.pt"
    if align.is_file():  # stage 1b's projector
        projector = torch.load(align, weights_only=True)["projector"]
        state.update({f"model.multi_modal_projector.{k}": v for k, v in projector.items()})
    model, tokenizer = assembly.build_reference(assembly.TOWER, state, assembly.ROPE_SCALING,
                                                 video_position_step=video_position_step)
    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(rank), model.model.language_model)
    for name, param in model.named_parameters():
        if "lora_" in name or "multi_modal_projector" in name or name.endswith("image_newline"):
            param.requires_grad_(True)
    return model, tokenizer


def describe_score(model, tokenizer, facts_list, frames: np.ndarray, max_new_tokens: int = 200) -> dict:
    """Greedy 'Describe the video in detail.' on each video; mean key-fact score, mean number
    of invented events, accuracy per kind of fact and samples."""
    from sparrow.video.processing import VideoInputs
    from sparrow.video.prompt import render_chat

    scores, invented, samples, kinds = [], [], [], {}
    config = model.config
    side = assembly.TOWER["image_size"]
    visual = count_visual_tokens(config, assembly.PROCESSOR_CONFIG, frames.shape[1], side, side)
    video = VideoInputs(torch.empty(0), None, visual, [], family="llava_onevision")
    messages = [{"role": "user", "content": [{"type": "video"},
                                             {"type": "text", "text": data.DESCRIBE_PROMPTS[0]}]}]
    device = model.device
    ids = render_chat(tokenizer, config, messages, video).to(device)
    step = video_position_step(config)  # positions as at inference (transformers numbers on by 1)
    positions = {} if step == 1 else {"position_ids": prompt_positions(ids, config.video_token_index,
                                                                       step)[0]}
    for facts, clip in zip(facts_list, frames, strict=True):
        with torch.no_grad(), autocast(device):
            out = model.generate(input_ids=ids, pixel_values_videos=data.video_pixels(clip[None]).to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 **{k: v.to(device) for k, v in positions.items()})
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        score = synthetic.score_description(text, facts)
        scores.append(score["score"])
        invented.append(score["invented_events"])
        samples.append({"seed": facts.seed, "score": score["score"], "text": text})
        for kind, (correct, total) in score["by_kind"].items():
            tally = kinds.setdefault(kind, [0, 0])
            tally[0], tally[1] = tally[0] + correct, tally[1] + total
    by_kind = {k: round(c / t, 3) for k, (c, t) in sorted(kinds.items()) if t}
    return {"score": float(np.mean(scores)), "invented_events": float(np.mean(invented)), "by_kind": by_kind,
            "samples": samples}


def autocast(device: str | torch.device = "cpu", native_bf16: bool | None = None):
    """The language-model stages' precision: bf16 autocast where oneDNN computes bf16 (AVX-512
    and up: 2.1x the fp32 GEMM rate measured on an AVX-512-bf16 EPYC), fp32 elsewhere (on an
    AVX2-only EPYC a bf16 GEMM ran at 1.2 GFLOP/s against 119 in fp32, 2 threads). The machines
    here vary by session, so a run may mix both (the model card says which sittings ran how).
    On a CUDA device: bf16 where the GPU has it (Ampere and up)."""
    kind = torch.device(device).type
    if native_bf16 is None:
        native_bf16 = (torch.cuda.is_bf16_supported() if kind == "cuda"
                       else torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.autocast(kind, dtype=torch.bfloat16) if native_bf16 else contextlib.nullcontext()


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor of a language-model stage: linear warm-up over `warmup` steps,
    constant, then a cosine decay to 0.1 over the last third (added at caption step ~760 of the
    shipped run, when the held-out score moved 0.49 -> 0.35 between steps 500 and 750 at the
    constant rate; the decay starts at step 2,000, so that run follows this rule throughout)."""
    decay_from = 2 * steps // 3
    factor = min(1.0, (step + 1) / warmup)
    if step >= decay_from:
        progress = (step - decay_from) / max(1, steps - decay_from)
        factor *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train_caption(run: Path, steps: int, budget: int, lr: float,
                  projector_lr: float, rank: int, seed: int, save_every: int, eval_every: int,
                  stop_at: int | None = None, eval_frames=EVAL_FRAMES, stage: str = "caption",
                  frames: dict[int, int] | None = None, warmup: int = 50, pose_reach: int = 0,
                  device: str = "cpu", workers: int = 0, lora_weights: Path | None = None,
                  video_position_step: float = assembly.VIDEO_POSITION_STEP) -> Path:
    """Stage 2 (`stage` "caption") or 2b ("long": starts from caption.pt's final weights, with
    a fresh optimizer) up to `steps`, resuming from run/<stage>.pt; `stop_at` as in
    `train_eyes`; `pose_reach` as in `_caption_batch` (a stage keeps the reach it started with);
    `device` trains there (checkpoints hold CPU tensors either way); `workers` as in `batches`;
    `lora_weights`: a caption stage's first step starts its LoRA factors from that exported
    file (`lora_from`) instead of peft's initialisation (B = 0); `video_position_step`: how far
    a visual token advances the position (a stage keeps the step it started with, except that a
    sitting continued from exported weights may change it: `continue_from`)."""
    checkpoint, log = run / f"{stage}.pt", run / f"{stage}.jsonl"
    model, tokenizer = build_caption_model(run / "eyes.pt", rank, video_position_step)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    warm = {}
    if lora_weights is not None and stage == "caption" and not checkpoint.is_file():
        model.load_state_dict(lora_from(lora_weights, model, rank), strict=False)
        digest = hashlib.sha256(lora_weights.read_bytes()).hexdigest()[:12]  # assembly.checkpoint's naming
        warm = {"lora_from": f"{lora_weights.name} (sha256 {digest})"}
    if stage != "caption" and not checkpoint.is_file():
        previous = torch.load(run / "caption.pt", weights_only=True)
        if previous["step"] <= 0:
            raise SystemExit(f"stage {stage} starts from the caption stage; run it first")
        model.load_state_dict(previous["trainable"], strict=False)
    model.to(device)  # before the optimizer: a resumed one casts its moments to the parameters' device
    groups = [
        {"params": [p for n, p in trainable.items() if "lora_" in n], "lr": lr},
        {"params": [p for n, p in trainable.items() if "lora_" not in n], "lr": projector_lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them
    start = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        missing = set(trainable) - set(state["trainable"])
        if missing:
            raise SystemExit(f"{checkpoint} lacks {len(missing)} trainable tensors (another --rank?)")
        if state.get("pose_reach", 0) != pose_reach:
            raise SystemExit(f"{checkpoint} was trained with position reach {state.get('pose_reach', 0)}, "
                             f"not {pose_reach}: pass the same --long-pose-reach, or a new run directory")
        if state.get("video_position_step", 1.0) != video_position_step:
            raise SystemExit(f"{checkpoint} was trained with video position step "
                             f"{state.get('video_position_step', 1.0)}, not {video_position_step}: pass the "
                             "same --video-position-step, or a new run directory")
        model.load_state_dict(state["trainable"], strict=False)
        start = state["step"]
        fresh = list(state.get("fresh_optimizer_at", [0]))
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            print(f"resuming {stage} at step {start}/{steps}", flush=True)
        else:  # a sitting continued from exported weights (`continue_from`)
            fresh = fresh if fresh[-1] == start else [*fresh, start]
            print(f"continuing {stage} at step {start}/{steps} with a fresh optimizer", flush=True)
        warm = {"lora_from": state["lora_from"]} if "lora_from" in state else {}
    else:
        fresh = [0]
    if start >= steps:
        return checkpoint
    precision = "bf16" if isinstance(autocast(device), torch.autocast) else "fp32"
    gpu = {"gpu": torch.cuda.get_device_name(device)} if torch.device(device).type == "cuda" else {}
    _log(log, {"step": start, "start": {"cpu": torch.backends.cpu.get_cpu_capability(),
                                        "threads": torch.get_num_threads(), **gpu, "precision": precision,
                                        "fresh_optimizer_at": fresh, "pose_reach": pose_reach,
                                        "video_position_step": video_position_step,
                                        "frames": frame_spec(frames or CAPTION_FRAMES), **warm}})
    resize = _resize_fn()
    scratch = Path(tempfile.mkdtemp(prefix="sparrow-caption-"))
    side = assembly.TOWER["image_size"]
    per_frame = count_visual_tokens(model.config, assembly.PROCESSOR_CONFIG, 1, side, side) - 1  # - newline
    began = time.perf_counter()
    ahead = batches(start, steps, workers, tokenizer, model.config, resize, scratch, seed, budget, per_frame,
                    frames, stage, pose_reach)
    for step in tqdm(range(start, steps), initial=start, total=steps, desc=stage, unit="step"):
        scale = lr_scale(step, steps, warmup)
        if fresh[-1] > 0:  # fresh moments mid-stage: re-warm, as at the start
            scale *= min(1.0, (step - fresh[-1] + 1) / REWARM_STEPS)
        for group, rate in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = rate * scale
        batch_data = {key: value.to(device) for key, value in next(ahead).items()}
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = caption_step(model, batch_data, device)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        done = step + 1
        rows, prefix = batch_data["input_ids"].shape[0], int(batch_data.get("prefix_length", 0))
        _log(log, {"step": done, "loss": round(loss, 4), "lr": optimizer.param_groups[0]["lr"],
                   "frames": batch_data["pixel_values_videos"].shape[1],
                   "conversations": rows,
                   "tokens": int(batch_data["attention_mask"].sum()) - prefix * (rows - 1),  # those read
                   **({"frozen_prefix": prefix} if prefix else {}),
                   "elapsed_s": round(time.perf_counter() - began, 1)})
        if done % save_every == 0 or done in (steps, stop_at):
            _save(checkpoint, {"trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                               "optimizer": _to_cpu(optimizer.state_dict()), "step": done, "rank": rank,
                               "fresh_optimizer_at": fresh, "pose_reach": pose_reach,
                               "video_position_step": video_position_step, **warm})
        if eval_every and (done % eval_every == 0 or done == steps):
            model.eval()
            scores = {}
            for num_frames, count in eval_frames:
                clips = [render_clip(s, num_frames, resize, scratch) for s in list(VAL_SEEDS)[:count]]
                pixels = np.stack([c for c, _ in clips])  # (N, T, S, S, 3)
                result = describe_score(model, tokenizer, [f for _, f in clips], pixels)
                scores[num_frames] = result["score"]
                _log(log, {"step": done, "eval_frames": num_frames, "eval_score": result["score"],
                           "invented_events": result["invented_events"], "by_kind": result["by_kind"],
                           "samples": result["samples"][:2]})
            tqdm.write(f"{stage} step {done}: held-out key-fact score by frames {scores}")
        if done == stop_at:
            break
    shutil.rmtree(scratch, ignore_errors=True)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def shipped_name(name: str) -> str:
    """A trainable tensor's name in the shipped file: peft's LoRA factors lose their adapter
    suffix ("...q_proj.lora_A.default.weight" -> "...q_proj.lora_A"); the rest keep theirs."""
    if "lora_" not in name:
        return name
    layer, _, rest = name.partition(".lora_")
    return f"{layer}.lora_{rest[0]}"


def export(run: Path, out: Path) -> Path:
    """The shipped weights: tower, projector, newline (fp32) and LoRA factors (fp16) + metadata."""
    from safetensors.torch import save_file

    eyes = torch.load(run / "eyes.pt", weights_only=True)["tower"]
    stages = {stage: torch.load(run / f"{stage}.pt", weights_only=True)
              for stage in ("caption", "long") if (run / f"{stage}.pt").is_file()}
    caption = stages.get("long") or stages["caption"]  # the last language-model stage that ran
    tensors = {f"model.vision_tower.{k}": v.float().contiguous() for k, v in eyes.items()}
    for name, value in caption["trainable"].items():
        dtype = torch.float16 if "lora_" in name else torch.float32
        tensors[shipped_name(name)] = value.to(dtype).contiguous()
    rank = caption["rank"]
    metadata = {"lora_rank": str(rank), "lora_alpha": str(2 * rank),
                **{f"{stage}_steps": str(state["step"]) for stage, state in stages.items()},
                **{f"{stage}_fresh_optimizer_at": ",".join(map(str, state.get("fresh_optimizer_at", [0])))
                   for stage, state in stages.items()},
                **{f"{stage}_pose_reach": str(state["pose_reach"])
                   for stage, state in stages.items() if state.get("pose_reach")},
                **({"caption_lora_from": stages["caption"]["lora_from"]}
                   if "lora_from" in stages.get("caption", {}) else {}),
                "tower": json.dumps(assembly.TOWER), "rope_scaling": json.dumps(assembly.ROPE_SCALING),
                "processor": json.dumps(assembly.PROCESSOR_CONFIG),
                "video_position_step": json.dumps(caption.get("video_position_step", 1.0))}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, out)
    return out


def read_export(weights: Path, flag: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors by shipped name) of a file written by `export`; `flag` names the
    option that gave it, for the errors."""
    from safetensors import safe_open

    if not weights.is_file():
        raise SystemExit(f"{flag} {weights}: no such file (an exported weights file, e.g. "
                         f"{assembly.WEIGHTS_FILE})")
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    if "caption_steps" not in metadata:
        raise SystemExit(f"{flag} {weights}: the file records no caption step; it was not "
                         "written by this script's export")
    return metadata, tensors


def lora_from(weights: Path, model, rank: int) -> dict[str, torch.Tensor]:
    """The LoRA factors of an exported file under `model`'s parameter names (`--lora-from`): a
    caption stage on new eyes starts its language-model adapter from an earlier run's; the
    tower, projector and newline stay this run's. What carries over is the writing, not the
    reading (run v5, MODEL_CARD.md: held-out score 0.08 before its first step, training loss at
    v4's step-1,000 level within 20 steps, held-out 0.65 by step 250 against v4's 0.18)."""
    metadata, tensors = read_export(weights, "--lora-from")
    if int(metadata.get("lora_rank", rank)) != rank:
        raise SystemExit(f"--lora-from {weights}: LoRA rank {metadata['lora_rank']}, not --rank {rank}")
    factors = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            value = tensors.get(shipped_name(name))
            if value is None or value.shape != param.shape:
                raise SystemExit(f"--lora-from {weights}: it lacks {shipped_name(name)} of shape "
                                 f"{tuple(param.shape)}; it was trained for another language model")
            factors[name] = value.to(param.dtype).clone()
    return factors


def continue_from(weights: Path, run: Path, rank: int,
                  video_position_step: float = assembly.VIDEO_POSITION_STEP,
                  pose_reach: int | None = None) -> str:
    """Seed `run` from an exported weights file so that the last language-model stage it
    records goes on from there (see "Sittings" above): run/eyes.pt gets the file's tower, and
    run/<stage>.pt its trainable tensors and step, without optimizer state. Returns the stage.
    A run directory already seeded (or trained) is left alone: rerunning resumes it. The sitting
    goes on with `video_position_step`, whatever the file was for, and a long stage with
    `pose_reach` when given (default: the file's); the weights are the same, the positions they
    meet from here on are this sitting's."""
    metadata, tensors = read_export(weights, "--continue-from")
    stage = "long" if "long_steps" in metadata else "caption"
    setup = assembly.weights_setup(weights)
    if setup[:3] != (assembly.TOWER, assembly.ROPE_SCALING, assembly.PROCESSOR_CONFIG):
        raise SystemExit(f"--continue-from {weights}: it was trained for another tower, positions or "
                         f"processor ({setup}) than this script trains ({assembly.TOWER}); start a run "
                         "from the eyes stage instead")
    if int(metadata.get("lora_rank", rank)) != rank:
        raise SystemExit(f"--continue-from {weights}: LoRA rank {metadata['lora_rank']}, not --rank {rank}")
    if (run / f"{stage}.pt").is_file():
        return stage
    run.mkdir(parents=True, exist_ok=True)
    prefix = "model.vision_tower."
    _save(run / "eyes.pt", {"tower": {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                            "continued_from": str(weights)})
    model, _ = build_caption_model(run / "eyes.pt", rank, video_position_step)
    trainable = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = shipped_name(name)
        if key not in tensors:
            raise SystemExit(f"--continue-from {weights}: it lacks {key}")
        trainable[name] = tensors[key].to(param.dtype).reshape(param.shape).clone()
    fresh = [int(s) for s in metadata.get(f"{stage}_fresh_optimizer_at", "0").split(",")]
    warm = {"lora_from": metadata["caption_lora_from"]} if "caption_lora_from" in metadata else {}
    _save(run / f"{stage}.pt", {"trainable": trainable, "step": int(metadata[f"{stage}_steps"]),
                                "rank": rank, "fresh_optimizer_at": fresh,
                                "pose_reach": int(metadata.get(f"{stage}_pose_reach", 0))
                                if pose_reach is None or stage != "long" else pose_reach,
                                "video_position_step": video_position_step,
                                **(warm if stage == "caption" else {})})
    if stage == "long":  # the long stage starts from caption.pt only when long.pt is missing
        _save(run / "caption.pt", {"trainable": trainable, "step": int(metadata["caption_steps"]),
                                   "rank": rank, "fresh_optimizer_at": [0],
                                   "video_position_step": video_position_step, **warm})
    return stage


def position_step(text: str) -> float:
    """`--video-position-step` "0.25" -> 0.25, checked as `sparrow.targets.llava` checks it."""
    from sparrow.targets.llava import VIDEO_POSITION_STEP, checked_position_step

    try:
        return checked_position_step(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace(VIDEO_POSITION_STEP, "the step")) from error


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (corpus, checkpoints, logs)")
    parser.add_argument("--stage", default="all",
                        choices=("corpus", "eyes", "align", "caption", "long", "export", "all"))
    parser.add_argument("--train-shards", type=int, default=48,
                        help=f"{SHARD_VIDEOS} videos each (eyes and align stages; 12 memorised their "
                             "frames: held-out shape 0.88 against 0.92 with 48)")
    parser.add_argument("--eyes-steps", type=int, default=3000)
    parser.add_argument("--eyes-batch", type=int, default=128, help="frames per step")
    parser.add_argument("--eyes-lr", type=float, default=1e-3)
    parser.add_argument("--eyes-read", choices=EYES_READS, default=EYES_READS[0],
                        help="what the eyes heads read: every patch of a 2x2 block with the block's "
                             "labels, or each block's mean state")
    parser.add_argument("--align-steps", type=int, default=1000)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--caption-steps", type=int, default=3000)
    parser.add_argument("--caption-tokens", type=int, default=2000,
                        help="tokens per caption step (visual + text; conversations are added up to it)")
    parser.add_argument("--lr", type=float, default=3e-4, help="LoRA learning rate")
    parser.add_argument("--projector-lr", type=float, default=2e-4)
    parser.add_argument("--long-steps", type=int, default=200, help="long-clip steps (0: skip the stage)")
    parser.add_argument("--long-lr", type=float, default=1.5e-4, help="LoRA learning rate, long stage")
    parser.add_argument("--long-frames", type=frame_weights, default=LONG_FRAMES, metavar="F:W,...",
                        help="long stage: clip lengths in frames and their weights (default "
                             + frame_spec(LONG_FRAMES) + ")")
    parser.add_argument("--long-projector-lr", type=float, default=1e-4)
    parser.add_argument("--long-pose-reach", type=int, default=LONG_POSE_REACH, metavar="POSITIONS",
                        help="long stage: half the rows get position ids spread up to POSITIONS "
                             "(PoSE skip offsets: 25k-token distances met in ~6k-token steps; default "
                             "%(default)s); 0: consecutive positions")
    parser.add_argument("--video-position-step", type=position_step, default=assembly.VIDEO_POSITION_STEP,
                        metavar="STEP",
                        help="how far each visual token advances the rotary position in the language-model "
                             "stages, and what the export records for inference (default %(default)s: a "
                             "frame's 16 tokens span 4 positions; 1: plain LLaVA positions)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=250, help="caption eval period (0: never)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu",
                        help="torch device of the language-model stages (caption, long), e.g. cuda")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that build the language-model stages' batches ahead (0: none; "
                             "worth it beside a GPU, not beside a CPU's own steps)")
    parser.add_argument("--out", type=Path, default=assembly.WEIGHTS_FILE,
                        help="where export writes the shipped weights")
    parser.add_argument("--continue-from", type=Path, metavar="WEIGHTS",
                        help="start the run directory from an exported weights file (e.g. the shipped "
                             "one) and go on with its last language-model stage: no eyes / align stages")
    parser.add_argument("--lora-from", type=Path, metavar="WEIGHTS",
                        help="start the caption stage's LoRA factors from an exported weights file of the "
                             "same --rank (e.g. the shipped one) instead of from zero: new eyes, the old "
                             "adapter (the tower, projector and newline stay this run's)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: give 0 (none) or more")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this machine has no CUDA device (torch "
                         f"{torch.__version__}); leave --device out to train on the CPU")
    torch.set_num_threads(args.threads)
    args.run.mkdir(parents=True, exist_ok=True)
    if args.continue_from and args.lora_from:
        raise SystemExit("--lora-from starts a new caption stage; --continue-from goes on with the file's "
                         "own stage (its LoRA included): give one of them")
    continued = None  # the stage a --continue-from file goes on with
    if args.continue_from:
        if args.stage in ("corpus", "eyes", "align"):
            raise SystemExit("--continue-from starts after the eyes and align stages, "
                             f"not at --stage {args.stage}")
        continued = continue_from(args.continue_from, args.run, args.rank, args.video_position_step,
                                  args.long_pose_reach)
        if continued == "long" and args.stage == "caption":
            raise SystemExit(f"--continue-from {args.continue_from}: it is past its caption stage; "
                             "go on with --stage long (and a larger --long-steps)")
        print(f"{args.run}: continuing the {continued} stage of {args.continue_from}", flush=True)
    elif args.stage in ("corpus", "eyes", "align", "all"):
        train, val = ensure_corpus(args.run / "corpus", args.train_shards)
    if args.stage in ("eyes", "all") and not args.continue_from:
        train_eyes(args.run, train, val, args.eyes_steps, args.eyes_batch, args.eyes_lr, args.seed,
                   args.save_every * 4, args.eval_every, read=args.eyes_read)
    if args.stage in ("align", "all") and not args.continue_from:
        train_align(args.run, train, val, args.align_steps, args.eyes_batch, args.align_lr, args.seed,
                    args.eval_every)
    if args.stage in ("caption", "all") and continued != "long":  # a long-stage file's caption stage is over
        train_caption(args.run, args.caption_steps, args.caption_tokens, args.lr, args.projector_lr,
                      args.rank, args.seed, args.save_every, args.eval_every, device=args.device,
                      workers=args.workers, lora_weights=args.lora_from,
                      video_position_step=args.video_position_step)
    if args.stage in ("long", "all") and args.long_steps:
        train_caption(args.run, args.long_steps, args.caption_tokens, args.long_lr, args.long_projector_lr,
                      args.rank, args.seed, args.save_every, args.eval_every // 2, stage="long",
                      frames=args.long_frames, eval_frames=LONG_EVAL_FRAMES, warmup=10,
                      pose_reach=args.long_pose_reach, device=args.device, workers=args.workers,
                      video_position_step=args.video_position_step)
    if args.stage in ("export", "all"):
        print(f"wrote {export(args.run, args.out)}")


if __name__ == "__main__":
    main()
