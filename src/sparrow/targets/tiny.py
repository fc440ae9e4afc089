"""Tiny random video LLMs of the real transformers classes, built from config (no download).

Every supported family has a tiny configuration here: a 2-layer language model with GQA, a
2-layer vision tower and the family's real projector/merger, plus a character-level
tokenizer that carries the family's special tokens and a chat template. The tests
and the command line (`--target tiny:<family>`) use them; they are what a checkpoint looks
like to sparrow, only small.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video")

# Character-level vocabulary: printable ASCII and newline, then the special tokens.
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|image_pad|>",
    "<video>",
    "<image>",
]
VOCAB = {token: index for index, token in enumerate(_CHARS + SPECIAL_TOKENS)}
VOCAB_SIZE = len(VOCAB)  # 105: the model can only produce tokens the tokenizer knows

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|video|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    bos_token_id=VOCAB["<|endoftext|>"],
    eos_token_id=VOCAB["<|im_end|>"],
    pad_token_id=VOCAB["<|endoftext|>"],
)
_QWEN_IDS = dict(
    image_token_id=VOCAB["<|image_pad|>"],
    video_token_id=VOCAB["<|video_pad|>"],
    vision_start_token_id=VOCAB["<|vision_start|>"],
    vision_end_token_id=VOCAB["<|vision_end|>"],
)
_LLAVA_IDS = dict(image_token_index=VOCAB["<image>"], video_token_index=VOCAB["<video>"])


def tiny_tokenizer(family: str = "qwen2_vl") -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with the family's special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    model = WordLevel(vocab=dict(VOCAB), unk_token=" ")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join without spaces
    video_marker = "<video>" if family.startswith("llava") else "<|vision_start|><|video_pad|><|vision_end|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=" ",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE.replace("<|video|>", video_marker)
    return fast


def tiny_config(family: str) -> PretrainedConfig:
    """The config of a tiny random model of `family` (one of FAMILIES)."""
    from transformers import (
        LlavaNextVideoConfig,
        LlavaOnevisionConfig,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen3VLConfig,
    )

    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]  # 16
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=_TEXT["hidden_size"], num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config={**_TEXT, "rope_parameters": mrope},
                             vision_config=vision, **_QWEN_IDS)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=_TEXT["hidden_size"], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                      tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config={**_TEXT, "rope_parameters": mrope},
                                vision_config=vision, **_QWEN_IDS)
    if family == "qwen3_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=_TEXT["hidden_size"], patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        text = {**_TEXT, "head_dim": head_dim,
                "rope_parameters": {**mrope, "mrope_interleaved": True}}
        text.pop("bos_token_id")
        return Qwen3VLConfig(text_config=text, vision_config=vision, **_QWEN_IDS)
    if family == "llava_onevision":
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
        text = {**_TEXT, "model_type": "qwen2"}
        return LlavaOnevisionConfig(text_config=text, vision_config=vision,
                                    vision_feature_layer=-1, **_LLAVA_IDS)
    if family == "llava_next_video":
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                      projection_dim=32)
        text = {**_TEXT, "model_type": "llama"}
        return LlavaNextVideoConfig(text_config=text, vision_config=vision,
                                    vision_feature_layer=-1, image_seq_length=16,
                                    video_seq_length=4, **_LLAVA_IDS)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


# Factors on the language model's default random init (std 0.02), by parameter name. With the
# default, query-key products are near 0 and attention is near uniform: every step sees about
# the context's average, which outweighs the token embedding, so greedy answers repeat one
# character, and a wrong position or a wrong cache entry changes nothing a test could see.
# Sharp attention (queries and keys; Qwen3 normalises them per head after the projection, so
# its q/k norm weights carry the factor there) makes each step depend on which tokens it attends
# to and where they are; stronger embeddings, values and MLP keep the current token in charge
# of the answer against that context. Answers are then varied, and position- and cache-sensitive.
_INIT_SCALES = {
    "embed_tokens.weight": 2.0,
    "q_proj.weight": 15.0,
    "k_proj.weight": 15.0,
    "q_norm.weight": 15.0,
    "k_norm.weight": 15.0,
    "v_proj.weight": 2.0,
    "o_proj.weight": 2.0,
    "gate_proj.weight": 4.0,
    "up_proj.weight": 4.0,
    "down_proj.weight": 4.0,
}


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random model of `family`, fp32, in eval mode, reproducible from `seed`."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.model.language_model.named_parameters():
            scale = _INIT_SCALES.get(".".join(name.split(".")[-2:]))  # e.g. "q_proj.weight"
            if scale is not None:
                parameter.mul_(scale)
        # A confident output layer: peaked distributions, as a trained model's, for the
        # sampling tests. The EOS row is zeroed: a logit of 0 is practically never the
        # largest of 105 spread ones, so greedy answers run to max_new_tokens (a test that
        # wants an early stop declares its own EOS); sampling can still end an answer.
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[config.get_text_config().eos_token_id] = 0.0
    return model.eval()


def processor_config(family: str) -> dict:
    """The preprocessor settings a real checkpoint would ship, sized for the tiny models."""
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        patch = 16 if family == "qwen3_vl" else 14
        factor = patch * 2
        return {"image_mean": mean, "image_std": std, "patch_size": patch, "merge_size": 2,
                "temporal_patch_size": 2, "min_pixels": factor * factor,
                "max_pixels": 4 * factor * factor, "rescale_factor": 1 / 255}
    return {"image_mean": mean, "image_std": std, "size": {"height": 56, "width": 56},
            "rescale_factor": 1 / 255}


def save_tiny_checkpoint(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny checkpoint directory (model, tokenizer, preprocessor config) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed).save_pretrained(directory)
    tiny_tokenizer(family).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor_config(family), indent=2))
    return directory
