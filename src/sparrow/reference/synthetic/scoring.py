"""Scoring: how many key facts of a video (`key_facts`) a free-form description states
correctly (`score_description`).

Matching is lexical and deliberately simple (lower-cased words, after rewriting a few phrases
such as 'shows up' -> 'appears', "doesn't move" -> still, 'left the scene' -> leaves, 'two are
left' -> remain, and dropping position phrases such as 'on the left' or 'from the right'):

- Mentions. A shape word (or plural, or a listed synonym: ball/disc, box, rhombus) names the
  object of that shape. The colour and size words directly before it ('small red circle') are
  its adjectives. A mention whose colour words are not all colours the object ever has ('green
  circle' when the circle is red) names a different, invented object: it counts for nothing,
  and claims about it are ignored.
- object fact: some mention names the object with a true colour and none with a false one.
- size fact: the size words before its mentions are exactly its size.
- Claims. Direction words (left/right/up/down, -ward(s)), enter words (enters, appears, joins,
  ...), leave words (leaves, disappears, exits, ...), change words (turns, changes, becomes,
  ...; the new colour is the colour after 'to'/'into', else the first colour within six words)
  and stillness phrases (stays still, does not move, stationary, ...) apply to the nearest
  group of mentions before them in the sentence ('the red circle and the blue square' is one
  group), else the first group after them, else the last group of earlier sentences ('It moves
  left'). A collision word (collide, hits, bumps, ...) applies to the group before it together
  with the group right after it ('A hits B', 'A and B collide').
- motion fact: the direction is claimed for the object and every direction claimed for it is
  one it travels. still fact: a stillness claim and no direction claim.
- enter/leave/collide facts: a matching claim; change_colour: a change claim with the right new
  colour.
- count facts: in clauses (split at commas, colons, and, but, while), a number word/digit in a
  clause that also has a start word (start, beginning, initially, first, ...), an end word
  (end, finally, remain, ...), both or 'throughout' (both times), or only a count noun
  (objects, shapes, ...; 'neutral', used for the start when no clause names the start, and for
  the end when the count never changes). The fact holds when such claims exist and all equal
  the truth.
- order fact (events i, i+1): both events' first correct claims exist and appear in this order
  in the text.
- background fact: a word of its kind (plain, gradient, noisy/speckled, striped) and none of
  another kind's.
- Hallucinations, added to the denominator: each shape named that the video lacks, each object
  claimed to enter, leave or change colour that does not, each collision claimed between
  objects that do not collide.

So a description of another video, a generic sentence, or one with wrong colours scores low;
the known blind spots are paraphrases outside the lexicon (e.g. 'the circle, red, ...'),
negations ('no triangle') and directions stated as positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType

from sparrow.reference.synthetic.facts import ObjectFact, VideoFacts
from sparrow.reference.synthetic.language import _NUMBER_WORDS, _article
from sparrow.reference.synthetic.scenes import Event
from sparrow.reference.synthetic.vocabulary import COLOUR_NAMES, SHAPES


@dataclass(frozen=True)
class KeyFact:
    """One checkable statement about a video (see `key_facts` and `score_description`)."""

    kind: str  # object, size, motion, still, enter, leave, change_colour, collide,
    #            count_start, count_end, order, background
    text: str  # the statement in words
    object_ids: tuple[int, ...] = ()
    value: str = ""  # colour, size, direction, count, background kind, or "i<j" event indices


def key_facts(facts: VideoFacts) -> list[KeyFact]:
    """The statements `score_description` checks: per object its colour and its size, per event
    what happened (moves give one `motion` fact each), one `still` fact per object that never
    moves, the count at the start and at the end, the order of each consecutive pair of events,
    and the kind of background."""
    result = []
    for obj in facts.objects:
        name = f"{_article(obj.colour)} {obj.colour} {obj.shape}"
        result.append(KeyFact("object", f"there is {name}", (obj.id,), obj.colour))
        result.append(KeyFact("size", f"the {obj.shape} is {obj.size}", (obj.id,), obj.size))
        if not obj.motions:
            result.append(KeyFact("still", f"the {obj.shape} does not move", (obj.id,)))
    event_texts = []
    for event in facts.events:
        shapes = " and the ".join(facts.object(i).shape for i in event.object_ids)
        kind, value = event.kind, ""
        if event.kind == "move":
            kind, value = "motion", event.direction
            text = f"the {shapes} moves {event.direction}"
        elif event.kind == "change_colour":
            value = event.to_colour
            text = f"the {shapes} changes colour to {event.to_colour}"
        elif event.kind == "collide":
            text = f"the {shapes} collide"
        else:
            text = f"the {shapes} {'enters' if event.kind == 'enter' else 'leaves'}"
        result.append(KeyFact(kind, text, event.object_ids, value))
        event_texts.append(text)
    for i in range(len(facts.events) - 1):
        text = f"first {event_texts[i]}, then {event_texts[i + 1]}"
        result.append(KeyFact("order", text, (), f"{i}<{i + 1}"))
    start, end = facts.count_start, facts.count_end
    result.append(KeyFact("count_start", f"{start} objects at the start", (), str(start)))
    result.append(KeyFact("count_end", f"{end} objects at the end", (), str(end)))
    looks = {"plain": "plain", "gradient": "a gradient", "noise": "noisy", "stripes": "striped"}
    result.append(KeyFact("background", f"the background is {looks[facts.background]}", (), facts.background))
    return result


# Lexicon of the scorer (lower-case tokens).
_SHAPE_WORDS = MappingProxyType(
    {
        **{shape: shape for shape in SHAPES},
        **{shape + "s": shape for shape in SHAPES},
        "disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle", "ball": "circle",
        "balls": "circle", "rhombus": "diamond", "box": "square", "boxes": "square",
    }
)  # fmt: skip
_COLOUR_WORDS = MappingProxyType({**{c: c for c in COLOUR_NAMES}, "violet": "purple"})
_SIZE_WORDS = MappingProxyType(
    {"small": "small", "little": "small", "tiny": "small", "medium": "medium", "large": "large",
     "big": "large", "huge": "large"}
)  # fmt: skip
_ADJECTIVE_FILLERS = frozenset({"sized", "coloured", "colored", "bright", "dark", "light", "pale"})
_GROUP_JOINERS = frozenset({"and", "the", "a", "an", ",", "both", "also"})
_DIRECTION_WORDS = MappingProxyType(
    {"left": "left", "leftward": "left", "leftwards": "left", "right": "right", "rightward": "right",
     "rightwards": "right", "up": "up", "upward": "up", "upwards": "up", "down": "down",
     "downward": "down", "downwards": "down"}
)  # fmt: skip
_PREDICATE_WORDS = MappingProxyType(
    {
        **dict.fromkeys(("enter", "enters", "entered", "entering", "appear", "appears", "appeared",
                         "arrive", "arrives", "arrived", "join", "joins", "joined"), "enter"),
        **dict.fromkeys(("leave", "leaves", "leaving", "disappear", "disappears", "disappeared",
                         "vanish", "vanishes", "vanished", "exit", "exits", "exited"), "leave"),
        **dict.fromkeys(("turn", "turns", "turned", "change", "changes", "changed", "become",
                         "becomes", "became", "switch", "switches", "switched"), "change"),
        **dict.fromkeys(("collide", "collides", "collided", "collision", "hit", "hits", "bump",
                         "bumps", "bumped", "crash", "crashes", "crashed", "meet", "meets", "met",
                         "touch", "touches", "touched"), "collide"),
        "stillmarker": "still",
    }
)  # fmt: skip
_BACKGROUND_WORDS = MappingProxyType(
    {
        "plain": frozenset({"plain", "uniform"}),
        "gradient": frozenset({"gradient", "fading", "fades"}),
        "noise": frozenset({"noise", "noisy", "speckled", "grainy", "mottled"}),
        "stripes": frozenset({"stripe", "stripes", "striped", "stripy"}),
    }
)
_NUMBERS = MappingProxyType({**{word: n for n, word in enumerate(_NUMBER_WORDS)}})
_COUNT_NOUNS = frozenset(
    {"object", "objects", "shape", "shapes", "thing", "things", "item", "items", "figures"}
)
_START_WORDS = frozenset({"start", "starts", "started", "beginning", "begins", "begin", "initially",
                          "initial", "opening", "opens", "first"})  # fmt: skip
_END_WORDS = frozenset({"end", "ends", "ending", "ended", "finally", "final", "last", "remain",
                        "remains", "remaining", "remained"})  # fmt: skip
_THROUGHOUT_WORDS = frozenset({"throughout", "always", "whole", "entire", "constant", "unchanged"})
_CLAUSE_BREAKS = frozenset({",", ":", "and", "but", "while", "whereas"})
_NOT_COUNTS_BEFORE = frozenset({"the", "each", "another", "this", "that", "which", "every"})
_NOT_COUNTS_AFTER = frozenset(
    {"of", "second", "seconds", "frame", "frames", "time", "times", "minute", "minutes"}
)

# Rewrites applied before tokenizing (phrases whose words would otherwise be misread).
_REWRITES: tuple[tuple[str, str], ...] = (
    (r"[\u2018\u2019]", "'"),
    (r"-", " "),
    (r"\bn't\b|n't", " not"),
    (r"\b(shows?|showed|showing) up\b", " appears "),
    (r"\b(ends?|ended) up\b", " ends "),
    (r"\b(slows?|slowed) down\b", " slows "),
    (r"\bcom(es|e|ing)? in(to)?\b|\bcame in(to)?\b", " enters "),
    (r"\b(goes|go|went) away\b", " leaves "),
    (r"\b(has|had|have|having) left\b", " leaves "),
    (r"\b(is|are|was|were) (still |only )?left\b", " remain "),
    (r"\bleft (the|its) (scene|frame|screen|view|picture|video|image)\b", " leaves the scene "),
    (r"\b(objects?|shapes?|things?|items?|ones?|figures?|one|two|three|four|five|six|seven|eight|nine|ten"
     r"|\d+) (are |is )?(still )?left\b", r"\1 remain"),
    (r"\bto the (left|right) of\b", " beside "),
    (r"\bfrom the (left|right|top|bottom)( side| edge)?\b", " "),
    (r"\b(on|at|in|near) the (top|bottom|upper|lower)?\s*(left|right|top|bottom)"
     r"( side| edge| corner| half| part)?( of)?\b", " "),
    (r"\b(stays?|stayed|staying|remains?|remained|stands?|stood|sits?|sat|keeps?|kept)"
     r" (completely |perfectly |totally )?(still|stationary|motionless|static|put|in place|immobile)\b",
     " stillmarker "),
    (r"\b(does|did|do) not move\b|\bnever moves?\b|\bnot moving\b|\b(stationary|motionless|immobile)\b",
     " stillmarker "),
)  # fmt: skip


@dataclass
class _Mention:
    position: int  # global token index of the shape word
    shape: str
    object_id: int | None  # None: a shape the video lacks, or named with a colour it never has
    colours: frozenset[str]
    sizes: frozenset[str]


@dataclass
class _Claim:
    kind: str  # move, enter, leave, change, still, collide
    object_ids: frozenset[int]
    position: int
    value: str | None = None  # direction (move) or new colour (change)


@dataclass
class _Parsed:
    mentions: list[_Mention] = field(default_factory=list)
    claims: list[_Claim] = field(default_factory=list)
    counts: list[tuple[str, int]] = field(default_factory=list)  # (start|end|throughout|neutral, n)
    words: set[str] = field(default_factory=set)

    def claims_about(self, kind: str, object_id: int) -> list[_Claim]:
        """The claims of `kind` about `object_id`, in text order."""
        return [claim for claim in self.claims if claim.kind == kind and object_id in claim.object_ids]


# A group of mentions: (first token, last token, ids of the real objects it names).
_Group = tuple[int, int, frozenset[int]]


def _sentences(text: str) -> list[list[str]]:
    text = text.lower()
    for pattern, replacement in _REWRITES:
        text = re.sub(pattern, replacement, text)
    return [re.findall(r"[a-z]+|\d+|[,:]", s) for s in re.split(r"[.!?;\n]+", text) if s.strip()]



def _parse(text: str, facts: VideoFacts) -> _Parsed:
    """Tokenize and read mentions, claims and counts (rules in the module docstring)."""
    by_shape = {obj.shape: obj for obj in facts.objects}
    parsed = _Parsed()
    offset = 0  # global token index of the sentence's first token
    last_group: frozenset[int] = frozenset()
    for tokens in _sentences(text):
        parsed.words.update(tokens)
        mentions = _mentions(tokens, offset, by_shape)
        parsed.mentions += mentions
        groups = _groups(tokens, mentions, offset)
        parsed.claims += _claims(tokens, groups, offset, last_group)
        if groups:
            last_group = groups[-1][2]
        parsed.counts += _count_claims(tokens)
        offset += len(tokens)
    return parsed


def _mentions(tokens: list[str], offset: int, by_shape: dict[str, ObjectFact]) -> list[_Mention]:
    """The shape words of one sentence, each with the colour and size words right before it."""
    mentions: list[_Mention] = []
    for i, token in enumerate(tokens):
        if token not in _SHAPE_WORDS:
            continue
        colours, sizes, j = set(), set(), i - 1
        while j >= 0 and _is_adjective(tokens[j]):
            if tokens[j] in _COLOUR_WORDS:
                colours.add(_COLOUR_WORDS[tokens[j]])
            if tokens[j] in _SIZE_WORDS:
                sizes.add(_SIZE_WORDS[tokens[j]])
            j -= 1
        shape = _SHAPE_WORDS[token]
        obj = by_shape.get(shape)
        object_id = obj.id if obj is not None and colours <= set(obj.colours) else None
        mentions.append(_Mention(offset + i, shape, object_id, frozenset(colours), frozenset(sizes)))
    return mentions


def _groups(tokens: list[str], mentions: list[_Mention], offset: int) -> list[_Group]:
    """The mentions of one sentence in groups: mentions joined only by 'and', articles, commas
    and adjectives are one group. Token indices are local to the sentence."""
    groups: list[_Group] = []
    for mention in mentions:
        local = mention.position - offset
        ids = frozenset([mention.object_id] if mention.object_id is not None else [])
        between = tokens[groups[-1][1] + 1 : local] if groups else None
        if between is not None and all(t in _GROUP_JOINERS or _is_adjective(t) for t in between):
            first, _, previous = groups[-1]
            groups[-1] = (first, local, previous | ids)
        else:
            groups.append((local, local, ids))
    return groups


def _claims(tokens: list[str], groups: list[_Group], offset: int, last_group: frozenset[int]) -> list[_Claim]:
    """The claims of one sentence's predicate words, each about the group it applies to;
    `last_group` is the last group of the earlier sentences."""
    claims: list[_Claim] = []
    for i, token in enumerate(tokens):
        kind = "move" if token in _DIRECTION_WORDS else _PREDICATE_WORDS.get(token)
        if kind is None:
            continue
        before = [g for g in groups if g[1] < i]
        after = [g for g in groups if g[0] > i]
        if kind == "collide":  # 'A and B collide', 'A hits B', 'a collision between A and B'
            objects = before[-1][2] if before else frozenset()
            if after and "," not in tokens[i : after[0][0]]:
                objects |= after[0][2]
            claims.append(_Claim(kind, objects, offset + i))
            continue
        target = before[-1][2] if before else after[0][2] if after else last_group
        value = _DIRECTION_WORDS[token] if kind == "move" else None
        if kind == "change":
            value = _new_colour(tokens[i + 1 : i + 7])
        claims.append(_Claim(kind, target, offset + i, value))
    return claims


def _is_adjective(token: str) -> bool:
    return token in _COLOUR_WORDS or token in _SIZE_WORDS or token in _ADJECTIVE_FILLERS


def _new_colour(window: list[str]) -> str | None:
    """The colour named after a change verb: the one after 'to'/'into' if any, else the first."""
    for i, token in enumerate(window[:-1]):
        if token in ("to", "into"):
            for following in window[i + 1 : i + 3]:
                if following in _COLOUR_WORDS:
                    return _COLOUR_WORDS[following]
    return next((_COLOUR_WORDS[t] for t in window if t in _COLOUR_WORDS), None)


def _count_claims(tokens: list[str]) -> list[tuple[str, int]]:
    """Object counts stated in one sentence, as (start|end|throughout|neutral, n)."""
    claims, clause = [], []
    for token in [*tokens, ","]:
        if token not in _CLAUSE_BREAKS:
            clause.append(token)
            continue
        numbers = [
            _NUMBERS[t] if t in _NUMBERS else int(t)
            for k, t in enumerate(clause)
            if (t in _NUMBERS or t.isdigit())
            and (k == 0 or clause[k - 1] not in _NOT_COUNTS_BEFORE)
            and (k + 1 == len(clause) or clause[k + 1] not in _NOT_COUNTS_AFTER)
        ]
        words = set(clause)
        start, end = bool(words & _START_WORDS), bool(words & _END_WORDS)
        if numbers and (start or end or words & _THROUGHOUT_WORDS or words & _COUNT_NOUNS):
            when = (
                "throughout"
                if (start and end) or words & _THROUGHOUT_WORDS
                else "start"
                if start
                else "end"
                if end
                else "neutral"
            )
            claims += [(when, n) for n in numbers]
        clause = []
    return claims



def score_description(text: str, facts: VideoFacts) -> dict:
    """Key-fact accuracy of a free-form description against the ground truth, by the matching
    rules in the module docstring.

    Returns {"score", "correct", "total", "hallucinated", "invented_events", "by_kind": {kind:
    [correct, total]}, "facts": [(statement, correct)]}, with score = correct / (total +
    hallucinated) in [0, 1]; `invented_events` is the part of `hallucinated` that is events
    (entries, exits, colour changes, collisions), the rest being invented shapes.
    """
    parsed = _parse(text, facts)
    event_positions = [_first_claim_position(event, parsed) for event in facts.events]
    results = [(fact, _holds(fact, facts, parsed, event_positions)) for fact in key_facts(facts)]
    invented_objects, invented_events = _hallucinations(parsed, facts)
    hallucinated = invented_objects + invented_events

    correct = sum(ok for _, ok in results)
    by_kind: dict[str, list[int]] = {}
    for fact, ok in results:
        tally = by_kind.setdefault(fact.kind, [0, 0])
        tally[0] += int(ok)
        tally[1] += 1
    return {
        "score": correct / (len(results) + hallucinated),
        "correct": correct,
        "total": len(results),
        "hallucinated": hallucinated,
        "invented_events": invented_events,
        "by_kind": by_kind,
        "facts": [(fact.text, ok) for fact, ok in results],
    }


def _first_claim_position(event: Event, parsed: _Parsed) -> int | None:
    """Token index of the first correct claim of `event`, None if there is none."""
    if event.kind == "collide":
        pair = set(event.object_ids)
        found = [c.position for c in parsed.claims if c.kind == "collide" and pair <= c.object_ids]
    else:
        kind = {"move": "move", "change_colour": "change"}.get(event.kind, event.kind)
        value = {"move": event.direction, "change_colour": event.to_colour}.get(event.kind)
        found = [c.position for c in parsed.claims_about(kind, event.object_ids[0]) if c.value == value]
    return min(found) if found else None


def _holds(fact: KeyFact, facts: VideoFacts, parsed: _Parsed, event_positions: list[int | None]) -> bool:
    """Whether the parsed description states `fact` correctly; `event_positions` holds, per
    event, the token index of its first correct claim (see `_first_claim_position`)."""
    obj = facts.object(fact.object_ids[0]) if fact.object_ids else None
    if fact.kind in ("object", "size"):
        real = [m for m in parsed.mentions if m.object_id == obj.id]
        if fact.kind == "object":
            invented = any(m.shape == obj.shape and m.object_id is None for m in parsed.mentions)
            return any(m.colours for m in real) and not invented
        sizes = set().union(*(m.sizes for m in real)) if real else set()
        return sizes == {obj.size}
    if fact.kind == "still":
        return bool(parsed.claims_about("still", obj.id)) and not parsed.claims_about("move", obj.id)
    if fact.kind == "motion":
        claimed = {c.value for c in parsed.claims_about("move", obj.id)}
        return fact.value in claimed and claimed <= set(obj.motions)
    if fact.kind in ("enter", "leave", "change_colour", "collide"):
        event = next(e for e in facts.events if e.kind == fact.kind and e.object_ids == fact.object_ids)
        return _first_claim_position(event, parsed) is not None
    if fact.kind == "order":
        first, second = (event_positions[int(i)] for i in fact.value.split("<"))
        return first is not None and second is not None and first < second
    if fact.kind in ("count_start", "count_end"):
        return _count_holds(parsed.counts, fact.kind, int(fact.value), facts)
    if fact.kind == "background":
        return bool(parsed.words & _BACKGROUND_WORDS[fact.value]) and not any(
            parsed.words & words for kind, words in _BACKGROUND_WORDS.items() if kind != fact.value
        )
    return False


def _hallucinations(parsed: _Parsed, facts: VideoFacts) -> tuple[int, int]:
    """(invented objects, invented events): the shapes named that the video lacks, and the
    entries, exits and colour changes claimed for objects that have none, plus the collisions
    claimed between objects that do not collide (each distinct set of objects once)."""
    shapes = {o.shape for o in facts.objects}
    invented_objects = len({m.shape for m in parsed.mentions if m.shape not in shapes})
    true_kinds = {(e.kind, i) for e in facts.events for i in e.object_ids}
    invented_events = 0
    for kind, event_kind in (("enter", "enter"), ("leave", "leave"), ("change", "change_colour")):
        claimed = {i for claim in parsed.claims if claim.kind == kind for i in claim.object_ids}
        invented_events += len({i for i in claimed if (event_kind, i) not in true_kinds})
    colliding = [set(e.object_ids) for e in facts.events if e.kind == "collide"]
    false_collisions = {
        c.object_ids
        for c in parsed.claims
        if c.kind == "collide" and not any(pair <= c.object_ids for pair in colliding)
    }
    return invented_objects, invented_events + len(false_collisions)


def _count_holds(counts: list[tuple[str, int]], kind: str, truth: int, facts: VideoFacts) -> bool:
    when = "start" if kind == "count_start" else "end"
    stated = [n for w, n in counts if w in (when, "throughout")]
    if not stated and (when == "start" or facts.count_start == facts.count_end):
        stated = [n for w, n in counts if w == "neutral"]
    return bool(stated) and all(n == truth for n in stated)
