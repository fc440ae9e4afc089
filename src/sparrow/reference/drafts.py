"""The trained drafts shipped for the reference target (MODEL_CARD.md, "Drafts"): `sparrow`
(IVSB + MTP + VATA) and `eagle` (EAGLE-full), fp16 in `weights/draft-<name>/`. Each is a
draft checkpoint directory (`sparrow.draft.checkpoint`): `--draft reference:<name>` names it
on the command line, `load_draft(path(name), target)` in Python."""

from __future__ import annotations

from pathlib import Path

from sparrow.errors import CheckpointError

DIRECTORY = Path(__file__).resolve().parent / "weights"
NAMES = ("sparrow", "eagle")
DEMO_TREE = "auto"  # chosen from costs measured on this machine (a wide tree costs a CPU more than it gains)


def path(name: str) -> Path:
    """The directory of the shipped draft `name`."""
    if name not in NAMES:
        raise CheckpointError(f"--draft reference:{name}: no such shipped draft; choose one of "
                              + ", ".join(f"reference:{n}" for n in NAMES))
    return DIRECTORY / f"draft-{name}"
