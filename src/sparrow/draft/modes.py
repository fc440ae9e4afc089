"""Draft modes: which positions of the target's sequence the draft sees (METHOD.md sections 1-2).

    sparrow  text only (VATA): visual positions never enter the draft's inputs or cache, and
             its positions are renumbered contiguously over the text, so its cost does not
             grow with the video;
    eagle    every position (the EAGLE-full baseline: the draft's cache grows with the video).

A draft's config records the mode it was made for; `--method` (or `load_draft(mode=...)`)
may run it in the other. Every decision that depends on the mode is made here.
"""

from __future__ import annotations

import torch

from sparrow.errors import CheckpointError

MODES = ("sparrow", "eagle")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CheckpointError(f"draft mode {mode!r} unknown; choose one of {MODES}")
    return mode


def draft_positions(mode: str, visual_mask: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the prompt positions the draft is fed, in order, from the prompt's
    `visual_mask` (L,) bool. Each kept position t is paired with the next kept token."""
    if check_mode(mode) == "sparrow":
        return torch.nonzero(~visual_mask).flatten()
    return torch.arange(visual_mask.shape[0], device=visual_mask.device)
