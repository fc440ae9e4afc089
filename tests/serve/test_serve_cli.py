"""`sparrow serve` as a process: starts, answers, stops on SIGTERM; bad flags exit 2."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from sparrow.cli import public_model_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_process_answers_and_stops(tmp_path):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sparrow.cli", "serve", "--target", "tiny:qwen2_vl", "--port",
         str(port), "--media-root", str(tmp_path), "--api-key", "k", "--max-tokens", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                assert requests.get(f"{url}/health", timeout=2).json()["status"] == "ok"
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.1)
        body = {"model": "tiny:qwen2_vl", "messages": [{"role": "user", "content": "Hi"}]}
        response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                                 headers={"Authorization": "Bearer k"})
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] <= 8
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_serve_bad_flags_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sparrow.cli", "serve", "--target", "tiny:qwen2_vl",
                          "--media-root", str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--media-root" in run.stderr


@pytest.mark.parametrize(("target", "expected"), [
    ("reference", "reference"), ("tiny:qwen2_vl", "tiny:qwen2_vl"), ("/srv/ckpt/my-model", "my-model"),
    ("runs/m/", "m"), ("reference:/runs/x/weights.safetensors", "reference:weights.safetensors")])
def test_the_model_id_is_the_targets_name_not_its_path(target, expected):
    assert public_model_id(target) == expected
