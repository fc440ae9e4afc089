"""The ground truth of a scene (`VideoFacts`): what each object is, where it is, how it moves,
the events in order and the object counts, read from the scene's tracks and per-frame states.
It is what descriptions and questions are written from and what answers are scored against."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from sparrow.reference.synthetic.scenes import Event, Scene, _positions
from sparrow.reference.synthetic.vocabulary import region_of


@dataclass(frozen=True)
class ObjectFact:
    id: int
    shape: str
    size: str
    colour: str  # at the start (or when it enters)
    colours: tuple[str, ...]  # every colour it shows, in order
    motions: tuple[str, ...]  # directions travelled, in order (a collision's approach included)
    visible_at_start: bool
    visible_at_end: bool
    # Where it is (one of REGIONS, thirds of the frame): when it first appears, at the end of
    # each of its moves (in order), and at the end of the video ("" if gone by then).
    start_region: str = ""
    move_regions: tuple[str, ...] = ()
    end_region: str = ""


@dataclass(frozen=True)
class CountChange:
    frame: int
    seconds: float
    count: int  # objects visible from this frame on


@dataclass(frozen=True)
class VideoFacts:
    """The ground truth of one video, as saved next to it in JSON."""

    seed: int
    num_frames: int
    width: int
    height: int
    fps: float
    duration: float  # seconds (num_frames / fps)
    background: str  # kind, one of BACKGROUND_KINDS
    background_colours: tuple[str, ...]
    objects: tuple[ObjectFact, ...]
    events: tuple[Event, ...]  # in time order
    count_start: int
    count_end: int
    counts: tuple[CountChange, ...]  # first entry at frame 0, then one per enter/leave
    config: dict = field(default_factory=dict)  # the SceneConfig the scene was drawn with

    def object(self, object_id: int) -> ObjectFact:
        return next(obj for obj in self.objects if obj.id == object_id)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VideoFacts:
        objects = tuple(
            ObjectFact(**{**obj, "colours": tuple(obj["colours"]), "motions": tuple(obj["motions"]),
                          "move_regions": tuple(obj.get("move_regions", ()))})
            for obj in data["objects"]
        )
        events = tuple(
            Event(**{**event, "object_ids": tuple(event["object_ids"])}) for event in data["events"]
        )
        counts = tuple(CountChange(**change) for change in data["counts"])
        return cls(
            **{
                **data,
                "background_colours": tuple(data["background_colours"]),
                "objects": objects,
                "events": events,
                "counts": counts,
            }
        )


def scene_facts(scene: Scene) -> VideoFacts:
    """The structured ground truth of a scene. Regions are read from the tracks in normalized
    time, so they do not depend on the frame count."""
    last = scene.num_frames - 1
    objects = [_object_fact(scene, i) for i in range(len(scene.objects))]
    counts = scene.visible.sum(axis=1)  # (T,)
    changes = [CountChange(0, 0.0, int(counts[0]))]
    for event in scene.events:
        if event.kind in ("enter", "leave"):
            changes.append(CountChange(event.frame, event.seconds, int(counts[event.frame])))
    return VideoFacts(
        seed=scene.seed,
        num_frames=scene.num_frames,
        width=scene.width,
        height=scene.height,
        fps=scene.fps,
        duration=scene.num_frames / scene.fps,
        background=scene.background.kind,
        background_colours=scene.background.colours,
        objects=tuple(objects),
        events=tuple(scene.events),
        count_start=int(counts[0]),
        count_end=int(counts[last]),
        counts=tuple(changes),
        config=json.loads(json.dumps(asdict(scene.config))),  # JSON types, so a loaded copy is equal
    )


def _object_fact(scene: Scene, i: int) -> ObjectFact:
    """The ground truth of object `i`: what it is, its colours, how it moves and where it is."""
    obj, track = scene.objects[i], scene.tracks[i]
    last = scene.num_frames - 1
    short = min(scene.width, scene.height)

    def region(time: float) -> str:
        x, y = _positions(track, np.array([time]))[0]
        return region_of(x * short / scene.width, y * short / scene.height)

    motions = []
    for event in scene.events:
        if i not in event.object_ids:
            continue
        if event.kind == "move":
            motions.append(event.direction)
        elif event.kind == "collide":
            motions.append("right" if event.object_ids[0] == i else "left")
    return ObjectFact(
        id=obj.id,
        shape=obj.shape,
        size=obj.size,
        colour=obj.colour,
        colours=tuple(colour for _, colour in track.colours),
        motions=tuple(motions),
        visible_at_start=bool(scene.visible[0, i]),
        visible_at_end=bool(scene.visible[last, i]),
        start_region=region(track.appear),
        move_regions=tuple(region(e.end_time) for e in scene.events
                           if e.kind == "move" and e.object_ids[0] == i),
        end_region=region(1.0) if scene.visible[last, i] else "",
    )
