"""Training fixtures: a tiny LLaVA-OneVision target, a prompts file with real videos and text,
and one datagen run shared by the module's tests."""

from __future__ import annotations

import json

import pytest

from sparrow.training.datagen import DatagenSettings, datagen
from sparrow.training.prompts import read_prompts

FAMILY = "llava_onevision"  # `tiny:llava_onevision`: what a subprocess loads by name
SETTINGS = DatagenSettings(max_new_tokens=10, batch_size=2)


@pytest.fixture(scope="session")
def tiny_target():
    from sparrow.targets import load_target

    return load_target(f"tiny:{FAMILY}")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory, video_file):
    root = tmp_path_factory.mktemp("prompts")
    lines = [{"question": "What happens in the video?", "video": video_file(4, 0), "num_frames": 4},
             {"question": "Describe it.", "video": video_file(4, 1), "num_frames": 4},
             {"question": "Which colour is the square?", "video": video_file(4, 2), "num_frames": 4},
             {"question": "Name three fruits."},
             {"question": "What colour is the sky?"},
             {"question": "Count to five.", "video": video_file(8, 3), "num_frames": 8}]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tiny_target, prompts_file):
    out = tmp_path_factory.mktemp("data") / "run"
    datagen(tiny_target, read_prompts(prompts_file), out, SETTINGS)
    return out
