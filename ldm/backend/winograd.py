"""Winograd convolution F(m x m, 3 x 3): the 3x3, stride-1, padding-1 convolutions of the UNet and the
autoencoder in float32 on the CPU with fewer multiplications.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): the output is cut into m x m
tiles; each tile's (m + 2) x (m + 2) input patch ``d`` and the kernel ``g`` are transformed,
``V = B^T d B`` and ``U = G g G^T``, multiplied point by point (one matrix product over the channels for each of
the (m + 2)^2 points) and transformed back, ``Y = A^T [U . V] A``. A 3x3 convolution takes 9 multiplications per
output pixel and channel pair; F(2x2) takes 16/4 = 4, F(4x4) 36/16 = 2.25. In float32 the result is within
about 3e-6 (F(2x2)) and 6e-5 (F(4x4)) of the output's scale from the exact one; the direct convolution about
2e-6 (the reference tolerance of the whole model is 1e-3).

The kernel is transformed at each call, from the weight as it lies (in blocks of output channels): no copy of
it is kept.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Output pixels (H x W) from which each tile size pays over oneDNN's direct convolution, measured on the
# SD v1 UNet and autoencoder (2-core AVX-512 CPU): F(4x4) from the 64x64 latent up, F(2x2) from 16x16.
MIN_PIXELS = {4: 64 * 64, 2: 16 * 16}
MIN_CHANNELS = 64  # below this the transforms cost more than the product saves
_MAX_CHUNK_BYTES = 32 << 20  # transformed input tiles, and transformed kernel, held at once

# Interpolation points 0, 1, -1 (F(2x2)) and 0, 1, -1, 2, -2 (F(4x4)), plus the point at infinity.
_TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],  # B^T
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],  # G
        [[1, 1, 1, 0], [0, 1, -1, -1]]),  # A^T
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


@functools.cache
def _matrices(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D transforms for F(m x m, 3 x 3) as float32 matrices over flattened tiles (Kronecker products of
    the 1-D ones): input (a^2, a^2), kernel (a^2, 9), output (m^2, a^2), with a = m + 2."""
    bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in _TRANSFORMS[m])
    return tuple(torch.kron(t, t).float() for t in (bt, g, at))


def tile_size(shape: torch.Size, in_channels: int, out_channels: int) -> int:
    """The output tile size m that pays for an input of ``shape`` (B, C, H, W), or 0 for the direct convolution."""
    h, w = shape[-2:]
    if min(in_channels, out_channels) < MIN_CHANNELS:
        return 0
    for m in (4, 2):
        if h * w >= MIN_PIXELS[m] and h % m == 0 and w % m == 0:
            return m
    return 0


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=1) (+ residual)`` by F(m x m, 3 x 3), m in (2, 4).

    x: (B, C_in, H, W) float32 with H and W multiples of m; weight: (C_out, C_in, 3, 3), contiguous;
    residual: (B, C_out, H, W). The result has ``x``'s memory format.
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    a = m + 2
    to_tiles, kernel_transform, from_tiles = _matrices(m)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, C), channels innermost
    s_b, s_h, s_w, _ = padded.stride()
    rows, cols = height // m, width // m
    layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    out = torch.empty(batch, out_channels, height, width, dtype=x.dtype, device=x.device, memory_format=layout)
    out_tiles = out.permute(0, 2, 3, 1).view(batch, rows, m, cols, m, out_channels)
    res_tiles = None if residual is None else residual.permute(0, 2, 3, 1).view(
        batch, rows, m, cols, m, out_channels)
    # tile rows per pass and output channels per kernel block, so that neither V nor U is held whole
    step = max(1, _MAX_CHUNK_BYTES // (a * a * batch * cols * max(channels, out_channels) * 4))
    block = max(1, _MAX_CHUNK_BYTES // (a * a * channels * 4))
    taps = weight.view(out_channels, channels * 9)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        tiles = padded.as_strided((a, a, batch, n, cols, channels), (s_h, s_w, s_b, m * s_h, m * s_w, 1),
                                  padded.storage_offset() + r0 * m * s_h)
        count = batch * n * cols
        v = torch.mm(to_tiles, tiles.reshape(a * a, count * channels)).view(a * a, count, channels)  # B^T d B
        for o0 in range(0, out_channels, block):
            o1 = min(o0 + block, out_channels)
            # G g G^T for this block of output channels, (a^2, C_out block, C_in): from the weight as it lies
            u = torch.mm(kernel_transform, taps[o0:o1].view(-1, 9).t()).view(a * a, o1 - o0, channels)
            prod = torch.bmm(v, u.transpose(1, 2))  # (a^2, tiles, C_out block): a matrix product per point
            if bias is not None:  # column (1, 1) of A^T (x) A^T is all ones: the bias reaches every output pixel
                prod[a + 1].add_(bias[o0:o1])
            y = torch.mm(from_tiles, prod.view(a * a, -1)).view(m, m, batch, n, cols, o1 - o0)  # A^T M A
            y = y.permute(2, 3, 0, 4, 1, 5)  # (B, rows, m, cols, m, C_out block)
            target = out_tiles[:, r0:r0 + n, :, :, :, o0:o1]
            if res_tiles is None:
                target.copy_(y)
            else:
                torch.add(y, res_tiles[:, r0:r0 + n, :, :, :, o0:o1], out=target)
    return out
