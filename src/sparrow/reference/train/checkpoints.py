"""Checkpoints, logs and sittings of the reference target's training.

Resume: every stage saves run/<stage>.pt atomically (written aside, then renamed over the old
one), so an interruption leaves the last whole checkpoint; the batch of step s is drawn from an
RNG seeded by (seed, s), so a resumed stage sees the same data as an uninterrupted one and ends
with the same weights (tested).

Sittings: `--continue-from WEIGHTS` (`continue_from`) starts a run directory from an exported
weights file instead of from the eyes stage: the tower, projector, newline and LoRA factors
(fp16 in the file) are the file's, the language-model stage goes on at the step the file
records, with fresh AdamW moments re-warmed over `REWARM_STEPS` steps (the batches are those of
an uninterrupted run: they depend on (seed, step) only). The machines this project trains on
are fresh every session and only the repository carries over, so a run of many hours is
trained in sittings, each continuing from the previous sitting's export (kept in the
repository's checkpoints/); the file records the steps at which its optimizer started fresh
(`caption_fresh_optimizer_at`), which with the defaults is the whole recipe, and each start of a
language-model stage logs the CPU capability and precision it trains with (the machines differ:
`model.autocast`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sparrow.reference import assembly
from sparrow.reference.train.model import build_caption_model, read_export, shipped_name

REWARM_STEPS = 20  # learning-rate re-warm-up after a sitting starts with fresh AdamW moments


def save_atomic(path: Path, state: dict) -> None:
    """torch.save `state` to `path` through a partial file renamed over it, so that an
    interruption leaves either the old checkpoint or the new one, never half of one."""
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def to_cpu(state):
    """`state` (nested dicts / lists of tensors, e.g. an optimizer's state_dict) on the CPU, so
    that a checkpoint written on a GPU loads anywhere."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(to_cpu(value) for value in state)
    return state


def append_log(path: Path, record: dict) -> None:
    """One JSON line appended to a stage's log (run/<stage>.jsonl)."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


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
    save_atomic(run / "eyes.pt", {"tower": {k[len(prefix):]: v for k, v in tensors.items()
                                            if k.startswith(prefix)},
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
    save_atomic(run / f"{stage}.pt", {"trainable": trainable, "step": int(metadata[f"{stage}_steps"]),
                                      "rank": rank, "fresh_optimizer_at": fresh,
                                      "pose_reach": int(metadata.get(f"{stage}_pose_reach", 0))
                                      if pose_reach is None or stage != "long" else pose_reach,
                                      "video_position_step": video_position_step,
                                      **(warm if stage == "caption" else {})})
    if stage == "long":  # the long stage starts from caption.pt only when long.pt is missing
        save_atomic(run / "caption.pt", {"trainable": trainable, "step": int(metadata["caption_steps"]),
                                         "rank": rank, "fresh_optimizer_at": [0],
                                         "video_position_step": video_position_step, **warm})
    return stage
