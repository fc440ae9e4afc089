"""Target adapters: load a video LLM checkpoint (or wrap a model in memory) for decoding."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from sparrow.errors import CheckpointError
from sparrow.targets.base import PrefillOutput, StepOutput, TargetAdapter, read_processor_config
from sparrow.targets.llava import LlavaAdapter
from sparrow.targets.qwen_vl import QwenVLAdapter

ADAPTERS: dict[str, type[TargetAdapter]] = {
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
    "qwen3_vl": QwenVLAdapter,
    "llava_onevision": LlavaAdapter,
    "llava_next_video": LlavaAdapter,
}

__all__ = ["ADAPTERS", "PrefillOutput", "StepOutput", "TargetAdapter", "load_target", "wrap_model"]


def wrap_model(model: PreTrainedModel, tokenizer=None, processor_config: dict | None = None,
               name: str | None = None) -> TargetAdapter:
    """Wrap a video LLM already in memory for decoding.

    Wrapping changes the model in place, as decoding needs: it is put in eval mode, its
    language model's attention implementation becomes sparrow's tree-aware one, and its CPU
    fp32 `nn.Linear` modules run through oneDNN-packed weights (same parameters, state_dict
    and results to fp32 rounding). `adapter.unwrap()` undoes all three; `with
    adapter.unwrapped() as model:` undoes them for a block. `load_target` makes these changes
    on a model it loads itself."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise CheckpointError(
            f"model type {model_type!r} is not supported; supported: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[model_type](model, tokenizer, processor_config, name=name)


def load_target(spec: str | Path, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> TargetAdapter:
    """Load a target: a checkpoint directory, `reference` (the built-in reference video LLM,
    assembled into the cache on first use), `reference:WEIGHTS` (the same architecture with
    other trained eyes, e.g. a training checkpoint exported by `python -m
    sparrow.reference.train RUN --stage export --out WEIGHTS`; these two through
    `sparrow.fixture`) or `tiny:<family>` (a tiny random model, seed 0)."""
    spec = str(spec)
    if spec == "reference" or spec.startswith("reference:"):
        from sparrow.fixture import load_reference

        return load_reference(spec, dtype, device)
    if spec.startswith("tiny:"):
        from sparrow.targets import tiny

        family = spec.split(":", 1)[1]
        if family not in tiny.FAMILIES:
            raise CheckpointError(
                f"--target {spec}: unknown tiny family; choose one of "
                + ", ".join(f"tiny:{f}" for f in tiny.FAMILIES)
            )
        model = tiny.tiny_model(family).to(device=device, dtype=dtype)
        return wrap_model(model, tiny.tiny_tokenizer(family), tiny.processor_config(family),
                          name=spec)
    directory = Path(spec)
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"--target {spec}: no config.json there; give a Hugging Face checkpoint directory "
            "'reference' or tiny:<family>"
        )
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in ADAPTERS:
        raise CheckpointError(
            f"--target {spec}: model type {config.model_type!r} is not supported; "
            f"supported: {', '.join(ADAPTERS)}"
        )
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return wrap_model(model, tokenizer, read_processor_config(directory), name=str(directory))
