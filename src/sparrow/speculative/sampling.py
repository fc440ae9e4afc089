"""Sampling settings and the target distribution they define.

The warping is transformers' own (temperature, then top-k, then top-p, the order `generate`
applies them), so "the target's distribution" means exactly what `generate(do_sample=True)`
samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sparrow.errors import ConfigError

# Below this, logits / temperature overflows float32 (a logit of 40 over 1e-37 is infinite)
# long before sampling differs from greedy decoding; such temperatures are refused.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(f"--temperature {self.temperature:g}: too small to sample with; use 0 "
                              f"for greedy decoding or at least {MIN_TEMPERATURE:g}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, V) logits -> (n, V) float32 target probabilities after warping."""
        warped = self.warpers()(None, logits.float())
        return torch.softmax(warped, dim=-1)


GREEDY = SamplingParams()
