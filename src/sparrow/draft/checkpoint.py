"""Draft checkpoints: a directory with `config.json` (the `DraftConfig`) and
`model.safetensors` (the draft's own weights; the target's embedding and lm_head are not in
it). Creating, saving, loading, and refusing a draft made for another target."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

from sparrow.draft.model import DraftConfig, DraftModel
from sparrow.errors import CheckpointError
from sparrow.runtime.linear import pack_linears

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_draft(draft: DraftModel, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `draft` to `directory` (created if missing), its floating-point weights in `dtype`
    (default: as they are; shipped drafts are fp16); returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in draft.state_dict().items():
        value = value.detach().contiguous().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(draft.config), indent=2) + "\n")
    return directory


def _for_inference(draft: DraftModel, target) -> DraftModel:
    """On the target's device and dtype, in eval mode, its CPU fp32 linears packed for oneDNN
    (`sparrow.runtime.linear`: same parameters, same results; the draft is ours to change)."""
    draft = draft.to(device=target.device, dtype=target.dtype).eval()
    pack_linears(draft)
    return draft


def new_draft(config: DraftConfig, seed: int = 0) -> DraftModel:
    """A randomly initialised draft of `config` (reproducible from `seed`), fp32 on the CPU,
    as training starts from it. The global RNG is left as it was."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        draft = DraftModel(config)
        std = 0.02
        for module in draft.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    finally:
        torch.random.set_rng_state(generator_state)
    return draft


def init_draft(target, mode: str = "sparrow", seed: int = 0, **config) -> DraftModel:
    """A randomly initialised draft shaped for `target` (reproducible from `seed`), ready to
    decode; `config`: further `DraftConfig.for_target` arguments (visual, mid_layer, ...)."""
    return _for_inference(new_draft(DraftConfig.for_target(target, mode, **config), seed), target)


def check_compatible(config: DraftConfig, target, source: str = "draft") -> None:
    """Refuse a draft built for another target, naming both."""
    text = target.text_config
    problems = []
    if config.target_model_type != target.config.model_type:
        problems.append(f"model type {config.target_model_type} vs {target.config.model_type}")
    if config.hidden_size != text.hidden_size:
        problems.append(f"hidden size {config.hidden_size} vs {text.hidden_size}")
    if config.vocab_size != text.vocab_size:
        problems.append(f"vocabulary {config.vocab_size} vs {text.vocab_size}")
    if problems:
        raise CheckpointError(
            f"draft {source} does not fit target {target.name}: " + "; ".join(problems)
            + " (draft vs target). Use a draft made for this target "
            "(sparrow draft-init --target ... or sparrow train)."
        )


def read_draft(directory: str | Path, mode: str | None = None, target=None) -> DraftModel:
    """The draft checkpoint in `directory` as saved (fp32 on the CPU, not packed), checked
    against `target` when given; `mode` overrides the saved mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"--draft {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE} there; "
            "create one with `sparrow draft-init --target T --out DIR`"
        )
    try:  # __post_init__ runs again below, after `mode` is applied
        raw = json.loads(config_path.read_text())
        known = {f.name for f in fields(DraftConfig)}
        config = DraftConfig(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"--draft {directory}: malformed {CONFIG_FILE} ({error})") from error
    if target is not None:
        check_compatible(config, target, source=str(directory))
    if mode is not None:
        config.mode = mode
    try:
        config.__post_init__()
    except CheckpointError as error:
        raise CheckpointError(f"--draft {directory}: {error}") from error
    draft = DraftModel(config)
    try:
        state = load_file(str(weights_path))
        draft.load_state_dict(state, strict=True)  # casts fp16 files to fp32
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"--draft {directory}: cannot load weights ({error})") from error
    return draft


def load_draft(directory: str | Path, target, mode: str | None = None) -> DraftModel:
    """Load a draft checkpoint directory for `target`, ready to decode; `mode` overrides the
    saved mode."""
    return _for_inference(read_draft(directory, mode, target), target)
