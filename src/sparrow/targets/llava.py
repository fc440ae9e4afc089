"""LLaVA-OneVision and LLaVA-NeXT-Video: 1-D RoPE over one contiguous sequence.

Every token takes the next position, so the position of cache slot i is i and tree tokens sit
at `cache_length + depth`: what transformers does, and what every LLaVA checkpoint expects.

One extension, for models trained with it (the reference target, see MODEL_CARD.md): a config
attribute `sparrow_video_position_step` = s < 1 makes each visual token advance the position by
s instead of 1 (text tokens still by 1), so a video of N visual tokens spans N * s positions.
Positions are then fractional (RoPE takes any real position); slot i after the prompt sits at
i + offset with offset = (positions the video saved) < 0, one static rule at every length, so
cached keys and tree queries agree as with integer positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparrow.targets.base import TargetAdapter

if TYPE_CHECKING:
    from sparrow.video.processing import VideoInputs

VIDEO_POSITION_STEP = "sparrow_video_position_step"  # config attribute; absent = 1 (plain LLaVA)


def video_position_step(config) -> float:
    """How far each visual token advances the position under `config` (1 unless it says)."""
    value = getattr(config, VIDEO_POSITION_STEP, None)
    return 1.0 if value is None else checked_position_step(float(value))


def checked_position_step(step: float) -> float:
    """`step` if it is a valid video position step, else a ValueError that says what is."""
    if not 0 < step <= 1 or (step * 256) % 1:
        # multiples of 1/256 keep every position exact in float32 (up to 65,536), so positions
        # summed in any order (prompt, decoding, transformers' generate) are the same numbers
        raise ValueError(f"{VIDEO_POSITION_STEP} must be a multiple of 1/256 in (0, 1], got {step}")
    return step


def prompt_positions(
    input_ids: torch.Tensor, video_token: int, step: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Positions (1, L) of a prompt `input_ids` (L,) whose visual tokens (`video_token`) advance
    the position by `step` and every other token by 1, and the offset of the tokens after it
    (the rotary position of cache slot i >= L is i + offset). `step` 1: plain int64 positions
    0..L-1, offset 0; otherwise float32 (exact: positions stay far below 2**24)."""
    ids = input_ids.reshape(-1)
    if step == 1:
        return torch.arange(ids.shape[0])[None], 0
    advance = torch.where(ids == video_token, step, 1.0).to(torch.float64)
    positions = torch.cumsum(advance, 0) - advance  # each token sits where the ones before it end
    offset = float(positions[-1]) + 1.0 - ids.shape[0] if ids.shape[0] else 0.0
    return positions.to(torch.float32)[None], offset


class LlavaAdapter(TargetAdapter):
    family = "llava"

    def _prompt_positions(self, input_ids, video: VideoInputs | None):
        return prompt_positions(input_ids, self.video_token_id(), video_position_step(self.config))
