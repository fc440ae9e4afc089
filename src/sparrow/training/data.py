"""Reading `sparrow datagen` output for training: samples in memory, the held-out split, the
draft vocabulary, and the check that the data was made by the target being trained for."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparrow.errors import DataError
from sparrow.training.datagen import FORMAT, MANIFEST


@dataclass
class Sample:
    input_ids: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) bool: answer tokens
    visual_mask: torch.Tensor  # (T,) bool
    last: torch.Tensor  # (T, d) fp16
    mid: torch.Tensor  # (V, d) fp16
    embed: torch.Tensor  # (V, d) fp16
    key: str  # "<data dir name>/<prompt index>": stable identity for the split and noise

    @property
    def has_video(self) -> bool:
        return bool(self.visual_mask.any())


@dataclass
class Dataset:
    samples: list[Sample]
    manifests: list[dict]
    mid_layer: int

    def answer_tokens(self) -> int:
        return int(sum(int(s.loss_mask.sum()) for s in self.samples))


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(f"--data {directory}: no {MANIFEST}; make data with "
                        "`sparrow datagen --target T --out DIR`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"--data {directory}: data format {manifest.get('format')}, this sparrow "
                        f"reads {FORMAT}; regenerate it with this version's `sparrow datagen`")
    return manifest


def check_target(manifest: dict, fingerprint: dict, directory: Path) -> None:
    """Refuse data made by another target, naming what differs."""
    made = manifest["target"]
    differs = [key for key in ("model_type", "num_layers", "hidden_size", "vocab_size", "weights")
               if made.get(key) != fingerprint.get(key)]
    if differs:
        raise DataError(
            f"--data {directory} was made by target {made.get('name')!r}, not this one "
            f"({fingerprint.get('name')!r}): {', '.join(differs)} differ. Train on data made "
            "by this target (`sparrow datagen --target ... --out DIR`)."
        )


def load_dataset(directories: list[str | Path], fingerprint: dict | None = None) -> Dataset:
    """Every sample of the datagen outputs `directories` (checked against the target's
    `fingerprint` when given; all must share one target and one mid layer)."""
    from safetensors.torch import load_file

    samples, manifests = [], []
    for directory in map(Path, directories):
        manifest = read_manifest(directory)
        if fingerprint is not None:
            check_target(manifest, fingerprint, directory)
        if manifests and manifest["target"] != manifests[0]["target"]:
            raise DataError(f"--data {directory}: made by another target than {directories[0]}")
        if manifests and manifest["settings"]["mid_layer"] != manifests[0]["settings"]["mid_layer"]:
            raise DataError(f"--data {directory}: states of another mid layer than {directories[0]}")
        manifests.append(manifest)
        shards = sorted(directory.glob("shard-*.safetensors"))
        if not shards:
            raise DataError(f"--data {directory}: no shards yet; run `sparrow datagen` to the end")
        for path in tqdm(shards, desc=f"reading {directory.name}", unit="shard", leave=False):
            try:
                t = load_file(str(path))
            except Exception as error:  # safetensors raises several types for a damaged file
                raise DataError(f"{path}: cannot read ({error}); delete it and rerun datagen "
                                "to write it again") from error
            offsets, visual = t["offsets"].tolist(), t["visual_offsets"].tolist()
            for i, index in enumerate(t["prompt_index"].tolist()):
                a, b, va, vb = offsets[i], offsets[i + 1], visual[i], visual[i + 1]
                samples.append(Sample(
                    input_ids=t["input_ids"][a:b].long(), loss_mask=t["loss_mask"][a:b],
                    visual_mask=t["visual_mask"][a:b], last=t["last"][a:b],
                    mid=t["mid"][va:vb], embed=t["embed"][va:vb], key=f"{directory.name}/{index}"))
    samples.sort(key=lambda s: s.key)
    return Dataset(samples, manifests, manifests[0]["settings"]["mid_layer"])


def _fraction(key: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split(samples: list[Sample], held_out: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): each sample's side is a fixed function of its key and `seed`."""
    train = [s for s in samples if _fraction(s.key, f"split{seed}") >= held_out]
    held = [s for s in samples if _fraction(s.key, f"split{seed}") < held_out]
    return train, held


def subset(samples: list[Sample], count: int | None, seed: int) -> list[Sample]:
    """`count` of `samples` drawn by a fixed function of their keys and `seed` (all when None):
    a smaller subset lies inside every larger one, and each mixes the data's prompt kinds as
    the whole does (the data is stored in prompt order, text-only first)."""
    if count is None or count >= len(samples):
        return samples
    chosen = sorted(samples, key=lambda s: _fraction(s.key, f"subset{seed}"))[:count]
    return sorted(chosen, key=lambda s: s.key)


def draft_vocabulary(samples: list[Sample], size: int) -> torch.Tensor:
    """(n,) int64, sorted: the `size` most frequent answer tokens of `samples` (ties by id),
    or all of them if the answers use fewer (n < size)."""
    counts = Counter()
    for sample in samples:
        counts.update(sample.input_ids[sample.loss_mask].tolist())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]
    if len(ranked) < 2:
        raise DataError("--draft-vocab: the data's answers hold fewer than 2 distinct tokens")
    return torch.tensor(sorted(token for token, _ in ranked), dtype=torch.long)
