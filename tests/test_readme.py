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


ROOT = README.parent
DOCS = [README, ROOT / "MODEL_CARD.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.sh")),
        ROOT / "Makefile", ROOT / ".ci" / "run"]
PATH = re.compile(  # a file under one of these folders, not part of a longer path
    r"(?<![\w/.-])((?:tests|benchmarks|src|docs)/[\w/.-]*\w\.(?:py|sh|md|jsonl?|png|c|h))\b")


def test_every_file_the_docs_and_scripts_name_exists():
    """A moved test or result file leaves no stale path in a doc or a prepared script (the GPU
    script once named tests that had moved into subpackages)."""
    named = {(str(doc.relative_to(ROOT)), path)
             for doc in DOCS for path in PATH.findall(doc.read_text())}
    assert len(named) > 30  # the pattern still finds the docs' paths (44 on 2026-12-07)
    assert [(doc, path) for doc, path in sorted(named) if not (ROOT / path).exists()] == []
