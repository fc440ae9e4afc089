"""What the draft sees of the target's sequence (METHOD.md sections 1-2). Every decision that
depends on it is made here.

Two settings, both recorded in the draft's config:

`mode`, which positions the draft is fed at inference:
    sparrow  text only (VATA): visual positions never enter the draft's inputs or cache, and
             its positions are renumbered contiguously over the text, so its cost does not
             grow with the video;
    eagle    every position (the draft's cache grows with the video): the EAGLE-full and
             MSD-like baselines, and the IVSB-without-VATA ablation.

`visual`, what a visual position carries when the draft sees it (in training always, at
inference in `eagle` mode):
    none     nothing: visual positions are removed in training too (HiViS-like);
    last     the pair (h_t, x_{t+1}) like any text position, h_t the target's last hidden
             state (EAGLE-full);
    mid      the target's hidden state after `mid_layer` layers, fed to the decoder layer
             as it is (IVSB, Sparrow's training bridge);
    embed    the target's input embedding there, the projector's output (MSD-like).
A `none` draft run in `eagle` mode sees visual positions as `last` pairs.

A checkpoint can be run in either mode (`--method sparrow|eagle`, `load_draft(mode=...)`).
"""

from __future__ import annotations

import torch

from sparrow.errors import CheckpointError

MODES = ("sparrow", "eagle")
VISUAL = ("none", "last", "mid", "embed")
DIRECT = ("mid", "embed")  # visual contents fed to the decoder layer as they are


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CheckpointError(f"draft mode {mode!r} unknown; choose one of {MODES}")
    return mode


def check_visual(visual: str) -> str:
    if visual not in VISUAL:
        raise CheckpointError(f"draft visual input {visual!r} unknown; choose one of {VISUAL}")
    return visual


def draft_positions(mode: str, visual_mask: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the prompt positions the draft is fed, in order, from the prompt's
    `visual_mask` (L,) bool. Each kept position t is paired with the next kept token."""
    if check_mode(mode) == "sparrow":
        return torch.nonzero(~visual_mask).flatten()
    return torch.arange(visual_mask.shape[0], device=visual_mask.device)


def visual_layer(mode: str, visual: str, mid_layer: int | None) -> int | None:
    """The target layer whose states the draft reads at visual positions, when it reads them
    directly (`mid`: after `mid_layer` layers; `embed`: 0), else None."""
    if check_mode(mode) == "sparrow" or check_visual(visual) not in DIRECT:
        return None
    return 0 if visual == "embed" else mid_layer


def prefill_layers(mode: str, visual: str, mid_layer: int | None) -> tuple[int, ...]:
    """Target layers the prefill must capture for a draft run in `mode` (`visual_layer`)."""
    layer = visual_layer(mode, visual, mid_layer)
    return () if layer is None else (layer,)


def inference_visual(mode: str, visual: str) -> str:
    """What a `visual` draft's visual positions carry when it decodes in `mode`: nothing in
    sparrow mode (they are never fed), else what it was trained with (`none` drafts see them
    as `last` pairs). Evaluating a draft as it decodes means batching it with this."""
    if check_mode(mode) == "sparrow":
        return "none"
    return "last" if check_visual(visual) == "none" else visual


def training_positions(visual: str, visual_mask: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the positions of a training sequence the draft is fed (`visual` none drops
    the visual ones, as `sparrow` mode does at inference)."""
    mode = "sparrow" if check_visual(visual) == "none" else "eagle"
    return draft_positions(mode, visual_mask)
