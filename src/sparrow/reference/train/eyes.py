"""Stage 1, `eyes`: the vision tower alone, supervised directly by the generator's ground truth.

Linear heads on the tower's last hidden states read, per patch, the colour / shape / size class
of the object covering it and that object's centre, and (the tower also sees each frame's
difference from an earlier one) how that object moved since the earlier frame, whether it
appeared or changed colour, and whether an object that was on the patch has left; per frame the
background kind and colours and the object count. Cheap (no language model), and it makes the
tower's features state the facts linearly before the language model sees them.

The labels are per 2x2 block of patches (its main object's), because LLaVA-OneVision pools the
projected patches 2x2 before the language model: a fact the tower states on one patch alone is
averaged away in the token the language model receives. The heads read each of a block's four
patches on its own, every one labelled with its block's facts (`--eyes-read every-patch`, the
default), so that every patch state carries them and the projector (applied per patch, before
the pooling) need not rebuild them from a mean; `--eyes-read block-mean` reads each block's mean
instead (MODEL_CARD.md compares the two). The eyes stage runs on the CPU.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparrow.reference import assembly, synthetic
from sparrow.reference.train import data
from sparrow.reference.train.checkpoints import append_log, save_atomic

CHANGES = ("appeared", "recoloured", "vanished")
PAIR_STRIDES = (1, 2, 3)  # frames between a pair's earlier and later frame (8-frame clips)
EYES_READS = ("every-patch", "block-mean")  # the first is the default


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
            # and does not teach shape, so object patches get a term of their own.
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


def frame_batch(shard: data.Shard, rng: np.random.Generator, size: int) -> dict:
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
        batch_data = frame_batch(corpus, np.random.default_rng([seed, step]), batch)
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
                val_batch = frame_batch(held_out, np.random.default_rng([seed, 2**31]), 512)
                states = tower_states(tower, val_batch["pixels"])
                _, val_metrics = heads.losses(*eyes_view(states, val_batch, read))
            append_log(log, {"step": done, "train": metrics, "val": val_metrics,
                             "elapsed_s": round(time.perf_counter() - began, 1)})
            tqdm.write(f"eyes step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in val_metrics.items()))
        if done % save_every == 0 or done in (steps, stop_at):
            save_atomic(checkpoint, {"tower": tower.state_dict(), "heads": heads.state_dict(),
                                     "optimizer": optimizer.state_dict(), "step": done, "read": read})
        if done == stop_at:
            break
    return checkpoint
