"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: M-RoPE positions.

The prompt's positions come from the model's own `get_rope_index` (3 axes: time, height,
width for visual tokens; equal for text). Every text token after the prompt sits at
`cache_length + rope_deltas` on all three axes, so the adapter keeps `rope_deltas` as its
position offset, recomputed for every prompt (never reused from a previous request).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparrow.targets.base import TargetAdapter
from sparrow.video.prompt import mm_token_type_ids

if TYPE_CHECKING:
    from sparrow.video.processing import VideoInputs


class QwenVLAdapter(TargetAdapter):
    family = "qwen_vl"

    def _prompt_positions(self, input_ids, video: VideoInputs | None):
        kwargs = {"mm_token_type_ids": mm_token_type_ids(input_ids, self.config)}
        if video is not None:
            kwargs.update(self._video_kwargs(video))
            kwargs.pop("pixel_values_videos")
        position_ids, rope_deltas = self.model.model.get_rope_index(input_ids, **kwargs)
        # The model also caches rope_deltas for its own generate(); clear it so nothing stale
        # survives this request (we always pass explicit positions).
        self.model.model.rope_deltas = None
        return position_ids, int(rope_deltas.reshape(-1)[0])

    def _prefill_kwargs(self, input_ids, video: VideoInputs | None) -> dict:
        kwargs = {"mm_token_type_ids": mm_token_type_ids(input_ids, self.config)}
        if video is not None:
            kwargs.update(self._video_kwargs(video))
        return kwargs
