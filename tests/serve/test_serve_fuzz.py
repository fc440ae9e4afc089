"""Schema-driven fuzzing: schemathesis generates requests from /openapi.json; none may get a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import requests

import sparrow
from tests.serve.serving import serving


def test_schemathesis_finds_no_server_errors(tmp_path):
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    target = sparrow.load_target("tiny:qwen2_vl")
    with serving(target, max_tokens=8, timeout_s=20) as (url, engine):
        run = subprocess.run(
            [st, "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "30", "--seed", "1", "--request-timeout", "30",
             "--generation-database", "none", "--workers", "1"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        stats = requests.get(f"{url}/health", timeout=10).json()["stats"]
        assert stats["failed"] == 0 and stats["completed"] > 0  # the fuzz reached the model
