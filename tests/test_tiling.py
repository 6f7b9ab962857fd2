"""Tiled autoencoder decode/encode: exact on local operations, close to the untiled autoencoder, no seams."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.inference.tiling import (
    decode_memory_bytes,
    decode_needs_tiling,
    tile_starts,
    tiled_apply,
    tiled_decode,
    tiled_encode,
)


@pytest.mark.parametrize("size,tile,overlap,multiple", [(10, 4, 1, 1), (64, 16, 4, 1), (40, 16, 8, 8), (7, 8, 2, 1),
                                                        (33, 8, 3, 1)])
def test_tiles_cover_with_overlap(size, tile, overlap, multiple):
    starts = tile_starts(size, tile, overlap, multiple)
    assert starts[0] == 0 and min(starts[-1] + tile, size) == size
    assert all(s % multiple == 0 for s in starts)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_starts(64, 8, 8)


@pytest.mark.parametrize("tile,overlap", [(4, 1), (5, 2), (8, 4), (16, 4)])
def test_tiling_is_exact_for_pixelwise_decoders(tile, overlap):
    """A decoder without spatial context (x8 nearest upsampling of a pixelwise map) is reproduced exactly:
    the blend weights of every pixel sum to one and tiles land where they belong."""
    z = torch.randn(2, 4, 13, 11)

    def decode(t):
        return F.interpolate(torch.tanh(t[:, :3] * 2 + t[:, 3:]), scale_factor=8, mode="nearest")

    torch.testing.assert_close(tiled_apply(decode, z, tile, overlap), decode(z))


def test_tiling_is_exact_for_blockwise_encoders():
    x = torch.randn(1, 3, 96, 80)

    def encode(t):
        return F.avg_pool2d(t, 8) * 3

    torch.testing.assert_close(tiled_apply(encode, x, 32, 16, multiple=8), encode(x))


def test_one_tile_is_the_untiled_decode(tiny_model):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tiled_decode(tiny_model, z, tile=8, overlap=2), tiny_model.decode_first_stage(z))


def _column_steps(img: torch.Tensor) -> torch.Tensor:
    return (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))


def test_tiled_decode_has_no_seams(tiny_model):
    """Tiles of 8 latents overlapping by 4 on a 24x24 latent: the pixel-to-pixel step at every tile border
    stays within 2x the image's median step (blended: 1.2x; tiles pasted without blending: 3.8x)."""
    torch.manual_seed(0)
    z = F.interpolate(torch.randn(1, 4, 6, 6), size=(24, 24), mode="bilinear")
    with torch.no_grad():
        tiled = tiled_decode(tiny_model, z, tile=8, overlap=4)
    starts = tile_starts(24, 8, 4)
    borders = sorted({8 * s - 1 for s in starts[1:]} | {8 * (s + 8) - 1 for s in starts[:-1]} - {191})
    steps = _column_steps(tiled)
    assert steps[borders].max() < 2 * steps.median()
    assert _column_steps(tiled.transpose(-1, -2))[borders].max() < 2 * steps.median()


def test_tiled_decode_approaches_the_untiled_one(tiny_model):
    """Each tile normalises and attends within itself, so tiles differ from the whole; larger tiles differ
    less, and a tile covering the latent is the untiled decode. (The tiny random decoder sees the whole
    image: measured 0.57, 0.42 and 0.23 relative error for tiles 8/4, 12/4 and 16/8.)"""
    torch.manual_seed(0)
    z = F.interpolate(torch.randn(1, 4, 6, 6), size=(24, 24), mode="bilinear")
    with torch.no_grad():
        full = tiny_model.decode_first_stage(z)
        errors = [((tiled_decode(tiny_model, z, tile, overlap) - full).norm() / full.norm()).item()
                  for tile, overlap in ((8, 4), (12, 4), (16, 8), (24, 4))]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[2] < 0.3 and errors[3] < 1e-6


def test_tiled_encode_matches_on_one_tile_and_approaches_on_many(tiny_model):
    torch.manual_seed(0)
    x = F.interpolate(torch.rand(1, 3, 12, 12) * 2 - 1, size=(128, 128), mode="bilinear")
    with torch.no_grad():
        full = tiny_model.encode_first_stage(x)
        one = tiled_encode(tiny_model, x, tile=128, overlap=32)
        small, large = (tiled_encode(tiny_model, x, tile=t, overlap=32) for t in (64, 96))
    torch.testing.assert_close(one.mean, full.mean)
    torch.testing.assert_close(one.logvar, full.logvar)
    errors = [((p.mean - full.mean).norm() / full.mean.norm()).item() for p in (small, large)]
    assert small.mean.shape == full.mean.shape and errors[1] < errors[0] and errors[1] < 0.3


def test_decode_memory_estimate_and_decision():
    assert decode_memory_bytes((1, 4, 64, 64)) == 6 * 128 * 512 * 512 * 4
    assert decode_memory_bytes((1, 4, 64, 64), torch.bfloat16) * 2 == decode_memory_bytes((1, 4, 64, 64))
    assert not decode_needs_tiling(torch.zeros(1, 4, 8, 8))
    assert decode_needs_tiling(torch.zeros(1, 4, 4096, 4096, device="meta"))
