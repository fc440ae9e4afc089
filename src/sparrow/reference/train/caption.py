"""Stage 2, `caption`: the whole reference model on conversations about videos; also stage 2b's loop.

Conversations about videos rendered on the fly from fresh training seeds at 4 to 64 frames
(`batches.CAPTION_FRAMES`; through mp4 and back, as at inference): detailed descriptions in the
reference styles or question/answer turns, loss on the assistant tokens, about
`--caption-tokens` tokens per step (`batches`). Trained: the projector, the image newline, and
LoRA adapters on SmolLM2's linear layers (the tower stays as the eyes stage left it; `model`).
bf16 autocast where the CPU has it (`model.autocast`). The long stage is this loop again, from
the caption stage's final weights, on the clips of `long.LONG_FRAMES` (`long`).

The language-model stages take `--device` (e.g. cuda: bf16 autocast there) and `--workers N`
processes that render and tokenize batches ahead of the step; checkpoints hold CPU tensors
either way.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparrow.reference import assembly, synthetic
from sparrow.reference.train import data, long
from sparrow.reference.train.batches import CAPTION_FRAMES, batches, frame_spec, render_clip
from sparrow.reference.train.checkpoints import REWARM_STEPS, append_log, save_atomic, to_cpu
from sparrow.reference.train.model import autocast, build_caption_model, lora_from
from sparrow.targets.llava import prompt_positions, video_position_step
from sparrow.video.processing import count_visual_tokens

EVAL_FRAMES = ((16, 8), (64, 4))  # (frames, videos) of the held-out check during caption training


def language_states(model, batch: dict) -> torch.Tensor:
    """The language model's last hidden states (B, L, D) of a training batch, every row one
    sequence under plain causal attention.

    The mask passed is all ones, not the padding mask (see `caption_loss`): SDPA still takes its
    causal path, and transformers does not read position ids that jump (`long.skip_positions`) as
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
    of it), which makes a step markedly faster."""
    hidden = language_states(model, batch)  # (B, L, D)
    predict = batch["labels"][:, 1:]  # (B, L-1): token i+1 is a label -> predict it from i
    logits = model.lm_head(hidden[:, :-1][predict])  # (N, V)
    return F.cross_entropy(logits.float(), batch["input_ids"][:, 1:][predict])



def caption_step(model, batch: dict, device: str = "cpu") -> float:
    """Forward and backward of one language-model batch (`caption_loss`, or
    `long.frozen_prefix_step` for a batch that carries `prefix_length`). Returns the loss."""
    if "prefix_length" in batch:
        return long.frozen_prefix_step(model, batch, device)
    with autocast(device):
        loss = caption_loss(model, batch)
    loss.backward()
    return loss.item()


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


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor of a language-model stage: linear warm-up over `warmup` steps,
    constant, then a cosine decay to 0.1 over the last third, so that the stage ends settled:
    at a constant rate the held-out score still swings from one evaluation to the next late in
    the stage (MODEL_CARD.md)."""
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
    `train_eyes`; `pose_reach` as in `caption_batch` (a stage keeps the reach it started with);
    `device` trains there (checkpoints hold CPU tensors either way); `workers` as in `batches`;
    `lora_weights`: a caption stage's first step starts its LoRA factors from that exported
    file (`lora_from`) instead of peft's initialisation (B = 0); `video_position_step`: how far
    a visual token advances the position (a stage keeps the step it started with, except that a
    sitting continued from exported weights may change it: `continue_from`)."""
    checkpoint, log = run / f"{stage}.pt", run / f"{stage}.jsonl"
    model, tokenizer = build_caption_model(run / "eyes.pt", rank, video_position_step)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    warm = _starting_weights(model, run, checkpoint, stage, rank, lora_weights)
    model.to(device)  # before the optimizer: a resumed one casts its moments to the parameters' device
    groups = [
        {"params": [p for n, p in trainable.items() if "lora_" in n], "lr": lr},
        {"params": [p for n, p in trainable.items() if "lora_" not in n], "lr": projector_lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them
    resumed = _resume(checkpoint, model, optimizer, trainable, stage, steps, pose_reach, video_position_step)
    start, fresh, warm = resumed or (0, [0], warm)
    if start >= steps:
        return checkpoint
    _log_start(log, start, device, {"fresh_optimizer_at": fresh, "pose_reach": pose_reach,
                                    "video_position_step": video_position_step,
                                    "frames": frame_spec(frames or CAPTION_FRAMES), **warm})
    resize = data.resize_fn()
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
        _log_step(log, done, loss, optimizer, batch_data, began)
        if done % save_every == 0 or done in (steps, stop_at):
            save_atomic(checkpoint, {"trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                                     "optimizer": to_cpu(optimizer.state_dict()), "step": done, "rank": rank,
                                     "fresh_optimizer_at": fresh, "pose_reach": pose_reach,
                                     "video_position_step": video_position_step, **warm})
        if eval_every and (done % eval_every == 0 or done == steps):
            _evaluate(model, tokenizer, log, stage, done, eval_frames, resize, scratch)
        if done == stop_at:
            break
    shutil.rmtree(scratch, ignore_errors=True)
    return checkpoint


def _starting_weights(model, run: Path, checkpoint: Path, stage: str, rank: int,
                      lora_weights: Path | None) -> dict:
    """Load what a stage starts from when it has no checkpoint yet: a caption stage given
    `lora_weights` the file's LoRA factors, a long stage the caption stage's final weights.
    Returns the provenance the stage records (`{"lora_from": ...}` or nothing)."""
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
    return warm


def _resume(checkpoint: Path, model, optimizer, trainable: dict, stage: str, steps: int, pose_reach: int,
            video_position_step: float) -> tuple[int, list[int], dict] | None:
    """Load run/<stage>.pt into `model` (and `optimizer`, when it holds one) after checking it
    was trained with this rank, reach and video position step. Returns (its step, the steps
    where its optimizer started fresh, its provenance), or None when there is no checkpoint. A
    checkpoint without optimizer state is a sitting seeded by `continue_from`: its step joins
    the fresh starts."""
    if not checkpoint.is_file():
        return None
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
    return start, fresh, {"lora_from": state["lora_from"]} if "lora_from" in state else {}


def _log_start(log: Path, start: int, device: str, setup: dict) -> None:
    """The first record of a stage's (re)start: the machine and precision it trains with (they
    differ between sittings), then `setup`."""
    precision = "bf16" if isinstance(autocast(device), torch.autocast) else "fp32"
    gpu = {"gpu": torch.cuda.get_device_name(device)} if torch.device(device).type == "cuda" else {}
    machine = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), **gpu}
    append_log(log, {"step": start, "start": {**machine, "precision": precision, **setup}})


def _log_step(log: Path, done: int, loss: float, optimizer, batch_data: dict, began: float) -> None:
    """One training step's record: loss, learning rate, and what the batch held."""
    rows, prefix = batch_data["input_ids"].shape[0], int(batch_data.get("prefix_length", 0))
    append_log(log, {"step": done, "loss": round(loss, 4), "lr": optimizer.param_groups[0]["lr"],
                     "frames": batch_data["pixel_values_videos"].shape[1],
                     "conversations": rows,
                     "tokens": int(batch_data["attention_mask"].sum()) - prefix * (rows - 1),  # those read
                     **({"frozen_prefix": prefix} if prefix else {}),
                     "elapsed_s": round(time.perf_counter() - began, 1)})


def _evaluate(model, tokenizer, log: Path, stage: str, done: int, eval_frames, resize, scratch: Path) -> None:
    """The held-out check: `describe_score` on the first validation seeds at each (frames,
    videos) of `eval_frames`, logged."""
    model.eval()
    scores = {}
    for num_frames, count in eval_frames:
        clips = [render_clip(s, num_frames, resize, scratch) for s in list(data.VAL_SEEDS)[:count]]
        pixels = np.stack([c for c, _ in clips])  # (N, T, S, S, 3)
        result = describe_score(model, tokenizer, [f for _, f in clips], pixels)
        scores[num_frames] = result["score"]
        append_log(log, {"step": done, "eval_frames": num_frames, "eval_score": result["score"],
                         "invented_events": result["invented_events"], "by_kind": result["by_kind"],
                         "samples": result["samples"][:2]})
    tqdm.write(f"{stage} step {done}: held-out key-fact score by frames {scores}")
