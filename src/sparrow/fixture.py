"""The one door from the core to the reference fixture (`sparrow.reference`): the named target
`reference[:WEIGHTS]`, its self-distillation prompts (`sparrow datagen`), its evaluation
videos and their scoring (`sparrow bench`, `sparrow analyze`) and the fixture's command
(`sparrow eval-target`). Nothing else outside
`sparrow.reference` imports it, and it is imported only when one of these is used."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from sparrow.errors import CheckpointError


def load_reference(spec: str, dtype: torch.dtype, device: str | torch.device):
    """`reference` (the shipped eyes) or `reference:WEIGHTS` (other trained eyes, e.g. a training
    checkpoint exported with `python -m sparrow.reference.train RUN --stage export --out W`)."""
    from sparrow.reference import assembly
    from sparrow.targets import load_target

    weights = Path(spec.split(":", 1)[1]) if ":" in spec else assembly.WEIGHTS_FILE
    if ":" in spec and not weights.is_file():
        raise CheckpointError(f"--target {spec}: no weights file {weights}; export one with "
                              "python -m sparrow.reference.train RUN_DIR --stage "
                              f"export --out {weights}")
    target = load_target(assembly.checkpoint(weights), dtype=dtype, device=device)
    target.name = spec
    return target


def resolve_draft(spec: str) -> str:
    """A `--draft` value as a directory: `reference:<name>` is a draft shipped for the
    reference target (`sparrow.reference.drafts`); anything else is a path already."""
    if not spec.startswith("reference:"):
        return spec
    from sparrow.reference import drafts

    return str(drafts.path(spec.split(":", 1)[1]))


def is_reference(name: str) -> bool:
    """Whether a target name (`--target`) is the reference target."""
    return name == "reference" or name.startswith("reference:")


def reference_prompts(count: int, seed: int, video_dir: Path):
    """The reference target's self-distillation prompts (`sparrow.reference.prompts`)."""
    from sparrow.reference.prompts import reference_prompts as make

    return make(count, seed, video_dir)


def reference_cases(target, lengths: list[int], videos: int):
    """Benchmark cases of the reference target: evaluation-seed videos (never trained on)
    with as many frames as fit each length, asked for a detailed description."""
    from sparrow.bench import Case
    from sparrow.home import cache_home
    from sparrow.reference import synthetic
    from sparrow.reference.eval_target import PROMPT, frames_for_length, video_for

    cases = []
    for length in lengths:
        frames = frames_for_length(target, length)
        for index in range(videos):
            path, _ = video_for(synthetic.EVAL_SEED_START + index, frames, cache_home() / "eval-videos")
            cases.append(Case(length, index, PROMPT, str(path), frames))
    return cases


def reference_score(case, text: str) -> float:
    """Key-fact accuracy of `text` as a description of a `reference_cases` case's video."""
    from sparrow.reference import synthetic
    from sparrow.reference.eval_target import eval_scene

    facts = synthetic.scene_facts(eval_scene(synthetic.EVAL_SEED_START + case.index, case.num_frames))
    return synthetic.score_description(text, facts)["score"]


def add_commands(subparsers) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the fixture's subcommands to the `sparrow` parser; returns their handlers by name."""
    from sparrow.reference import eval_target

    return eval_target.add_command(subparsers)
