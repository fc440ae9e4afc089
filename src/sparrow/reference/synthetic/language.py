"""Language: reference descriptions of a video (`describe`, in `NUM_STYLES` styles) and
question/answer pairs about it (`questions`), written from its ground truth (`VideoFacts`).

Every style states the same facts; the wording stays inside the lexicon that
`scoring.score_description` reads, so every reference description scores full marks."""

from __future__ import annotations

from sparrow.reference.synthetic.facts import ObjectFact, VideoFacts
from sparrow.reference.synthetic.vocabulary import COLOUR_NAMES, SHAPES

NUM_STYLES = 5  # reference description styles rendered by `describe`

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _number(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def _objects_phrase(n: int) -> str:
    return f"{_number(n)} object" + ("" if n == 1 else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _full_name(obj: ObjectFact, colour: str | None = None) -> str:
    """'a small red circle'."""
    return f"{_article(obj.size)} {obj.size} {colour or obj.colour} {obj.shape}"


def _colour_before_event(facts: VideoFacts, object_id: int, event_index: int) -> str:
    colour = facts.object(object_id).colour
    for event in facts.events[:event_index]:
        if event.kind == "change_colour" and event.object_ids[0] == object_id:
            colour = event.to_colour
    return colour


def _the(facts: VideoFacts, object_id: int, event_index: int) -> str:
    """'the red circle', with the colour the object has just before event `event_index`."""
    return f"the {_colour_before_event(facts, object_id, event_index)} {facts.object(object_id).shape}"


def _region_phrase(region: str) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the middle' ('' for no region)."""
    if not region:
        return ""
    if region == "middle":
        return "in the middle"
    if region in ("left", "right"):
        return f"on the {region}"
    if region in ("top", "bottom"):
        return f"at the {region}"
    return f"in the {region}"


def _placed(text: str, region: str) -> str:
    """`text` followed by where it is, when the facts know."""
    phrase = _region_phrase(region)
    return f"{text} {phrase}" if phrase else text


def _move_end(facts: VideoFacts, index: int, variant: int) -> str:
    """' and stops in the top right': where the mover of event `index` stops ('' if unknown)."""
    event = facts.events[index]
    obj = facts.object(event.object_ids[0])
    moves_before = sum(1 for e in facts.events[:index] if e.kind == "move" and e.object_ids[0] == obj.id)
    if moves_before >= len(obj.move_regions):
        return ""
    phrase = _region_phrase(obj.move_regions[moves_before])
    # No count words here ('ends' beside a list number reads as an object count).
    return [f" and stops {phrase}", f" until it is {phrase}", f" and settles {phrase}",
            f" and comes to rest {phrase}"][variant % 4]


def _end_sentence(facts: VideoFacts, style: int) -> str:
    """Where each object still in view is at the end, with its final colour ('' if none)."""
    final = [obj for obj in facts.objects if obj.visible_at_end and obj.end_region]
    if not final:
        return ""
    if style == 3:
        return "Final positions: " + "; ".join(
            f"the {obj.colours[-1]} {obj.shape} {_region_phrase(obj.end_region)}" for obj in final) + "."
    lead = ["At the end, ", "In the last frame, ", "When the video ends, ", "", "In the final frame, "][style]
    parts = _join([f"the {obj.colours[-1]} {obj.shape} is {_region_phrase(obj.end_region)}" for obj in final])
    return f"{lead}{parts}."


def _direction_phrase(direction: str, variant: int) -> str:
    horizontal = direction in ("left", "right")
    return [
        f"moves to the {direction}" if horizontal else f"moves {direction}",
        f"slides {direction}",
        f"travels to the {direction}" if horizontal else f"travels {direction}wards",
        f"moves {direction}",
    ][variant % 4]


def _event_clause(facts: VideoFacts, index: int, variant: int) -> str:
    """One event as a clause without final punctuation, e.g. 'the red circle moves to the left'."""
    event = facts.events[index]
    if event.kind == "move":
        return (f"{_the(facts, event.object_ids[0], index)} {_direction_phrase(event.direction, variant)}"
                f"{_move_end(facts, index, variant)}")
    if event.kind == "enter":
        obj = facts.object(event.object_ids[0])
        verb = ["enters the scene", "appears", "comes into view", "joins the scene"][variant % 4]
        return _placed(f"{_full_name(obj)} {verb}", obj.start_region)
    if event.kind == "leave":
        verb = ["leaves the scene", "disappears", "exits the frame", "vanishes"][variant % 4]
        return f"{_the(facts, event.object_ids[0], index)} {verb}"
    if event.kind == "change_colour":
        subject = _the(facts, event.object_ids[0], index)
        shape = facts.object(event.object_ids[0]).shape
        return [
            f"{subject} turns {event.to_colour}",
            f"{subject} changes colour to {event.to_colour}",
            f"{subject} becomes {event.to_colour}",
            f"the {shape} changes from {event.from_colour} to {event.to_colour}",
        ][variant % 4]
    if event.kind == "collide":
        left, right = (_the(facts, i, index) for i in event.object_ids)
        return [
            f"{left} and {right} move towards each other and collide",
            f"{left} moves to the right and hits {right}",
            f"{left} and {right} collide",
            f"{left} bumps into {right}",
        ][variant % 4]
    raise ValueError(f"unknown event kind {event.kind!r}")


def _ordinals(count: int, first: str, later: list[str]) -> list[str]:
    """Connectives for `count` events in order: `first`, then `later` in turn.

    Neither the first connective nor any other depends on how many events there are: a model
    that learns to describe from these texts must not have to decide how many events it saw
    before it tells the first one, for a describer that opens with a many-event form ('To begin
    with, ...') goes on to invent the events that form promises ('Lastly, ...'). Here the
    sentence after the events (still objects, counts) ends them, a choice made after the events
    told so far."""
    return [first, *(later[i % len(later)] for i in range(count - 1))][:count]


def _background_phrase(facts: VideoFacts) -> str:
    colours = facts.background_colours
    return {
        "plain": f"a plain {colours[0]} background",
        "gradient": f"a {colours[0]}-to-{colours[-1]} gradient background",
        "noise": f"a noisy {colours[0]} background",
        "stripes": f"a {colours[0]} and {colours[-1]} striped background",
    }[facts.background]


def _still_objects(facts: VideoFacts) -> list[ObjectFact]:
    return [obj for obj in facts.objects if not obj.motions]


def describe(facts: VideoFacts, style: int = 0) -> str:
    """A reference description of the video in one of `NUM_STYLES` styles (`style` is taken
    modulo NUM_STYLES). Every style names each object with size, colour, shape and where it is
    (thirds of the frame), tells the events in time order with connectives that do not depend
    on how many events there are (`_ordinals`) and where moving objects end up, says which
    objects stay still, where each object is at the end, and gives the object count at the
    start and at the end."""
    style %= NUM_STYLES
    start_objects = [obj for obj in facts.objects if obj.visible_at_start]
    names = _join([_placed(_full_name(obj), obj.start_region) for obj in start_objects])
    end = _end_sentence(facts, style)
    count = _objects_phrase(facts.count_start)
    count_end = _number(facts.count_end)
    background = _background_phrase(facts)
    still = _still_objects(facts)
    still_names = _join([f"the {obj.colour} {obj.shape}" for obj in still]) if still else ""
    plural = len(still) > 1
    clauses = [_event_clause(facts, i, style + i) for i in range(len(facts.events))]
    sentences: list[str] = []
    if style == 0:
        verb = "is" if facts.count_start == 1 else "are"
        sentences.append(f"At the start, there {verb} {count} on {background}: {names}.")
        ordinals = _ordinals(len(clauses), "During the video, ", ["Then, ", "Next, ", "After that, "])
        sentences += [f"{ordinal}{clause}." for ordinal, clause in zip(ordinals, clauses, strict=True)]
        if still:
            sentences.append(_capital(f"{still_names} {'stay' if plural else 'stays'} in place."))
        sentences.append(f"There {verb} {count} at the start and {count_end} at the end.")
    elif style == 1:
        verb = "sits" if facts.count_start == 1 else "sit"
        sentences.append(_capital(f"{names} {verb} on {background}."))
        ordinals = _ordinals(len(clauses), "", ["then ", "next "])
        sentences.append(_capital(", ".join(o + c for o, c in zip(ordinals, clauses, strict=True))) + ".")
        if still:
            sentences.append(_capital(f"{still_names} {'do' if plural else 'does'} not move."))
        sentences.append(f"The video begins with {count} and ends with {count_end}.")
    elif style == 2:
        sentences.append(f"This video shows {background}.")
        sentences.append(f"Initially you can see {count}: {names}.")
        first = "The first thing that happens is that "
        ordinals = _ordinals(len(clauses), first, ["After that, ", "Next, "])
        sentences += [f"{o}{c}." for o, c in zip(ordinals, clauses, strict=True)]
        if still:
            sentences.append(_capital(f"{still_names} {'remain' if plural else 'remains'} stationary."))
        visible = "is" if facts.count_start == 1 else "are"
        sentences.append(_capital(f"{count} {visible} visible at the beginning and {count_end} at the end."))
    elif style == 3:
        sentences.append(f"Scene: {background}.")
        sentences.append(f"Objects at the start: {names}.")
        numbered = "; ".join(f"{i + 1}) {clause}" for i, clause in enumerate(clauses))
        sentences.append(f"Events in order: {numbered}.")
        if still:
            sentences.append(f"Not moving: {still_names}.")
        sentences.append(f"Object count: {_number(facts.count_start)} at the start, {count_end} at the end.")
    else:
        sentences.append(f"The clip opens on {background} with {names}.")
        ordinals = _ordinals(len(clauses), "At some point, ", ["Afterwards, ", "Later, "])
        sentences += [f"{o}{c}." for o, c in zip(ordinals, clauses, strict=True)]
        if still:
            sentences.append(_capital(f"meanwhile {still_names} never {'move' if plural else 'moves'}."))
        verb = "is" if facts.count_end == 1 else "are"
        end_phrase = _objects_phrase(facts.count_end)
        sentences.append(
            f"By the end there {verb} {end_phrase} in view, compared with {_number(facts.count_start)} "
            "at the start."
        )
    if end:  # before the closing count sentence
        sentences.insert(len(sentences) - 1, end)
    return " ".join(sentences)


def questions(facts: VideoFacts) -> list[tuple[str, str]]:
    """Question/answer pairs about the video, answers short and exact."""
    pairs = [
        ("How many objects are visible at the start of the video?", _number(facts.count_start)),
        ("How many objects are visible at the end of the video?", _number(facts.count_end)),
        ("What does the background look like?", _capital(_background_phrase(facts)[2:]) + "."),
    ]
    for obj in facts.objects:
        name = f"{obj.colour} {obj.shape}"
        colour_answer = obj.colour
        if len(obj.colours) > 1:
            colour_answer += f", then it turns {obj.colours[-1]}"
        pairs += [
            (f"What colour is the {obj.shape}?", colour_answer),
            (f"What shape is the {obj.colour} object?", obj.shape),
            (f"What size is the {name}?", obj.size),
        ]
        for when, region in (("start", obj.start_region if obj.visible_at_start else ""),
                             ("end", obj.end_region)):
            if region:  # where it is, in the descriptions' words: "In the top left."
                pairs.append((f"Where is the {name} at the {when} of the video?",
                              _capital(_region_phrase(region)) + "."))
        if obj.motions:
            pairs.append((f"Does the {name} move?", f"Yes, it moves {', then '.join(obj.motions)}."))
            pairs.append((f"Which direction does the {name} move?", ", then ".join(obj.motions)))
        else:
            pairs.append((f"Does the {name} move?", "No, it stays still."))
    clauses = [_event_clause(facts, i, 0) for i in range(len(facts.events))]
    pairs.append(("What happens first?", _capital(clauses[0]) + "."))
    if len(clauses) > 1:
        pairs.append(("What happens last?", _capital(clauses[-1]) + "."))
    for kind, question in (
        ("change_colour", "Does any object change colour?"),
        ("enter", "Does any object enter the scene?"),
        ("leave", "Does any object leave the scene?"),
        ("collide", "Do any objects collide?"),
    ):
        found = [_capital(clauses[i]) for i, event in enumerate(facts.events) if event.kind == kind]
        pairs.append((question, "Yes. " + ". ".join(found) + "." if found else "No."))
    shapes = {obj.shape for obj in facts.objects}
    colours = {colour for obj in facts.objects for colour in obj.colours}
    absent_shape = next((shape for shape in SHAPES if shape not in shapes), None)
    absent_colour = next((colour for colour in COLOUR_NAMES if colour not in colours), None)
    first = facts.objects[0]
    pairs.append((f"Is there a {first.colour} {first.shape} in the video?", "Yes."))
    if absent_shape and absent_colour:
        pairs.append((f"Is there a {absent_colour} {absent_shape} in the video?", "No."))
    return pairs
