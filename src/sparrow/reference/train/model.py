"""The reference model as the language-model stages train it, and the shipped weights file.

Trained: the projector, the image newline, and LoRA adapters on SmolLM2's linear layers
(`LORA_TARGETS`); the tower stays as the eyes stage left it. `export` writes the shipped weights
(tower, projector, newline, LoRA factors) of the last language-model stage that ran to one
safetensors file, which `sparrow.reference.assembly` merges into SmolLM2 at assembly;
`read_export` reads such a file back for `--continue-from` and `--lora-from`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from sparrow.reference import assembly

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))


def tower_state(eyes: Path) -> dict:
    """The tower of an eyes checkpoint (run/eyes.pt) under the reference model's names."""
    tower = torch.load(eyes, weights_only=True)["tower"]
    return {f"model.vision_tower.{k}": v for k, v in tower.items()}


def build_caption_model(eyes: Path, rank: int, video_position_step: float = assembly.VIDEO_POSITION_STEP):
    """The reference model with the stage-1 tower (and stage-1b projector when run/align.pt
    exists), visual tokens advancing the position by `video_position_step`, LoRA injected,
    trainable parts selected."""
    from peft import inject_adapter_in_model

    state = tower_state(eyes)
    align = eyes.parent / "align.pt"
    if align.is_file():  # stage 1b's projector
        projector = torch.load(align, weights_only=True)["projector"]
        state.update({f"model.multi_modal_projector.{k}": v for k, v in projector.items()})
    model, tokenizer = assembly.build_reference(assembly.TOWER, state, assembly.ROPE_SCALING,
                                                 video_position_step=video_position_step)
    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(rank), model.model.language_model)
    for name, param in model.named_parameters():
        if "lora_" in name or "multi_modal_projector" in name or name.endswith("image_newline"):
            param.requires_grad_(True)
    return model, tokenizer


def autocast(device: str | torch.device = "cpu", native_bf16: bool | None = None):
    """The language-model stages' precision: bf16 autocast where oneDNN computes bf16 natively
    (AVX-512 and up, where it beats fp32), fp32 elsewhere (an AVX2-only CPU emulates bf16 GEMMs,
    far slower than fp32). The machines here vary by session, so a run may mix both (the model
    card says which sittings ran how). On a CUDA device: bf16 where the GPU has it (Ampere and
    up)."""
    kind = torch.device(device).type
    if native_bf16 is None:
        native_bf16 = (torch.cuda.is_bf16_supported() if kind == "cuda"
                       else torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.autocast(kind, dtype=torch.bfloat16) if native_bf16 else contextlib.nullcontext()


def shipped_name(name: str) -> str:
    """A trainable tensor's name in the shipped file: peft's LoRA factors lose their adapter
    suffix ("...q_proj.lora_A.default.weight" -> "...q_proj.lora_A"); the rest keep theirs."""
    if "lora_" not in name:
        return name
    layer, _, rest = name.partition(".lora_")
    return f"{layer}.lora_{rest[0]}"


def export(run: Path, out: Path) -> Path:
    """The shipped weights: tower, projector, newline (fp32) and LoRA factors (fp16) + metadata."""
    from safetensors.torch import save_file

    eyes = torch.load(run / "eyes.pt", weights_only=True)["tower"]
    stages = {stage: torch.load(run / f"{stage}.pt", weights_only=True)
              for stage in ("caption", "long") if (run / f"{stage}.pt").is_file()}
    caption = stages.get("long") or stages["caption"]  # the last language-model stage that ran
    tensors = {f"model.vision_tower.{k}": v.float().contiguous() for k, v in eyes.items()}
    for name, value in caption["trainable"].items():
        dtype = torch.float16 if "lora_" in name else torch.float32
        tensors[shipped_name(name)] = value.to(dtype).contiguous()
    rank = caption["rank"]
    metadata = {"lora_rank": str(rank), "lora_alpha": str(2 * rank),
                **{f"{stage}_steps": str(state["step"]) for stage, state in stages.items()},
                **{f"{stage}_fresh_optimizer_at": ",".join(map(str, state.get("fresh_optimizer_at", [0])))
                   for stage, state in stages.items()},
                **{f"{stage}_pose_reach": str(state["pose_reach"])
                   for stage, state in stages.items() if state.get("pose_reach")},
                **({"caption_lora_from": stages["caption"]["lora_from"]}
                   if "lora_from" in stages.get("caption", {}) else {}),
                "tower": json.dumps(assembly.TOWER), "rope_scaling": json.dumps(assembly.ROPE_SCALING),
                "processor": json.dumps(assembly.PROCESSOR_CONFIG),
                "video_position_step": json.dumps(caption.get("video_position_step", 1.0))}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, out)
    return out


def read_export(weights: Path, flag: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors by shipped name) of a file written by `export`; `flag` names the
    option that gave it, for the errors."""
    from safetensors import safe_open

    if not weights.is_file():
        raise SystemExit(f"{flag} {weights}: no such file (an exported weights file, e.g. "
                         f"{assembly.WEIGHTS_FILE})")
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    if "caption_steps" not in metadata:
        raise SystemExit(f"{flag} {weights}: the file records no caption step; it was not "
                         "written by this script's export")
    return metadata, tensors


def lora_from(weights: Path, model, rank: int) -> dict[str, torch.Tensor]:
    """The LoRA factors of an exported file under `model`'s parameter names (`--lora-from`): a
    caption stage on new eyes starts its language-model adapter from an earlier run's; the
    tower, projector and newline stay this run's. What carries over is the writing, not the
    reading, and an adapter that already writes lets the new eyes be read sooner (MODEL_CARD.md)."""
    metadata, tensors = read_export(weights, "--lora-from")
    if int(metadata.get("lora_rank", rank)) != rank:
        raise SystemExit(f"--lora-from {weights}: LoRA rank {metadata['lora_rank']}, not --rank {rank}")
    factors = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            value = tensors.get(shipped_name(name))
            if value is None or value.shape != param.shape:
                raise SystemExit(f"--lora-from {weights}: it lacks {shipped_name(name)} of shape "
                                 f"{tuple(param.shape)}; it was trained for another language model")
            factors[name] = value.to(param.dtype).clone()
    return factors
