"""Self-distillation prompts for the reference target (`sparrow datagen --target reference`).

Videos are rendered from training seeds only (below `synthetic.EVAL_SEED_START`: never an
evaluation or validation seed) at the evaluation's frame size and rate, with 8 to 64 frames
(~130 to ~1k visual tokens: short videos, as the paper trains on images), and asked what the
target was trained to answer: detailed descriptions in the reference prompts' wording, and
the short questions of `synthetic.questions`. A share of the prompts is text only (stage 1 of
the draft's training), instructions on everyday topics, which SmolLM2 answers in its own words.
Everything is a function of (seed, index): the same call gives the same prompts.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tqdm.auto import tqdm

from sparrow.reference import synthetic
from sparrow.reference.eval_target import eval_scene
from sparrow.reference.train.data import DESCRIBE_PROMPTS
from sparrow.training.prompts import Prompt

FRAME_CHOICES = (8, 16, 16, 32, 64)  # ~130 / 257 / 513 / 1k visual tokens
SHARES = (("text", 0.2), ("describe", 0.6), ("question", 0.2))

TOPICS = (
    "the water cycle", "how a bicycle works", "photosynthesis", "the history of the printing press",
    "why the sky is blue", "how bread rises", "the rules of chess", "volcanoes", "honey bees",
    "the moon's phases", "how rainbows form", "recycling", "the solar system", "electric cars",
    "learning a new language", "healthy sleep", "how computers store data", "the ocean tides",
    "growing tomatoes", "the first airplanes", "how vaccines work", "coral reefs", "deserts",
    "the human heart", "saving money", "public libraries", "wind energy", "penguins",
    "how maps are made", "the Olympic games", "composting", "earthquakes", "owls",
    "how a refrigerator works", "the Great Wall of China", "teamwork", "clouds", "magnets",
    "writing a good email", "the life of a butterfly", "trains", "making tea", "forests",
)
TEXT_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Write a short paragraph about {topic}.",
    "Tell me three interesting facts about {topic}.",
    "What should a beginner know about {topic}?",
    "Describe {topic} in detail.",
    "Why is {topic} important?",
)


def _video(seed: int, num_frames: int, directory: Path) -> str:
    path = directory / f"{seed}-{num_frames}.mp4"
    if not path.is_file():
        partial = directory / f"{seed}-{num_frames}.{os.getpid()}.partial.mp4"
        synthetic.write_scene(eval_scene(seed, num_frames), partial)
        os.replace(partial, path)
    return str(path)


def reference_prompts(count: int, seed: int, video_dir: Path) -> list[Prompt]:
    """`count` prompts (see the module docstring); their videos are rendered into `video_dir`."""
    video_dir.mkdir(parents=True, exist_ok=True)
    kinds, weights = zip(*SHARES, strict=True)
    prompts = []
    for index in tqdm(range(count), desc="prompts", unit="prompt", leave=False):
        rng = random.Random(f"sparrow-datagen-{seed}-{index}")
        kind = rng.choices(kinds, weights)[0]
        if kind == "text":
            template = rng.choice(TEXT_TEMPLATES)
            prompts.append(Prompt(template.format(topic=rng.choice(TOPICS))))
            continue
        scene_seed = rng.randrange(synthetic.EVAL_SEED_START)
        frames = rng.choice(FRAME_CHOICES)
        if kind == "describe":
            question = rng.choice(DESCRIBE_PROMPTS)
        else:
            question = rng.choice(synthetic.questions(synthetic.scene_facts(eval_scene(scene_seed,
                                                                                       frames))))[0]
        prompts.append(Prompt(question, _video(scene_seed, frames, video_dir), frames))
    return prompts
