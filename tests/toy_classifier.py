"""A small, independent judge of toy-shapes images: background, colour and shape from pixels and geometry.

It shares no code with ``ldm.data.toy_shapes``: the palette below is the spec's, and the rules are plain
geometry, so it can check both the dataset and the images the trained model generates.

* background: the median colour of the 2-pixel border, white or black by brightness;
* shape mask: the largest 4-connected region of pixels far from the background (threshold: half-way
  between the background and the shape's median colour);
* colour: the palette colour nearest to the mask's median colour;
* shape: a triangle is much narrower at a quarter of its height than at three quarters; otherwise a square
  fills the corners of its bounding box, which a circle leaves empty.

:func:`inspect` adds two measures of how well the shape is drawn:

* fill: the mask's area over its bounding box's (a true circle pi/4 = 0.785, a square 1, a triangle 0.5);
  a circle drawn as a rounded square fills more;
* blotch: the size in pixels of the largest off-colour patch: pixels more than ``BLOTCH_DISTANCE`` from the
  shape's colour well inside the shape, or from the background's well outside it (2 px off the shape's edge
  either way, so soft edges do not count), 4-connected, counted when at least ``BLOTCH_MIN_PIXELS``; else 0.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

PALETTE = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (20, 20, 220), "yellow": (230, 210, 20)}
TRIANGLE_WIDTH_RATIO = 0.7  # width at 1/4 height over width at 3/4 height: triangle 1/3, circle and square 1
CORNER = 0.15  # corner patches of the bounding box, as a fraction of its side: a circle misses them entirely
SQUARE_MIN_CORNER_FILL = 0.5  # square 1, circle 0
MIN_AREA = 40  # pixels; a 24 px triangle covers about 290
BLOTCH_DISTANCE = 80.0  # RGB distance from the colour a pixel should have
BLOTCH_MIN_PIXELS = 4
EDGE = 2  # pixels either side of the shape's edge that may blend the two colours
CIRCLE_FILL = (0.74, 0.83)  # a true circle's fill of its bounding box (pi/4 = 0.785), sharp or blurred


class Verdict(NamedTuple):
    colour: str | None
    shape: str | None
    background: str


class Report(NamedTuple):
    """:func:`classify`'s verdict and the drawing's quality: ``fill`` (None without a shape) and ``blotch``."""

    verdict: Verdict
    fill: float | None
    blotch: int


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask (all False when the mask is empty)."""
    out = np.zeros_like(mask, dtype=bool)
    regions = components(mask)
    if regions:
        out[regions[0][:, 0], regions[0][:, 1]] = True
    return out


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a boolean (H, W) mask, each as an (N, 2) array of (y, x), largest first."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.asarray(region))
    return sorted(regions, key=len, reverse=True)


def dilate(mask: np.ndarray, steps: int = 1, outside: bool = False) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels (3x3 neighbourhood); beyond the image it is ``outside``."""
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1, constant_values=outside)
        out = np.zeros_like(out)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``mask`` shrunk by ``steps`` pixels (3x3 neighbourhood), also away from the image's border."""
    return ~dilate(~mask, steps, outside=True)


def shape_of(mask: np.ndarray) -> str:
    """'triangle', 'square' or 'circle' from a non-empty boolean mask of one shape."""
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    height, width = bottom - top + 1, right - left + 1
    widths = mask[top:bottom + 1].sum(axis=1)
    upper = widths[int(round(0.25 * (height - 1)))]
    lower = widths[int(round(0.75 * (height - 1)))]
    if upper < TRIANGLE_WIDTH_RATIO * max(lower, 1):
        return "triangle"
    k = max(1, int(round(CORNER * min(height, width))))
    box = mask[top:bottom + 1, left:right + 1]
    corners = np.concatenate([box[:k, :k].ravel(), box[:k, -k:].ravel(), box[-k:, :k].ravel(), box[-k:, -k:].ravel()])
    return "square" if corners.mean() >= SQUARE_MIN_CORNER_FILL else "circle"


def classify(image: np.ndarray) -> Verdict:
    """Judge a (H, W, 3) uint8 RGB image; colour and shape are None when no shape stands out."""
    return inspect(image).verdict


def inspect(image: np.ndarray) -> Report:
    """Judge a (H, W, 3) uint8 RGB image and measure how well its shape is drawn (see the module's notes)."""
    img = np.asarray(image, dtype=np.float64)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = "white" if bg.mean() > 127.5 else "black"
    distance = np.linalg.norm(img - bg, axis=-1)
    rough = largest_component(distance > 60.0)
    if rough.sum() < MIN_AREA:
        return Report(Verdict(None, None, background), None, _largest_blotch(distance > BLOTCH_DISTANCE))
    fg = np.median(img[rough], axis=0)
    mask = largest_component(distance > 0.5 * np.linalg.norm(fg - bg))
    if mask.sum() < MIN_AREA:
        return Report(Verdict(None, None, background), None, _largest_blotch(distance > BLOTCH_DISTANCE))
    fg = np.median(img[mask], axis=0)
    colour = min(PALETTE, key=lambda name: np.linalg.norm(fg - np.asarray(PALETTE[name], dtype=np.float64)))
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    fill = float(mask.sum()) / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    inside = erode(mask, EDGE) & (np.linalg.norm(img - fg, axis=-1) > BLOTCH_DISTANCE)
    outside = ~dilate(mask, EDGE) & (distance > BLOTCH_DISTANCE)
    return Report(Verdict(colour, shape_of(mask), background), fill, _largest_blotch(inside | outside))


def _largest_blotch(off_colour: np.ndarray) -> int:
    regions = components(off_colour)
    size = len(regions[0]) if regions else 0
    return size if size >= BLOTCH_MIN_PIXELS else 0
