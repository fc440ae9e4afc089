"""Prompts for self-distillation: what `sparrow datagen` asks the target.

`--prompts FILE` is JSON Lines, one prompt per line:

    {"question": "What happens in the video?", "video": "clips/a.mp4", "num_frames": 16}
    {"question": "Explain photosynthesis."}

`question` is required; `video` (a path, relative to the file's folder) and `num_frames`
(default: `sparrow generate`'s) are optional; `system` sets a system message. For the
reference target, prompts come from the fixture (`sparrow.fixture.reference_prompts`) when
no file is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sparrow.errors import DataError
from sparrow.options import DEFAULT_NUM_FRAMES


@dataclass(frozen=True)
class Prompt:
    question: str
    video: str | None = None  # path of a video file, or None for a text-only prompt
    num_frames: int | None = None  # frames sampled from `video`
    system: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSON Lines file (see the module docstring), checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file; give a JSON Lines file of "
                        '{"question": ..., "video": ...} objects')
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--prompts {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
                or not record["question"].strip():
            raise DataError(f'{where}: expected an object with a non-empty "question" string')
        unknown = set(record) - {"question", "video", "num_frames", "system"}
        if unknown:
            raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: question, "
                            "video, num_frames, system")
        video = record.get("video")
        frames = record.get("num_frames")
        if video is not None:
            if not isinstance(video, str):
                raise DataError(f'{where}: "video" must be a path string')
            video_path = Path(video) if Path(video).is_absolute() else path.parent / video
            if not video_path.is_file():
                raise DataError(f"{where}: video {video_path} does not exist")
            video = str(video_path)
            frames = DEFAULT_NUM_FRAMES if frames is None else frames
            if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
                raise DataError(f'{where}: "num_frames" must be a positive integer')
        elif frames is not None:
            raise DataError(f'{where}: "num_frames" given without a "video"')
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f'{where}: "system" must be a string')
        prompts.append(Prompt(record["question"], video, frames, system))
    if not prompts:
        raise DataError(f"--prompts {path}: no prompts in it")
    return prompts
