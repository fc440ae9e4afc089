"""Scenes: the story of a synthetic video (objects, events, paths in normalized time) drawn from
a seed, and its per-frame object states at a chosen frame count and resolution.

A scene is a few flat-coloured shapes on a background. Over the video a short sequence of
events happens, one at a time: an object moves left/right/up/down, enters, leaves, changes
colour, or two objects move towards each other and collide. Everything is drawn from a
`numpy.random.Generator` seeded by the caller, so `generate_scene(seed, ...)` always returns the
same scene.

Time. Events live in normalized time t in [0, 1] (frame k of T sits at t = k / (T - 1)), so the
same seed rendered with 4 or with 200 frames shows the same story. The video is cut into one
phase per event (phase p spans [p / E, (p + 1) / E]). Every event begins at 20% of its phase:
an instantaneous event (enter, leave, colour change) happens there, a move runs from there to
90% of the phase, and a collision's approach runs from there until the objects touch at 60%.
Events therefore begin exactly one phase apart, so with `num_frames >= num_events + 1` (frames
at most one phase apart) the first frame showing each event comes strictly after the first
frame showing the one before: even a 4-frame video shows three events, in order.

Unambiguity rules, so the facts can be checked from pixels and from text:
- every object has its own shape, and its own colour(s): no two objects ever share a colour,
  so "the red circle" names one object for the whole video;
- a move covers at least `SceneConfig.min_travel` of the frame's shorter side, and an object
  never moves the same direction twice;
- objects never touch or overlap, except the two objects of a collision, whose shapes overlap
  by a sliver at the moment of contact (computed from the shapes' real outlines) and stay
  there;
- objects that collide do not move before or after the collision; a colour change picks a
  colour no object has used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from sparrow.reference.synthetic.shapes import _contact_distance
from sparrow.reference.synthetic.vocabulary import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOUR_NAMES,
    DIRECTIONS,
    EVENT_KINDS,
    SHAPES,
    SIZES,
)

# Seeds from here on are for evaluation only: the reference target never trains on them.
EVAL_SEED_START = 1_000_000

_EVENT_WEIGHTS = MappingProxyType(
    {"move": 3.0, "enter": 1.5, "leave": 1.5, "change_colour": 2.0, "collide": 1.5}
)
_MARGIN = 0.02  # min distance (shorter-side units) between an object's box and the frame edge
_CLEARANCE = 0.05  # min gap between the boxes of two objects that do not collide
_CONTACT_OVERLAP = 0.04  # colliding shapes overlap by this fraction of (r_a + r_b)
_MAX_MOVES_PER_OBJECT = 2
_PLAN_ATTEMPTS = 400
_ATTEMPTS_PER_COUNT = 100
_LAYOUT_TRIES = 25


# ---------------------------------------------------------------------------------------------
# The scene model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneConfig:
    """What `generate_scene` may draw. Distances are in units of the frame's shorter side."""

    min_objects: int = 2
    max_objects: int = 4
    min_events: int = 1
    max_events: int = 3
    event_kinds: tuple[str, ...] = EVENT_KINDS
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    sizes: tuple[str, ...] = tuple(SIZES)
    min_travel: float = 0.3
    max_travel: float = 0.55

    @classmethod
    def preset(cls, difficulty: str) -> SceneConfig:
        """`easy` (1-2 objects, 1-2 events), `medium` (the default) or `hard` (3-5 objects,
        2-4 events; needs at least 5 frames to show every event apart)."""
        presets = {
            "easy": cls(min_objects=1, max_objects=2, min_events=1, max_events=2),
            "medium": cls(),
            "hard": cls(min_objects=3, max_objects=5, min_events=2, max_events=4),
        }
        if difficulty not in presets:
            raise ValueError(f"unknown difficulty {difficulty!r}; use one of {sorted(presets)}")
        return presets[difficulty]

    @classmethod
    def from_dict(cls, data: dict) -> SceneConfig:
        """The inverse of `dataclasses.asdict` (as stored in `VideoFacts.config`)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def validate(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(SHAPES):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(SHAPES)} (one shape per object), "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if not 1 <= self.min_events <= self.max_events:
            raise ValueError(f"need 1 <= min_events <= max_events, got {self.min_events}..{self.max_events}")
        for name, values, allowed in (
            ("event_kinds", self.event_kinds, EVENT_KINDS),
            ("backgrounds", self.backgrounds, BACKGROUND_KINDS),
            ("sizes", self.sizes, tuple(SIZES)),
        ):
            if not values or any(value not in allowed for value in values):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {values}")
        if not 0 < self.min_travel <= self.max_travel:
            raise ValueError(f"need 0 < min_travel <= max_travel, got {self.min_travel}, {self.max_travel}")


@dataclass(frozen=True)
class ObjectSpec:
    id: int
    shape: str  # one of SHAPES, unique within a scene
    colour: str  # initial colour, one of COLOURS
    size: str  # one of SIZES


@dataclass(frozen=True)
class Background:
    kind: str  # one of BACKGROUND_KINDS
    colours: tuple[str, ...]  # BACKGROUND_COLOURS names: one (plain, noise) or two (gradient, stripes)
    orientation: str  # "horizontal", "vertical" or "diagonal" for gradient/stripes, else ""
    seed: int  # seeds the noise texture


@dataclass(frozen=True)
class Event:
    """One thing that happens. Times are normalized (0 = first frame, 1 = last frame); `frame`
    is the first frame at or after `time`, i.e. the first frame that shows the change (for a
    move or a collision: `frame` is the first frame at or after the motion starts and
    `end_frame` the first that shows it finished). A collision lists the object coming from the
    left first: it moves right, the other moves left."""

    kind: str  # one of EVENT_KINDS
    object_ids: tuple[int, ...]
    time: float
    end_time: float
    frame: int
    end_frame: int
    seconds: float
    end_seconds: float
    direction: str | None = None  # move
    from_colour: str | None = None  # change_colour
    to_colour: str | None = None  # change_colour


@dataclass(frozen=True)
class Track:
    """An object's path in normalized time: positions (in units of the frame's shorter side,
    origin top-left, y down) interpolate linearly between keyframes."""

    keyframes: tuple[tuple[float, float, float], ...]  # (t, x, y), t increasing, first at t = 0
    appear: float  # visible from this time on (0.0: from the start)
    vanish: float | None  # invisible from this time on (None: until the end)
    colours: tuple[tuple[float, str], ...]  # (t from which it applies, colour), first at t = 0


@dataclass
class Scene:
    """A generated scene at a given frame count and resolution, with per-frame object states."""

    seed: int
    width: int
    height: int
    num_frames: int
    fps: float
    config: SceneConfig
    background: Background
    objects: list[ObjectSpec]
    tracks: list[Track]
    events: list[Event]  # in time order, one per phase
    positions: np.ndarray  # (T, N, 2) float32 pixel centre (x, y) of each object
    colour_ids: np.ndarray  # (T, N) int64 index into COLOUR_NAMES
    visible: np.ndarray  # (T, N) bool

    @property
    def radii(self) -> np.ndarray:
        """(N,) float64 half-extent of each object in pixels."""
        return np.array([SIZES[obj.size] * min(self.width, self.height) for obj in self.objects])


# ---------------------------------------------------------------------------------------------
# Drawing a scene
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """An event before layout: what happens to whom (directions and positions come later)."""

    kind: str
    object_ids: tuple[int, ...]
    colour: str | None = None  # the new colour of a change_colour


def generate_scene(
    seed: int,
    num_frames: int,
    width: int = 128,
    height: int = 128,
    fps: float = 8.0,
    config: SceneConfig | None = None,
) -> Scene:
    """Draw the scene for `seed` and compute its per-frame states at `num_frames` frames.

    The story (objects, events, paths in normalized time) depends only on `seed`, `config` and
    the aspect ratio, so the same seed at any length or resolution with the same aspect shows
    the same video; `num_frames`, `width`, `height` and `fps` only choose how it is sampled.
    """
    config = config or SceneConfig()
    config.validate()
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2, got {num_frames}")
    if min(width, height) < 16:
        raise ValueError(f"width and height must be at least 16 pixels, got {width}x{height}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rng = np.random.default_rng(seed)
    aspect = (width / min(width, height), height / min(width, height))
    background = _draw_background(rng, config)
    objects, steps, tracks = _plan(rng, config, aspect)
    return _realize(seed, num_frames, width, height, fps, config, background, objects, steps, tracks)


def _draw_background(rng: np.random.Generator, config: SceneConfig) -> Background:
    kind = str(rng.choice(config.backgrounds))
    names = list(BACKGROUND_COLOURS)
    count = 2 if kind in ("gradient", "stripes") else 1
    colours = tuple(str(name) for name in rng.choice(names, size=count, replace=False))
    orientation = str(rng.choice(["horizontal", "vertical", "diagonal"])) if count == 2 else ""
    return Background(kind, colours, orientation, int(rng.integers(2**31)))


def _plan(
    rng: np.random.Generator, config: SceneConfig, aspect: tuple[float, float]
) -> tuple[list[ObjectSpec], list[_Step], list[Track]]:
    """Rejection sampling: draw objects and a story, then try layouts until one keeps every
    rule in the module docstring. The numbers of objects and events are kept for
    `_ATTEMPTS_PER_COUNT` attempts, so crowded scenes are not rejected in favour of sparse ones
    more than they must be."""
    for attempt in range(_PLAN_ATTEMPTS):
        if attempt % _ATTEMPTS_PER_COUNT == 0:
            num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
            num_events = int(rng.integers(config.min_events, config.max_events + 1))
        objects = _draw_objects(rng, config, num_objects)
        steps = _draw_steps(rng, config, objects, num_events)
        if steps is None:
            continue
        for _ in range(_LAYOUT_TRIES):
            tracks = _layout(rng, config, aspect, objects, steps)
            if tracks is not None:
                return objects, steps, tracks
    raise RuntimeError(
        f"could not lay out a scene with {config}; allow fewer or smaller objects, or fewer events"
    )


def _draw_objects(rng: np.random.Generator, config: SceneConfig, count: int) -> list[ObjectSpec]:
    shapes = rng.choice(SHAPES, size=count, replace=False)
    colours = rng.choice(COLOUR_NAMES, size=count, replace=False)
    sizes = rng.choice(config.sizes, size=count)
    return [ObjectSpec(i, str(shapes[i]), str(colours[i]), str(sizes[i])) for i in range(count)]


def _draw_steps(
    rng: np.random.Generator, config: SceneConfig, objects: list[ObjectSpec], num_events: int
) -> list[_Step] | None:
    """The story: one step per phase, each chosen among the kinds possible at that point.

    Every object starts on stage; choosing `enter` for an object not used by an earlier step
    takes it off stage until then, which is allowed when at least one other object was on stage
    at every earlier phase. Returns None when the drawn story cannot continue.
    """
    ids = [obj.id for obj in objects]
    on_stage = set(ids)
    counts_so_far: list[int] = []  # objects on stage during each earlier phase
    used: set[int] = set()  # objects some earlier step involved
    moves = dict.fromkeys(ids, 0)
    collided: set[int] = set()
    changed: set[int] = set()
    spare_colours = [c for c in COLOUR_NAMES if c not in {obj.colour for obj in objects}]
    steps: list[_Step] = []
    for _ in range(num_events):
        counts_so_far.append(len(on_stage))
        candidates: dict[str, list[tuple[int, ...]]] = {
            "move": [
                (i,)
                for i in ids
                if i in on_stage and i not in collided and moves[i] < _MAX_MOVES_PER_OBJECT
            ],
            "enter": [(i,) for i in ids if i not in used and min(counts_so_far) >= 2],
            "leave": [(i,) for i in ids if i in on_stage and len(on_stage) >= 2],
            "change_colour": [(i,) for i in ids if i in on_stage and i not in changed and spare_colours],
            "collide": [
                (a, b)
                for a in ids
                for b in ids
                if a < b and {a, b} <= on_stage and not {a, b} & collided and moves[a] == moves[b] == 0
            ],
        }
        kinds = [kind for kind in config.event_kinds if candidates[kind]]
        if not kinds:
            return None
        weights = np.array([_EVENT_WEIGHTS[kind] for kind in kinds])
        kind = str(rng.choice(kinds, p=weights / weights.sum()))
        pick = candidates[kind][int(rng.integers(len(candidates[kind])))]
        colour = None
        if kind == "move":
            moves[pick[0]] += 1
        elif kind == "enter":
            counts_so_far = [count - 1 for count in counts_so_far]  # it was off stage until now
        elif kind == "leave":
            on_stage.discard(pick[0])
        elif kind == "change_colour":
            colour = str(spare_colours.pop(int(rng.integers(len(spare_colours)))))
            changed.add(pick[0])
        elif kind == "collide":
            collided.update(pick)
        used.update(pick)
        steps.append(_Step(kind, pick, colour))
    return steps


def _phase_times(phase: int, num_phases: int) -> tuple[float, float, float]:
    """(begin, contact, finish) of a phase in normalized time: every event begins at `begin`
    (instantaneous ones happen there), a collision touches at `contact`, a move ends at
    `finish`."""
    start = phase / num_phases
    return start + 0.2 / num_phases, start + 0.6 / num_phases, start + 0.9 / num_phases


class _Bounds(NamedTuple):
    """Where each object's centre may go (shorter-side units) so that its box keeps `_MARGIN`
    from the frame's edges: x in [low, high_x], y in [low, high_y]; one entry per object."""

    low: list[float]
    high_x: list[float]
    high_y: list[float]


