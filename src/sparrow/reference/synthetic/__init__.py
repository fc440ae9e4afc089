"""Synthetic videos with known ground truth: the corpus the reference target's vision tower
learns from and is evaluated on.

A scene is a few flat-coloured shapes on a background; over the video a short sequence of
events happens, one at a time (an object moves, enters, leaves, changes colour, or two objects
collide). `generate_scene(seed, num_frames, ...)` always returns the same scene for the same
seed, and the same story at any frame count. Seeds from `EVAL_SEED_START` on are for evaluation
only.

One module per concern, each importing only the ones above it:

    vocabulary.py  the closed vocabularies: shapes, colours, sizes, directions, event kinds,
                   backgrounds, regions of the frame
    shapes.py      shape outlines: point-in-shape, pixel masks, the distance at which two shapes
                   touch
    scenes.py      the scene model and `generate_scene`: timing in normalized time and the
                   unambiguity rules that keep every fact checkable from pixels and from text
    facts.py       the ground truth of a scene (`scene_facts` -> `VideoFacts`)
    render.py      pixels: backgrounds, frames, `write_scene` (mp4)
    corpus.py      a corpus on disk: `<seed>.mp4` beside `<seed>.json`
    language.py    `describe` (one of `NUM_STYLES` reference descriptions) and `questions`
    scoring.py     `key_facts` and `score_description`, with its matching rules

Everything other modules use is re-exported here, so callers write `synthetic.generate_scene`.
"""

from __future__ import annotations

from sparrow.reference.synthetic.corpus import generate_corpus, load_facts, save_facts
from sparrow.reference.synthetic.facts import CountChange, ObjectFact, VideoFacts, scene_facts
from sparrow.reference.synthetic.language import NUM_STYLES, describe, questions
from sparrow.reference.synthetic.render import render_background, render_frames, write_scene
from sparrow.reference.synthetic.scenes import (
    EVAL_SEED_START,
    Background,
    Event,
    ObjectSpec,
    Scene,
    SceneConfig,
    Track,
    generate_scene,
)
from sparrow.reference.synthetic.scoring import KeyFact, key_facts, score_description
from sparrow.reference.synthetic.shapes import shape_mask
from sparrow.reference.synthetic.vocabulary import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOUR_NAMES,
    COLOURS,
    DIRECTIONS,
    EVENT_KINDS,
    REGIONS,
    SHAPES,
    SIZES,
    region_of,
)

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "COLOURS",
    "COLOUR_NAMES",
    "DIRECTIONS",
    "EVAL_SEED_START",
    "EVENT_KINDS",
    "NUM_STYLES",
    "REGIONS",
    "SHAPES",
    "SIZES",
    "Background",
    "CountChange",
    "Event",
    "KeyFact",
    "ObjectFact",
    "ObjectSpec",
    "Scene",
    "SceneConfig",
    "Track",
    "VideoFacts",
    "describe",
    "generate_corpus",
    "generate_scene",
    "key_facts",
    "load_facts",
    "questions",
    "region_of",
    "render_background",
    "render_frames",
    "save_facts",
    "scene_facts",
    "score_description",
    "shape_mask",
    "write_scene",
]
