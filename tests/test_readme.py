"""The README's Python example runs as written (on a real clip written next to it)."""

from __future__ import annotations

import re
from pathlib import Path

from sparrow.video.io import write_video
from tests.helpers import moving_square_frames

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "clip.mp4", moving_square_frames(12), fps=8)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["fast"].result.token_ids == namespace["plain"].result.token_ids