def _layout(
    rng: np.random.Generator,
    config: SceneConfig,
    aspect: tuple[float, float],
    objects: list[ObjectSpec],
    steps: list[_Step],
) -> list[Track] | None:
    """Place the objects and turn the steps into tracks; None when a rule is broken."""
    frame_w, frame_h = aspect
    radius = [SIZES[obj.size] for obj in objects]
    bounds = _Bounds(
        low=[r + _MARGIN for r in radius],
        high_x=[frame_w - r - _MARGIN for r in radius],
        high_y=[frame_h - r - _MARGIN for r in radius],
    )
    low, high_x, high_y = bounds
    anchor = [[rng.uniform(low[i], high_x[i]), rng.uniform(low[i], high_y[i])] for i in range(len(objects))]
    approach = _place_collisions(rng, config, objects, steps, radius, bounds, anchor)
    if approach is None:
        return None

    keyframes: list[list[tuple[float, float, float]]] = [[(0.0, x, y)] for x, y in anchor]
    appear = [0.0] * len(objects)
    vanish: list[float | None] = [None] * len(objects)
    colours: list[list[tuple[float, str]]] = [[(0.0, obj.colour)] for obj in objects]
    used_directions: list[set[str]] = [set() for _ in objects]
    contact_pairs: list[tuple[int, int, float]] = []  # pairs allowed to touch from this time on
    for phase, step in enumerate(steps):
        begin, contact, finish = _phase_times(phase, len(steps))
        if step.kind == "move":
            i = step.object_ids[0]
            _, x, y = keyframes[i][-1]
            move = _draw_move(rng, config, bounds, i, x, y, used_directions[i])
            if move is None:
                return None
            direction, distance = move
            dx, dy = _unit(direction)
            keyframes[i] += [(begin, x, y), (finish, x + dx * distance, y + dy * distance)]
            used_directions[i].add(direction)
        elif step.kind == "enter":
            appear[step.object_ids[0]] = begin
        elif step.kind == "leave":
            vanish[step.object_ids[0]] = begin
        elif step.kind == "change_colour":
            colours[step.object_ids[0]].append((begin, step.colour))
        elif step.kind == "collide":
            for i in step.object_ids:
                _, x, y = keyframes[i][-1]
                keyframes[i] += [(begin, x, y), (contact, x + approach[i], y)]
            contact_pairs.append((*step.object_ids, begin))

    tracks = [
        Track(tuple(keyframes[i]), appear[i], vanish[i], tuple(colours[i])) for i in range(len(objects))
    ]
    return tracks if _clear(tracks, radius, contact_pairs, len(steps)) else None


