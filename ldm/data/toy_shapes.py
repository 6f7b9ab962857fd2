"""Toy shapes: 64x64 captioned images of one solid shape on a plain background, deterministic per index.

Each image shows a circle, an axis-aligned square or an upright isosceles triangle (base at the bottom, apex
at the top centre, as tall as it is wide), 24-44 px wide and fully inside the image, in one of four colours,
on a white or black background. The caption is ``"a {colour} {shape} on a {background} background"``.
Items are dicts in the original LDM batch format: ``image`` (H, W, 3) float32 in [-1, 1] and the caption
under both ``caption`` and ``txt``. :class:`ToyShapesLatents` gives the same items as latents of a trained
autoencoder, encoded once, for cheaper training of the latent diffusion model.
"""
from __future__ import annotations

import itertools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SIZE = 64
MIN_WIDTH, MAX_WIDTH = 24, 44
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
COLOURS = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (20, 20, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def caption_of(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


# The 24 (colour, shape, background) combinations, in a fixed order; index i of the dataset uses CLASSES[i % 24].
CLASSES: tuple[tuple[str, str, str], ...] = tuple(
    (c, s, b) for b, s, c in itertools.product(BACKGROUNDS, SHAPES, COLOURS))
CAPTIONS: tuple[str, ...] = tuple(caption_of(*cls) for cls in CLASSES)


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows: the shape occupies columns [left, left + width) and rows [top, top + width)."""

    colour: str
    shape: str
    background: str
    width: int
    left: int
    top: int

    @property
    def caption(self) -> str:
        return caption_of(self.colour, self.shape, self.background)


def shape_mask(shape: str, width: int, left: int, top: int, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape whose square bounding box is ``width`` px from (left, top).

    A pixel belongs to the shape when its centre does.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    u, v = xs - left, ys - top  # pixel centres in box coordinates, 0..width
    inside_box = (u >= 0) & (u <= width) & (v >= 0) & (v <= width)
    half = width / 2.0
    if shape == "square":
        return inside_box
    if shape == "circle":
        return (u - half) ** 2 + (v - half) ** 2 <= half ** 2
    if shape == "triangle":
        # apex (half, 0), base from (0, width) to (width, width): half-width at depth v is v / 2
        return inside_box & (np.abs(u - half) <= v / 2.0)
    raise ValueError(f"unknown shape '{shape}'; use one of {', '.join(SHAPES)}")


def render(spec: ShapeSpec, size: int = SIZE) -> np.ndarray:
    """The uint8 image (size, size, 3) of ``spec``."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[spec.background]
    image[shape_mask(spec.shape, spec.width, spec.left, spec.top, size)] = COLOURS[spec.colour]
    return image


def flatten(image: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The image the spec would draw nearest to a drawn (H, W, 3) uint8 ``image``, and how far it was off.

    The background is the palette background nearest the border's median, the colour the palette colour nearest
    the median of the pixels far from it; the shape is every pixel nearer that colour than the background, with
    its holes filled. Returns (the flat uint8 image, the fraction of the shape's pixels more than 80 from its
    colour), or None where no shape stands out (under 40 pixels).
    """
    img = image.astype(np.float64)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = _nearest(np.median(border, axis=0), BACKGROUNDS)
    far = np.linalg.norm(img - bg, axis=-1) > 100.0
    if far.sum() < 40:
        return None
    fg = _nearest(np.median(img[far], axis=0), COLOURS)
    shape = np.linalg.norm(img - fg, axis=-1) < np.linalg.norm(img - bg, axis=-1)
    shape = ~_reachable_from_border(~shape)
    off = float((np.linalg.norm(img[shape] - fg, axis=-1) > 80.0).mean())
    flat = np.empty(image.shape, dtype=np.uint8)
    flat[:] = bg
    flat[shape] = fg
    return flat, off


def _nearest(colour: np.ndarray, table: dict[str, tuple[int, int, int]]) -> np.ndarray:
    return min((np.asarray(v, dtype=np.float64) for v in table.values()), key=lambda v: np.linalg.norm(colour - v))


def _reachable_from_border(free: np.ndarray) -> np.ndarray:
    """The pixels of a boolean (H, W) mask connected (4-neighbours) to the image's border within the mask."""
    reached = np.zeros_like(free)
    reached[[0, -1], :] = free[[0, -1], :]
    reached[:, [0, -1]] |= free[:, [0, -1]]
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= free
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def spec_for_index(index: int, seed: int = 0) -> ShapeSpec:
    """The deterministic content of item ``index``: class ``CLASSES[index % 24]``, random size and position."""
    colour, shape, background = CLASSES[index % len(CLASSES)]
    rng = np.random.default_rng([seed, index])
    width = int(rng.integers(MIN_WIDTH, MAX_WIDTH + 1))
    left = int(rng.integers(0, SIZE - width + 1))
    top = int(rng.integers(0, SIZE - width + 1))
    return ShapeSpec(colour, shape, background, width, left, top)


class ToyShapes(Dataset):
    """``size`` items, item i drawn from ``spec_for_index(i, seed)``; use different seeds for train and validation.

    ``crop_size`` (a multiple of 8 below 64) returns a crop of each image instead, at a position on the 8-pixel
    grid drawn per index: cheaper training for a fully convolutional autoencoder (SD's was trained on crops too).
    """

    def __init__(self, size: int = 24000, seed: int = 0, crop_size: int | None = None):
        if size <= 0:
            raise ValueError(f"ToyShapes size must be positive, got {size}")
        if crop_size is not None and not (0 < crop_size <= SIZE and crop_size % 8 == 0):
            raise ValueError(f"crop_size must be a multiple of 8 in 8..{SIZE}, got {crop_size}")
        self.size = size
        self.seed = seed
        self.crop_size = crop_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ToyShapes of size {self.size}")
        spec = spec_for_index(index, self.seed)
        image = render(spec).astype(np.float32) / 127.5 - 1.0
        if self.crop_size is not None and self.crop_size < SIZE:
            cells = (SIZE - self.crop_size) // 8 + 1
            top, left = 8 * np.random.default_rng([self.seed, index, 1]).integers(0, cells, size=2)
            image = image[top:top + self.crop_size, left:left + self.crop_size]
        return {"image": image, "caption": spec.caption, "txt": spec.caption}


class ToyShapesTrain(ToyShapes):
    """Training split (seed 0 by default)."""

    def __init__(self, size: int = 24000, seed: int = 0, crop_size: int | None = None):
        super().__init__(size=size, seed=seed, crop_size=crop_size)


class ToyShapesValidation(ToyShapes):
    """Validation split (seed 1 by default, so its images differ from the training ones)."""

    def __init__(self, size: int = 240, seed: int = 1):
        super().__init__(size=size, seed=seed)


class ToyShapesLatents(Dataset):
    """The items of ``ToyShapes(size, seed)`` as latents of a frozen autoencoder: ``image`` is (h, w, c).

    For a ``LatentDiffusion`` whose first stage is ``ldm.models.autoencoder.IdentityFirstStage``: it then trains
    on exactly what it would get by encoding each image with ``autoencoder`` (a model config whose
    ``params.ckpt_path`` holds the trained weights), a fresh sample of the posterior N(mean, std^2) per access,
    without running the encoder at every step (on a CPU, 40 % of a toy-shapes training step). The posterior of
    every item is encoded once and kept in ``cache`` (default: next to the checkpoint, named after the split);
    a cache made from another checkpoint, size or seed, or cut short, is made again.
    """

    def __init__(self, autoencoder: Any, size: int = 24000, seed: int = 0, cache: str | None = None,
                 batch_size: int = 64):
        if size <= 0:
            raise ValueError(f"ToyShapesLatents size must be positive, got {size}")
        ckpt = autoencoder["params"].get("ckpt_path") if "params" in autoencoder else None
        if not ckpt:
            raise ValueError("ToyShapesLatents needs the trained autoencoder: set autoencoder.params.ckpt_path")
        self.size, self.seed = size, seed
        cache_path = Path(cache) if cache else Path(f"{ckpt}.latents-seed{seed}-size{size}.pt")
        key = {"ckpt": os.path.realpath(ckpt), "mtime": os.stat(ckpt).st_mtime_ns, "size": size, "seed": seed}
        try:
            stored = torch.load(cache_path, weights_only=True) if cache_path.is_file() else None
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # cut short: made again
            stored = None
        if not isinstance(stored, dict) or stored.get("key") != key:
            stored = {"key": key, **self._encode(autoencoder, size, seed, batch_size)}
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            torch.save(stored, tmp)
            os.replace(tmp, cache_path)
        self.mean, self.std = stored["mean"], stored["std"]

    @staticmethod
    @torch.no_grad()
    def _encode(autoencoder: Any, size: int, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
        from ldm.util import instantiate_from_config

        model = instantiate_from_config(autoencoder).eval()
        images = ToyShapes(size=size, seed=seed)
        means, stds = [], []
        for start in range(0, size, batch_size):
            batch = np.stack([images[i]["image"] for i in range(start, min(start + batch_size, size))])
            posterior = model.encode(torch.from_numpy(batch).permute(0, 3, 1, 2))
            means.append(posterior.mean.permute(0, 2, 3, 1).contiguous())
            stds.append(posterior.std.permute(0, 2, 3, 1).contiguous())
        return {"mean": torch.cat(means), "std": torch.cat(stds)}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ToyShapesLatents of size {self.size}")
        caption = spec_for_index(index, self.seed).caption
        latent = self.mean[index] + self.std[index] * torch.randn_like(self.std[index])
        return {"image": latent, "caption": caption, "txt": caption}
