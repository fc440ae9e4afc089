"""Stage 2b, `long`: the caption stage continued on long clips.

The long stage is the caption stage's loop (`caption.train_caption(stage="long")`) from the
caption stage's final weights, at lower learning rates, on clips up to 384 frames (~6,150 visual
tokens) by default, half the steps on short clips of 8-64 frames (`LONG_FRAMES`) so that short
videos stay read (MODEL_CARD.md, stage 2c). A model trained only to 64 frames answers long
videos with a sentence or two, hence the stage; its steps are the most expensive of the run, so
it is short and comes last. This module holds what only the long stage needs:

- `skip_positions` (PoSE): `--long-pose-reach N` spreads a `POSE_SHARE` of the rows' position
  ids up to N (default `LONG_POSE_REACH`), so that ~6k-token steps also meet the relative
  distances of a 25k-token video (MODEL_CARD.md, "Long stage"). Visual tokens advance the
  position by `--video-position-step` (default 1/4, `assembly.VIDEO_POSITION_STEP`) in the
  language-model stages as at inference.
- `frozen_prefix_step`: clips of more than `FULL_GRADIENT_FRAMES` frames, e.g. `--long-frames
  ...,1024:1,1600:2` for 16k- and 25k-token videos, train after a frozen prefix: read once
  without gradient, then the conversations about the clip that fit the step's token budget
  learn from its cached states.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from sparrow.reference.train.model import autocast

# Long clips (one conversation per step) and as many short ones, so that the stage goes on with
# the caption stage's work on short videos instead of trading it away (MODEL_CARD.md, stage 2c).
LONG_FRAMES = {8: 2, 16: 2, 32: 2, 64: 2, 96: 1, 128: 1, 192: 1, 256: 2, 384: 1}
LONG_EVAL_FRAMES = ((16, 8), (64, 4), (384, 2))  # (frames, videos) of the held-out check
# With --long-pose-reach: this share of the rows get skip positions (`skip_positions`).
POSE_SHARE = 0.5
# The default reach is a 25,600-token video's span at the default video position step (6,400
# positions) and its prompt, rounded up.
LONG_POSE_REACH = 7000
# Clips of more frames than this are too long to backpropagate through on a CPU, in time and in
# memory. Such a clip is read once without gradient and several conversations about it learn
# from its cached states: the words learn to read a long video, the video's own states stay
# those of the current weights (`frozen_prefix_step`).
FULL_GRADIENT_FRAMES = 512


def skip_positions(length: int, reach: int, rng: random.Random, within: range | None = None,
                   chunks: int = 2) -> torch.Tensor:
    """Position ids (length,) for a sequence of `length` tokens that span up to `reach`
    positions: the sequence is cut at random (each piece after a cut starts at an index drawn
    from `within`, default anywhere) into `chunks` contiguous pieces and each piece after the
    first is moved on by a skip (sorted uniform draws in [0, reach - length]), so positions stay
    in order, consecutive inside a piece, and below `reach`.

    PoSE (Zhu et al., ICLR 2024, arXiv 2309.10400): trained this way, a model meets relative
    distances up to `reach` while attending over `length` real tokens only, which is what a
    ~6k-token long-stage step can teach about 25k-token videos (a real 25k-token step costs many
    times more).
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
                    cache=cache, use_cache=True)
    total = 0.0
    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        with autocast(device):
            words = ids[row:row + 1, cut:length]
            hidden = model.model(input_ids=words, attention_mask=torch.ones_like(ids[row:row + 1, :length]),
                                 position_ids=positions[row:row + 1, cut:length], cache=cache,
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