def _place_collisions(
    rng: np.random.Generator,
    config: SceneConfig,
    objects: list[ObjectSpec],
    steps: list[_Step],
    radius: list[float],
    bounds: _Bounds,
    anchor: list[list[float]],
) -> dict[int, float] | None:
    """Put collision partners on one row, far enough apart for a visible approach, by moving
    their `anchor` (start positions) in place. Returns, per colliding object id, the signed
    distance it travels towards its partner (positive: to the right); None when a pair does not
    fit in the frame."""
    low, high_x, high_y = bounds
    approach: dict[int, float] = {}
    for step in steps:
        if step.kind != "collide":
            continue
        a, b = (int(i) for i in rng.permutation(step.object_ids))  # a comes from the left
        contact = _contact_distance(objects[a].shape, radius[a], objects[b].shape, radius[b])
        contact -= _CONTACT_OVERLAP * (radius[a] + radius[b])
        travel_a, travel_b = rng.uniform(config.min_travel / 2, config.min_travel, size=2)
        span = travel_a + contact + travel_b
        x_lo, x_hi = low[a], high_x[b] - span
        y_lo, y_hi = max(low[a], low[b]), min(high_y[a], high_y[b])
        if x_lo > x_hi or y_lo > y_hi:
            return None
        x_a, y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
        anchor[a], anchor[b] = [x_a, y], [x_a + span, y]
        approach[a], approach[b] = travel_a, -travel_b
    return approach


