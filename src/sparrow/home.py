"""Where sparrow keeps what it builds on first use (compiled kernels, assembled checkpoints,
rendered evaluation videos): $SPARROW_HOME, else ~/.cache/sparrow."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("SPARROW_HOME") or Path.home() / ".cache" / "sparrow")
