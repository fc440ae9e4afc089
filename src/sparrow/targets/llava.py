"""LLaVA-OneVision and LLaVA-NeXT-Video: 1-D RoPE over one contiguous sequence.

Every token, visual or not, takes the next integer position, so the position of cache slot i
is i and tree tokens sit at `cache_length + depth`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparrow.targets.base import TargetAdapter

if TYPE_CHECKING:
    from sparrow.video.processing import VideoInputs


class LlavaAdapter(TargetAdapter):
    family = "llava"

    def _prompt_positions(self, input_ids, video: VideoInputs | None):
        return torch.arange(input_ids.shape[1])[None], 0