def _draw_move(
    rng: np.random.Generator,
    config: SceneConfig,
    bounds: _Bounds,
    i: int,
    x: float,
    y: float,
    used_directions: set[str],
) -> tuple[str, float] | None:
    """A (direction, distance) for object `i` at (x, y): a direction it has not moved yet with
    room for at least `min_travel`, and a distance of at least that; None when there is none."""
    room = {"left": x - bounds.low[i], "right": bounds.high_x[i] - x,
            "up": y - bounds.low[i], "down": bounds.high_y[i] - y}  # fmt: skip
    feasible = [d for d in DIRECTIONS if room[d] >= config.min_travel and d not in used_directions]
    if not feasible:
        return None
    direction = str(rng.choice(feasible))
    return direction, rng.uniform(config.min_travel, min(room[direction], config.max_travel))


def _clear(
    tracks: list[Track], radius: list[float], contact_pairs: list[tuple[int, int, float]], num_phases: int
) -> bool:
    """Whether the boxes of every two visible objects keep `_CLEARANCE` apart at all times
    (sampled densely), except collision partners once their approach has begun."""
    times = np.linspace(0.0, 1.0, 40 * num_phases + 1)  # (K,)
    positions = np.stack([_positions(track, times) for track in tracks], axis=1)  # (K, N, 2)
    visible = np.stack([_visible(track, times) for track in tracks], axis=1)  # (K, N)
    r = np.asarray(radius)
    for i in range(len(tracks)):
        for j in range(i + 1, len(tracks)):
            gap = np.abs(positions[:, i] - positions[:, j]) - (r[i] + r[j])  # (K, 2)
            apart = gap.max(axis=1) >= _CLEARANCE  # (K,)
            exempt = np.zeros_like(apart)
            for a, b, since in contact_pairs:
                if {a, b} == {i, j}:
                    exempt |= times >= since
            if np.any(visible[:, i] & visible[:, j] & ~apart & ~exempt):
                return False
    return True


