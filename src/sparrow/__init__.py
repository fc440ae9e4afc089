"""sparrow: lossless speculative decoding for Hugging Face video LLMs (the Sparrow method)."""

from sparrow.api import Answer, answer, prepare_video
from sparrow.draft import DraftModel, init_draft, load_draft
from sparrow.errors import SparrowError
from sparrow.speculative.generate import GenerationResult, generate
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import TreeSpec
from sparrow.targets import TargetAdapter, load_target, wrap_model

__all__ = [
    "Answer",
    "DraftModel",
    "GenerationResult",
    "SamplingParams",
    "SparrowError",
    "TargetAdapter",
    "TreeSpec",
    "answer",
    "generate",
    "init_draft",
    "load_draft",
    "load_target",
    "prepare_video",
    "wrap_model",
]
__version__ = "0.1.0"
