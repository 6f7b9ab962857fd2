"""A small, independent judge of toy-shapes images: background, colour and shape from pixels and geometry.

It shares no code with ``ldm.data.toy_shapes``: the palette below is the spec's, and the rules are plain
geometry, so it can check both the dataset and the images the trained model generates.

* background: the median colour of the 2-pixel border, white or black by brightness;
* shape mask: the largest 4-connected region of pixels far from the background (threshold: half-way
  between the background and the shape's median colour);
* colour: the palette colour nearest to the mask's median colour;
* shape: a triangle is much narrower at a quarter of its height than at three quarters; otherwise a square
  fills the corners of its bounding box, which a circle leaves empty.
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


class Verdict(NamedTuple):
    colour: str | None
    shape: str | None
    background: str


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask (all False when the mask is empty)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
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
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


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
    img = np.asarray(image, dtype=np.float64)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = "white" if bg.mean() > 127.5 else "black"
    distance = np.linalg.norm(img - bg, axis=-1)
    rough = largest_component(distance > 60.0)
    if rough.sum() < MIN_AREA:
        return Verdict(None, None, background)
    fg = np.median(img[rough], axis=0)
    mask = largest_component(distance > 0.5 * np.linalg.norm(fg - bg))
    if mask.sum() < MIN_AREA:
        return Verdict(None, None, background)
    fg = np.median(img[mask], axis=0)
    colour = min(PALETTE, key=lambda name: np.linalg.norm(fg - np.asarray(PALETTE[name], dtype=np.float64)))
    return Verdict(colour, shape_of(mask), background)
