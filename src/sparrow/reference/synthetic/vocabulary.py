"""The closed vocabularies of the synthetic videos: every shape, colour, size, direction, event
kind and background a scene can have. Descriptions, questions and the scorer's lexicon are
built from these names, so they are chosen to be unambiguous in text as well as in pixels."""

from __future__ import annotations

from types import MappingProxyType

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "heart")

# Saturated, well-separated object colours (none of them is close to a background colour).
COLOURS: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 20, 20),
        "green": (20, 170, 40),
        "blue": (20, 60, 230),
        "yellow": (245, 225, 20),
        "purple": (140, 40, 190),
        "orange": (255, 140, 0),
        "white": (250, 250, 250),
        "black": (10, 10, 10),
    }
)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Half-extent of a shape (centre to the edge of its bounding box) as a fraction of the frame's
# shorter side.
SIZES: MappingProxyType[str, float] = MappingProxyType({"small": 0.07, "medium": 0.1, "large": 0.14})

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
EVENT_KINDS: tuple[str, ...] = ("move", "enter", "leave", "change_colour", "collide")
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noise", "stripes")

# Muted mid-tone background colours; their names share no word with the object colours.
BACKGROUND_COLOURS: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {
        "grey": (128, 128, 128),
        "beige": (176, 164, 134),
        "olive": (120, 120, 72),
        "teal": (72, 122, 122),
    }
)

# Where a point is: thirds of the frame, row by row from the top left (index 3 * row + column).
REGIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "middle", "right",
                           "bottom left", "bottom", "bottom right")


def region_of(x: float, y: float) -> str:
    """The third of the frame (x, y in [0, 1] of its width and height) a point is in."""
    column = 0 if x < 1 / 3 else 2 if x > 2 / 3 else 1
    row = 0 if y < 1 / 3 else 2 if y > 2 / 3 else 1
    return REGIONS[3 * row + column]