def _unit(direction: str) -> tuple[float, float]:
    return {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}[direction]


def _positions(track: Track, times: np.ndarray) -> np.ndarray:
    """(K, 2) position of a track at normalized `times` (K,)."""
    t, x, y = (np.array(column) for column in zip(*track.keyframes, strict=True))
    return np.stack([np.interp(times, t, x), np.interp(times, t, y)], axis=1)


def _visible(track: Track, times: np.ndarray) -> np.ndarray:
    """(K,) bool: whether a track is visible at normalized `times` (K,)."""
    shown = times >= track.appear
    if track.vanish is not None:
        shown &= times < track.vanish
    return shown


def _first_frame_at(time: float, num_frames: int) -> int:
    """The first frame whose normalized time k / (T - 1) is at or after `time`."""
    return int(math.ceil(time * (num_frames - 1) - 1e-9))


def _realize(
    seed: int,
    num_frames: int,
    width: int,
    height: int,
    fps: float,
    config: SceneConfig,
    background: Background,
    objects: list[ObjectSpec],
    steps: list[_Step],
    tracks: list[Track],
) -> Scene:
    """Sample the tracks at the frame times and attach frame numbers and seconds to events."""
    positions, visible, colour_ids = _frame_states(tracks, num_frames, min(width, height))
    events = [
        _timed_event(step, phase, len(steps), tracks, num_frames, fps) for phase, step in enumerate(steps)
    ]
    return Scene(
        seed=seed,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=float(fps),
        config=config,
        background=background,
        objects=objects,
        tracks=tracks,
        events=events,
        positions=positions,
        colour_ids=colour_ids,
        visible=visible,
    )


