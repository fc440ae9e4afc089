"""The README's Python example runs as written (on a real clip written next to it), and every
file the docs and scripts name exists."""

from __future__ import annotations

import itertools
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
PATH = re.compile(  # a path under one of these folders, not part of a longer one; {a,b} allowed
    r"(?<![\w/.{,-])((?:tests|benchmarks|src|docs|results)/[\w/.{},-]*[\w}])")
FILE = re.compile(r"\.(?:py|sh|md|jsonl?|png|c|h)$")


def _files(named: str):
    """The file names a doc's path stands for: `{a,b}` expanded, `results/...` (how
    benchmarks/README.md and the docs cite result files) under benchmarks/, folders left out."""
    parts = re.split(r"\{([^{}]*)\}", named)
    for choice in itertools.product(*(group.split(",") for group in parts[1::2])):
        path = "".join(a + b for a, b in itertools.zip_longest(parts[0::2], choice, fillvalue=""))
        if FILE.search(path):
            yield "benchmarks/" + path if path.startswith("results/") else path


def test_every_file_the_docs_and_scripts_name_exists():
    """A moved test or result file leaves no stale path in a doc or a prepared script (the GPU
    script once named tests that had moved into subpackages)."""
    named = {(str(doc.relative_to(ROOT)), path)
             for doc in DOCS for found in PATH.findall(doc.read_text()) for path in _files(found)}
    assert len(named) > 60  # the pattern still finds the docs' paths (73 on 2026-12-08)
    assert [(doc, path) for doc, path in sorted(named) if not (ROOT / path).exists()] == []
