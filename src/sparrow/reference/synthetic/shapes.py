"""Shape outlines: which points lie inside each shape, the pixel mask of a placed shape, and the
distance at which two shapes side by side first touch (used to lay out collisions, so colliding
shapes meet by their real outlines, not their bounding boxes)."""

from __future__ import annotations

import functools
import math

import numpy as np

from sparrow.reference.synthetic.vocabulary import SHAPES


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y), in units of the shape's half-extent around its centre (y down),
    lie inside `shape`. Every shape fits the box [-1, 1] x [-1, 1]."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.85
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "triangle":  # apex up at y = -1, base at y = 0.8 from x = -1 to 1
        return (y <= 0.8) & (np.abs(x) <= (y + 1.0) / 1.8)
    if shape == "star":
        return _in_polygon(x, y, _star_vertices())
    if shape == "heart":  # (u^2 + v^2 - 1)^3 <= u^2 v^3, scaled from u in +-1.14, v in [-1, 1.24]
        u, v = x * 1.14, -y * 1.118 + 0.118
        return (u * u + v * v - 1.0) ** 3 - u * u * v**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


@functools.cache
def _star_vertices() -> np.ndarray:
    """(10, 2) vertices of a five-pointed star, one point up, inner radius 0.5."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _in_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points (x, y) against a closed polygon (V, 2)."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


@functools.cache
def _row_half_widths(shape: str, rows: int = 801) -> np.ndarray:
    """(rows,) for rows y = linspace(-1, 1, rows): the largest |x| inside `shape` (-inf when the
    row is empty). All shapes are mirror-symmetric in x."""
    y = np.linspace(-1.0, 1.0, rows)[:, None]  # (rows, 1)
    x = np.linspace(0.0, 1.0, 1001)[None, :]  # (1, 1001)
    inside = _inside(shape, x, y)  # (rows, 1001)
    return np.where(inside.any(axis=1), np.where(inside, x, -np.inf).max(axis=1), -np.inf)


def _contact_distance(shape_a: str, radius_a: float, shape_b: str, radius_b: float) -> float:
    """Centre distance at which `shape_a` (left) and `shape_b` (right), centred on one row,
    first touch: the largest, over shared rows, of a's reach right plus b's reach left."""
    rows = 801
    y = np.linspace(-min(radius_a, radius_b), min(radius_a, radius_b), rows)  # (rows,)
    index_a = np.round((y / radius_a + 1) / 2 * (rows - 1)).astype(int)
    index_b = np.round((y / radius_b + 1) / 2 * (rows - 1)).astype(int)
    reach = _row_half_widths(shape_a)[index_a] * radius_a + _row_half_widths(shape_b)[index_b] * radius_b
    return float(reach[np.isfinite(reach)].max())


def shape_mask(shape: str, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels whose centres lie inside `shape` centred at pixel
    coordinates (cx, cy) (pixel i spans [i, i + 1)) with half-extent `radius` pixels."""
    mask = np.zeros((height, width), dtype=bool)
    region, local = _local_mask(shape, cx, cy, radius, height, width)
    mask[region] = local
    return mask


def _local_mask(
    shape: str, cx: float, cy: float, radius: float, height: int, width: int
) -> tuple[tuple[slice, slice], np.ndarray]:
    """The shape's mask inside its bounding box, clipped to the frame: (region, (h, w) bool)."""
    x0, x1 = max(0, math.floor(cx - radius)), min(width, math.ceil(cx + radius) + 1)
    y0, y1 = max(0, math.floor(cy - radius)), min(height, math.ceil(cy + radius) + 1)
    xs = (np.arange(x0, x1) + 0.5 - cx) / radius  # (w,)
    ys = (np.arange(y0, y1) + 0.5 - cy) / radius  # (h,)
    return (slice(y0, y1), slice(x0, x1)), _inside(shape, xs[None, :], ys[:, None])
