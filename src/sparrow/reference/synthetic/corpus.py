"""A corpus on disk: each video as `<seed>.mp4` with its ground truth beside it as `<seed>.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from sparrow.reference.synthetic.facts import VideoFacts, scene_facts
from sparrow.reference.synthetic.render import write_scene
from sparrow.reference.synthetic.scenes import Scene, SceneConfig, generate_scene


def save_facts(scene: Scene, path: str | os.PathLike) -> Path:
    """Write the scene's ground truth (`scene_facts`) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scene_facts(scene).to_dict(), indent=1))
    return path


def load_facts(path: str | os.PathLike) -> VideoFacts:
    return VideoFacts.from_dict(json.loads(Path(path).read_text()))


def generate_corpus(
    out_dir: str | os.PathLike,
    seeds: Iterable[int],
    num_frames: int,
    width: int = 128,
    height: int = 128,
    fps: float = 8.0,
    config: SceneConfig | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write `<seed>.mp4` and `<seed>.json` for every seed into `out_dir`; returns the video
    paths. Seeds whose two files exist are skipped, and files are written under a temporary
    name and renamed, so an interrupted run resumes where it stopped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    videos = []
    for seed in tqdm(seeds, desc="synthetic videos", unit="video", disable=not progress):
        video, facts = out / f"{seed}.mp4", out / f"{seed}.json"
        videos.append(video)
        if video.is_file() and facts.is_file():
            continue
        scene = generate_scene(seed, num_frames, width, height, fps, config)
        partial_video, partial_facts = out / f"{seed}.partial.mp4", out / f"{seed}.partial.json"
        write_scene(scene, partial_video)
        save_facts(scene, partial_facts)
        os.replace(partial_video, video)
        os.replace(partial_facts, facts)
    return videos
