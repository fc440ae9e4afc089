"""The synthetic video generator: determinism, pixels that agree with the facts, any length,
mp4 round trips, and the language side (descriptions, questions, the key-fact score)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sparrow.reference.synthetic import (
    COLOUR_NAMES,
    COLOURS,
    NUM_STYLES,
    SHAPES,
    SceneConfig,
    describe,
    generate_corpus,
    generate_scene,
    key_facts,
    load_facts,
    questions,
    render_frames,
    save_facts,
    scene_facts,
    score_description,
    shape_mask,
    write_scene,
)
from sparrow.video.io import read_video

SEEDS = range(40)


def _masks(scene, t: int) -> list[np.ndarray]:
    """(H, W) bool mask of every object at frame t (empty when invisible)."""
    masks = []
    for i, obj in enumerate(scene.objects):
        mask = np.zeros((scene.height, scene.width), dtype=bool)
        if scene.visible[t, i]:
            cx, cy = scene.positions[t, i]
            mask = shape_mask(obj.shape, float(cx), float(cy), scene.radii[i], scene.height, scene.width)
        masks.append(mask)
    return masks


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One-pixel 8-neighbour dilation."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _colour_name(scene, t: int, i: int) -> str:
    return COLOUR_NAMES[scene.colour_ids[t, i]]


def test_same_seed_gives_identical_frames_and_facts():
    first, second = generate_scene(7, 12, 64, 48), generate_scene(7, 12, 64, 48)
    assert np.array_equal(render_frames(first), render_frames(second))
    assert scene_facts(first) == scene_facts(second)


def test_different_seeds_give_different_videos():
    facts = [scene_facts(generate_scene(seed, 8, 48, 48)) for seed in range(10)]
    stories = {(f.objects, tuple((e.kind, e.object_ids) for e in f.events)) for f in facts}
    assert len(stories) == 10
    assert not np.array_equal(
        render_frames(generate_scene(0, 8, 48, 48)), render_frames(generate_scene(1, 8, 48, 48))
    )


def test_the_story_is_the_same_at_every_length():
    def story(num_frames: int):
        facts = scene_facts(generate_scene(11, num_frames, 64, 64))
        events = [
            (e.kind, e.object_ids, e.direction, e.from_colour, e.to_colour, e.time) for e in facts.events
        ]
        return facts.objects, events, facts.count_start, facts.count_end, facts.background

    assert story(4) == story(16) == story(200)


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_pixels_show_each_object_in_its_colour_at_its_position(seed):
    scene = generate_scene(seed, 24, 64, 64)
    frames = render_frames(scene)
    for t in range(scene.num_frames):
        masks = _masks(scene, t)
        for i in range(len(scene.objects)):
            colour = np.array(COLOURS[_colour_name(scene, t, i)], dtype=np.uint8)
            if scene.visible[t, i]:
                unoccluded = masks[i] & ~np.any(masks[i + 1 :], axis=0) if i + 1 < len(masks) else masks[i]
                assert unoccluded.sum() >= 0.8 * masks[i].sum() > 0
                assert np.all(frames[t][unoccluded] == colour)
            else:  # colours are unique to their object: an invisible object's colour is absent
                for name in scene_facts(scene).objects[i].colours:
                    assert not np.any(np.all(frames[t] == np.array(COLOURS[name], dtype=np.uint8), axis=-1))


def test_counts_match_visible_objects():
    for seed in SEEDS:
        scene = generate_scene(seed, 20, 48, 48)
        facts = scene_facts(scene)
        counts = scene.visible.sum(axis=1)
        assert (facts.count_start, facts.count_end) == (counts[0], counts[-1])
        for change in facts.counts:
            assert counts[change.frame] == change.count
        assert counts.min() >= 1


def test_events_agree_with_the_per_frame_states():
    min_travel = SceneConfig().min_travel
    for seed in SEEDS:
        scene = generate_scene(seed, 64, 96, 64)
        for event in scene.events:
            i = event.object_ids[0]
            before, after = event.frame - 1, event.end_frame
            if event.kind == "move":
                axis = 0 if event.direction in ("left", "right") else 1
                sign = 1 if event.direction in ("right", "down") else -1
                path = sign * scene.positions[before : after + 1, i, axis]
                assert np.all(np.diff(path) >= 0)
                assert path[-1] - path[0] >= min_travel * min(scene.width, scene.height) - 1e-3
                assert np.allclose(scene.positions[before, i, 1 - axis], scene.positions[after, i, 1 - axis])
            elif event.kind == "enter":
                assert not scene.visible[: event.frame, i].any() and scene.visible[event.frame, i]
            elif event.kind == "leave":
                assert scene.visible[before, i] and not scene.visible[event.frame :, i].any()
            elif event.kind == "change_colour":
                assert _colour_name(scene, before, i) == event.from_colour
                assert _colour_name(scene, event.frame, i) == event.to_colour
            elif event.kind == "collide":
                left, right = event.object_ids
                assert scene.positions[after, left, 0] > scene.positions[before, left, 0]  # moved right
                assert scene.positions[after, right, 0] < scene.positions[before, right, 0]  # moved left
                start_masks, end_masks = _masks(scene, before), _masks(scene, after)
                assert not (_dilate(start_masks[left]) & start_masks[right]).any()
                assert (_dilate(end_masks[left]) & end_masks[right]).any()  # they really meet


def test_only_colliding_objects_ever_touch():
    for seed in SEEDS:
        scene = generate_scene(seed, 48, 64, 64)
        colliding = {frozenset(e.object_ids) for e in scene.events if e.kind == "collide"}
        for t in range(scene.num_frames):
            masks = _masks(scene, t)
            for i in range(len(masks)):
                for j in range(i + 1, len(masks)):
                    if frozenset((i, j)) not in colliding:
                        assert not (_dilate(masks[i]) & masks[j]).any(), (seed, t, i, j)


@pytest.mark.parametrize("num_frames", [4, 5, 7, 10])
def test_short_videos_show_every_event_in_order(num_frames):
    """With num_frames >= events + 1, each event shows a change, and starts showing on a later
    frame than the event before it."""
    for seed in SEEDS:
        scene = generate_scene(seed, num_frames, 64, 64)
        assert len(scene.events) <= num_frames - 1
        first_frames = [event.frame for event in scene.events]
        assert first_frames == sorted(set(first_frames)) and first_frames[0] >= 1
        for event in scene.events:
            i = event.object_ids[0]
            state = (scene.positions[:, i], scene.visible[:, i], scene.colour_ids[:, i])
            assert any(not np.array_equal(s[event.frame - 1], s[event.end_frame]) for s in state)


@pytest.mark.parametrize("num_frames", [4, 16, 200])
def test_any_length_round_trips_through_mp4(tmp_path, num_frames):
    scene = generate_scene(5, num_frames, 48, 32)
    frames = render_frames(scene)
    assert frames.shape == (num_frames, 32, 48, 3) and frames.dtype == np.uint8
    path = write_scene(scene, tmp_path / "clip.mp4")
    clip = read_video(path)
    assert clip.num_frames == num_frames
    assert clip.fps == pytest.approx(scene.fps)
    assert np.abs(clip.frames.astype(int) - frames.astype(int)).mean() < 12


def test_facts_round_trip_through_json(tmp_path):
    scene = generate_scene(3, 10, 64, 64)
    path = save_facts(scene, tmp_path / "facts" / "3.json")
    facts = load_facts(path)
    assert facts == scene_facts(scene)
    config = SceneConfig.from_dict(facts.config)
    assert config == scene.config
    again = generate_scene(facts.seed, facts.num_frames, facts.width, facts.height, facts.fps, config)
    assert np.array_equal(render_frames(again), render_frames(scene))


def test_generate_corpus_writes_pairs_and_resumes(tmp_path):
    videos = generate_corpus(tmp_path, range(3), num_frames=6, width=32, height=32, progress=False)
    assert [v.name for v in videos] == ["0.mp4", "1.mp4", "2.mp4"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["0.json", "0.mp4", "1.json", "1.mp4", "2.json", "2.mp4"]
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    (tmp_path / "1.json").unlink()
    generate_corpus(tmp_path, range(3), num_frames=6, width=32, height=32, progress=False)
    assert (tmp_path / "1.json").is_file()
    for name in ("0.mp4", "0.json", "2.mp4", "2.json"):
        assert (tmp_path / name).stat().st_mtime_ns == stamps[name]
    assert load_facts(tmp_path / "1.json") == scene_facts(generate_scene(1, 6, 32, 32))


def test_descriptions_name_every_object_and_differ_across_styles():
    for seed in range(20):
        facts = scene_facts(generate_scene(seed, 16, 64, 64))
        texts = [describe(facts, style) for style in range(NUM_STYLES)]
        assert len(set(texts)) == NUM_STYLES
        for text in texts:
            for obj in facts.objects:
                assert re.search(rf"\b{obj.size} {obj.colour} {obj.shape}\b", text), (text, obj)
        if len(facts.events) == 3:
            assert all(word in texts[0] for word in ("During the video", "Then", "Next"))


def test_the_words_before_the_first_event_do_not_depend_on_how_many_events_follow():
    """A describer trained on these texts need not decide how many events it saw before telling
    the first one (one that opens with a many-event form invents the events it promises)."""
    from sparrow.reference.synthetic.language import _event_clause

    openers: dict[int, dict[int, set[str]]] = {}
    for seed in range(60):
        facts = scene_facts(generate_scene(seed, 16, 64, 64))
        if not facts.events:
            continue
        for style in range(NUM_STYLES):
            text = describe(facts, style)
            clause = _event_clause(facts, 0, style)
            at = text.lower().index(clause.lower())
            sentence_start = text.rfind(". ", 0, at)
            opener = text[sentence_start + 2 if sentence_start >= 0 else 0:at]
            openers.setdefault(style, {}).setdefault(len(facts.events), set()).add(opener)
    for style, by_count in openers.items():
        assert set(by_count) == {1, 2, 3}, (style, by_count)
        assert len(set().union(*by_count.values())) == 1, (style, by_count)


def test_reference_descriptions_score_full_marks():
    for seed in range(60):
        config = SceneConfig.preset("hard" if seed % 2 else "medium")
        facts = scene_facts(generate_scene(seed, 16, 64, 64, config=config))
        for style in range(NUM_STYLES):
            result = score_description(describe(facts, style), facts)
            assert result["score"] == 1.0, (seed, style, [f for f in result["facts"] if not f[1]])
            assert result["total"] == len(key_facts(facts))


def test_other_videos_and_generic_text_score_low():
    generic = "The video shows some colourful shapes moving around on a background. One of them changes."
    other_scores = []
    for seed in range(40):
        facts = scene_facts(generate_scene(seed, 16, 64, 64))
        other = scene_facts(generate_scene(seed + 1000, 16, 64, 64))
        other_scores.append(score_description(describe(other, seed), facts)["score"])
        assert score_description(generic, facts)["score"] == 0.0
        assert score_description("", facts)["score"] == 0.0
    assert np.mean(other_scores) < 0.15 and max(other_scores) < 0.5


def _replace_words(text: str, replacements: dict[str, str]) -> str:
    return re.sub(r"[a-z]+", lambda match: replacements.get(match.group(0), match.group(0)), text)


def test_wrong_colours_score_low():
    for seed in range(30):
        facts = scene_facts(generate_scene(seed, 16, 64, 64))
        unused = [c for c in COLOUR_NAMES if all(c not in obj.colours for obj in facts.objects)]
        swap = {c: unused[k % len(unused)] for k, c in enumerate(COLOUR_NAMES)}
        text = _replace_words(describe(facts, seed), swap)
        result = score_description(text, facts)
        assert result["by_kind"]["object"][0] == 0
        assert result["score"] < 0.35, (text, result)


def test_invented_objects_and_events_lower_the_score():
    facts = scene_facts(generate_scene(2, 16, 64, 64))
    text = describe(facts, 0)
    absent = next(shape for shape in SHAPES if shape not in {o.shape for o in facts.objects})
    result = score_description(text + f" A small red {absent} also appears.", facts)
    assert result["hallucinated"] >= 1 and result["score"] < 1.0
    assert result["invented_events"] == 0  # an invented shape, not an event of a real object
    # Saying a real object collides when nothing collides is a hallucination too, and an event.
    first, second = facts.objects[0], facts.objects[1]
    assert not any(e.kind == "collide" for e in facts.events)
    claim = f" The {first.colour} {first.shape} hits the {second.colour} {second.shape}."
    result = score_description(text + claim, facts)
    assert result["hallucinated"] == result["invented_events"] == 1
    # So is an exit of an object that stays.
    leaving = {e.object_ids[0] for e in facts.events if e.kind == "leave"}
    stays = next(o for o in facts.objects if o.id not in leaving)
    result = score_description(text + f" The {stays.colour} {stays.shape} leaves.", facts)
    assert result["hallucinated"] == result["invented_events"] == 1


def test_score_reads_paraphrases():
    """Free-form wording the metric is documented to read."""
    config = SceneConfig(min_objects=1, max_objects=1, max_events=1, event_kinds=("move",))
    scene = generate_scene(0, 16, 64, 64, config=config)
    facts = scene_facts(scene)
    obj, event = facts.objects[0], facts.events[0]
    text = (
        f"There's only one object in this clip, a {obj.size}-sized {obj.colour} {obj.shape}. "
        f"It moves {event.direction}wards. Only one is left at the end. "
    )
    result = score_description(text, facts)
    assert result["by_kind"]["object"] == [1, 1] and result["by_kind"]["size"] == [1, 1]
    assert result["by_kind"]["motion"] == [1, 1]
    assert result["by_kind"]["count_start"] == [1, 1] and result["by_kind"]["count_end"] == [1, 1]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[event.direction]
    wrong = score_description(text.replace(f"{event.direction}wards", f"{opposite}wards"), facts)
    assert wrong["by_kind"]["motion"] == [0, 1]


def test_questions_are_answered_from_the_facts():
    facts = scene_facts(generate_scene(4, 16, 64, 64))
    answers = dict(questions(facts))
    assert answers["How many objects are visible at the start of the video?"] == [
        "zero", "one", "two", "three", "four", "five", "six"
    ][facts.count_start]  # fmt: skip
    for obj in facts.objects:
        assert answers[f"What shape is the {obj.colour} object?"] == obj.shape
        assert answers[f"What size is the {obj.colour} {obj.shape}?"] == obj.size
        assert answers[f"What colour is the {obj.shape}?"].startswith(obj.colour)
        start = answers.get(f"Where is the {obj.colour} {obj.shape} at the start of the video?")
        end = answers.get(f"Where is the {obj.colour} {obj.shape} at the end of the video?")
        assert start is None if not obj.visible_at_start else obj.start_region in start.lower()
        assert end is None if not obj.end_region else obj.end_region in end.lower()
    changed = any(e.kind == "change_colour" for e in facts.events)
    assert answers["Does any object change colour?"].startswith("Yes" if changed else "No")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_frames"):
        generate_scene(0, 1)
    with pytest.raises(ValueError, match="max_objects"):
        generate_scene(0, 8, config=SceneConfig(max_objects=7))
    with pytest.raises(ValueError, match="event_kinds"):
        generate_scene(0, 8, config=SceneConfig(event_kinds=("explode",)))
    with pytest.raises(ValueError, match="difficulty"):
        SceneConfig.preset("impossible")


def test_regions_do_not_depend_on_frame_count_and_are_described():
    from sparrow.reference.synthetic import region_of

    assert [region_of(0.1, 0.1), region_of(0.5, 0.5), region_of(0.9, 0.5), region_of(0.5, 0.9)] == [
        "top left", "middle", "right", "bottom"]
    for seed in range(10):
        short, long = (scene_facts(generate_scene(seed, n, 64, 48)) for n in (6, 64))
        assert [(o.start_region, o.move_regions, o.end_region) for o in short.objects] == [
            (o.start_region, o.move_regions, o.end_region) for o in long.objects]
        for obj in long.objects:
            assert obj.start_region and len(obj.move_regions) == sum(
                e.kind == "move" and e.object_ids[0] == obj.id for e in long.events)
            assert bool(obj.end_region) == obj.visible_at_end
        text = describe(long, 0)
        first = next(o for o in long.objects if o.visible_at_start)
        phrase = {"middle": "in the middle", "left": "on the left", "right": "on the right",
                  "top": "at the top", "bottom": "at the bottom"}.get(first.start_region,
                                                                     f"in the {first.start_region}")
        assert f"{first.size} {first.colour} {first.shape} {phrase}" in text, text
