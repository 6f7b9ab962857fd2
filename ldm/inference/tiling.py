"""Tiled autoencoder decode and encode for images too large to run through the autoencoder at once.

The image is processed in overlapping square tiles; each output pixel is the weighted mean of the tiles that
cover it, with weights ramping linearly across every overlap, so no seam is a hard edge. Each tile is decoded
on its own (its GroupNorm statistics and the mid-block attention see only the tile), so a tiled result is
close to, not equal to, the untiled one: use tiling when memory demands it (:func:`decode_needs_tiling`).

    x = tiled_decode(model, z)                    # = model.decode_first_stage(z), in tiles of 64 latents
    posterior = tiled_encode(model, image)        # = model.encode_first_stage(image), in 512-pixel tiles
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ldm.backend.memory import available_memory_bytes
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap`` in common,
    each a multiple of ``multiple``; the last tile ends at ``size``. One tile when ``size <= tile``."""
    if tile <= overlap:
        raise ValueError(f"the tile ({tile}) must be larger than the overlap ({overlap})")
    if size <= tile:
        return [0]
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    starts = list(range(0, size - tile, stride))
    last = (size - tile) // multiple * multiple
    if last + tile < size:
        raise ValueError(f"size {size} is not a multiple of {multiple}")
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def _blend_weights(spans: list[tuple[int, int]], i: int, device: torch.device) -> torch.Tensor:
    """Weights over span ``i`` of ``spans`` (sorted (start, end) pairs): rising linearly across the overlap
    with the span before, falling across the overlap with the span after, 1 elsewhere; never 0."""
    start, end = spans[i]
    w = torch.ones(end - start, device=device)
    if i > 0 and spans[i - 1][1] > start:
        n = spans[i - 1][1] - start
        w[:n] = torch.minimum(w[:n], (torch.arange(n, device=device) + 0.5) / n)
    if i + 1 < len(spans) and end > spans[i + 1][0]:
        n = end - spans[i + 1][0]
        w[-n:] = torch.minimum(w[-n:], (torch.arange(n, 0, -1, device=device) - 0.5) / n)
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                multiple: int = 1) -> torch.Tensor:
    """``fn(x)`` computed on overlapping (tile x tile) crops of ``x`` (B, C, H, W) and blended.

    ``fn`` maps a crop to an output ``s`` times its size (s = 8 for a decoder, 1/8 for an encoder); tile,
    overlap and every tile start are in input pixels and multiples of ``multiple`` (so they map to whole
    output pixels). The result is float32.
    """
    b, _, h, w = x.shape
    rows, cols = tile_starts(h, tile, overlap, multiple), tile_starts(w, tile, overlap, multiple)
    out = weight = None
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            crop = x[:, :, top:top + tile, left:left + tile]
            y = fn(crop).float()
            if out is None:
                scale = y.shape[-1] / crop.shape[-1]
                out = torch.zeros(b, y.shape[1], round(h * scale), round(w * scale), device=y.device)
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=y.device)
                span_h, span_w = round(min(tile, h) * scale), round(min(tile, w) * scale)
                row_spans = [(round(r * scale), round(r * scale) + span_h) for r in rows]
                col_spans = [(round(c * scale), round(c * scale) + span_w) for c in cols]
            (y0, y1), (x0, x1) = row_spans[i], col_spans[j]
            mask = _blend_weights(row_spans, i, y.device)[:, None] * _blend_weights(col_spans, j, y.device)[None, :]
            out[:, :, y0:y1, x0:x1].add_(y * mask)
            weight[:, :, y0:y1, x0:x1].add_(mask)
    return out.div_(weight)


def tiled_decode(model: Any, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """``model.decode_first_stage(z)`` in overlapping tiles of ``tile`` latent pixels (8x that in the image).

    z: (B, C, h, w) scaled latents -> images (B, 3, 8h, 8w), float32. Memory is that of one tile's decode
    (about 3 GB in float32 for the default 512-pixel tiles) plus the output.
    """
    return tiled_apply(model.decode_first_stage, z, tile, overlap)


def tiled_encode(model: Any, x: torch.Tensor, tile: int = 512, overlap: int = 128) -> DiagonalGaussianDistribution:
    """``model.encode_first_stage(x)`` in overlapping tiles of ``tile`` image pixels; the tiles' moments
    (mean and log-variance) are blended. x: (B, 3, H, W) in [-1, 1], H and W multiples of 8."""
    facts = getattr(model, "facts", None)  # an OpenVINO model knows it without its torch first stage
    if facts is not None:
        factor = facts["encoder_factor"]
    else:
        first_stage = model.first_stage_model
        factor = 2 ** (len(first_stage.encoder.down) - 1) if hasattr(first_stage, "encoder") else 8

    def moments(crop: torch.Tensor) -> torch.Tensor:
        return model.encode_first_stage(crop).parameters

    return DiagonalGaussianDistribution(tiled_apply(moments, x, tile, overlap, multiple=factor))


def decode_memory_bytes(z_shape: tuple[int, ...], dtype: torch.dtype = torch.float32, factor: int = 8,
                        channels: int = 128) -> int:
    """Rough peak activation memory of an untiled SD v1 decode of latents ``z_shape`` (B, C, h, w): about six
    (B, channels, 8h, 8w) tensors alive at the last, full-resolution level (measured: 0.75 GB in float32
    at 512x512)."""
    b, _, h, w = z_shape
    return 6 * b * channels * h * factor * w * factor * torch.empty(0, dtype=dtype).element_size()


def decode_needs_tiling(z: torch.Tensor, headroom: float = 0.5) -> bool:
    """Whether an untiled decode of ``z`` would take more than ``headroom`` of the memory available now
    (CPU: ``MemAvailable``; CUDA: free device memory)."""
    need = decode_memory_bytes(tuple(z.shape), z.dtype if z.is_floating_point() else torch.float32)
    if z.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(z.device)
        return need > headroom * free
    available = available_memory_bytes()
    return available is not None and need > headroom * available