def _frame_states(
    tracks: list[Track], num_frames: int, scale: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every object's state at every frame: (T, N, 2) float32 pixel centres (`scale` pixels per
    shorter-side unit), (T, N) bool visibility and (T, N) int64 index into COLOUR_NAMES."""
    frames = np.arange(num_frames)  # (T,)
    times = frames / (num_frames - 1)  # (T,)
    positions = np.stack([_positions(track, times) for track in tracks], axis=1) * scale  # (T, N, 2)
    visible = np.zeros((num_frames, len(tracks)), dtype=bool)  # (T, N)
    colour_ids = np.zeros((num_frames, len(tracks)), dtype=np.int64)  # (T, N)
    for i, track in enumerate(tracks):
        # Frame-index comparisons (not float times) so states and event frames always agree.
        visible[:, i] = frames >= _first_frame_at(track.appear, num_frames)
        if track.vanish is not None:
            visible[:, i] &= frames < _first_frame_at(track.vanish, num_frames)
        for since, colour in track.colours:
            colour_ids[frames >= _first_frame_at(since, num_frames), i] = COLOUR_NAMES.index(colour)
    return positions.astype(np.float32), visible, colour_ids


def _timed_event(
    step: _Step, phase: int, num_phases: int, tracks: list[Track], num_frames: int, fps: float
) -> Event:
    """The event of `step`, told in phase `phase`: its times, frames, seconds, and what the
    tracks say about it (a move's direction, the colour before a change)."""
    begin, contact, finish = _phase_times(phase, num_phases)
    start, end = {"move": (begin, finish), "collide": (begin, contact)}.get(step.kind, (begin, begin))
    direction = from_colour = None
    object_ids = step.object_ids
    if step.kind == "move":
        track = tracks[object_ids[0]]
        (x0, y0), (x1, y1) = _positions(track, np.array([start, end]))
        direction = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else (
            "down" if y1 > y0 else "up"
        )
    elif step.kind == "change_colour":
        from_colour = _colour_before(tracks[object_ids[0]], begin)
    elif step.kind == "collide":  # the object coming from the left first
        object_ids = tuple(sorted(object_ids, key=lambda i: tracks[i].keyframes[0][1]))
    return Event(
        kind=step.kind,
        object_ids=tuple(int(i) for i in object_ids),
        time=start,
        end_time=end,
        frame=_first_frame_at(start, num_frames),
        end_frame=_first_frame_at(end, num_frames),
        seconds=start * (num_frames - 1) / fps,
        end_seconds=end * (num_frames - 1) / fps,
        direction=direction,
        from_colour=from_colour,
        to_colour=step.colour,
    )


def _colour_before(track: Track, time: float) -> str:
    return [colour for since, colour in track.colours if since < time][-1]
