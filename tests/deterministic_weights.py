"""The reference's deterministic weights rule (tests/fixtures/REFERENCE.md, "det_weights.py"), re-implemented.

Every floating-point entry whose key contains a dot (and is not ``model_ema.*``) gets a pseudo-random tensor
that depends only on its key, shape and seed; schedule buffers (keys without a dot) keep their values.
"""
from __future__ import annotations

import math
import zlib

import torch


def det_tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed((zlib.crc32(key.encode()) * 1000003 + seed) % (2 ** 62))
    leaf = key.rsplit(".", 1)[-1]
    shape = tuple(shape)
    if len(shape) >= 2:
        t = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    elif leaf == "weight":
        t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
    elif leaf == "bias":
        t = 0.05 * torch.randn(shape, generator=generator)
    else:
        t = 0.1 * torch.randn(shape, generator=generator)
    return t.half().float()


def det_state_dict(reference: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights for every entry of ``reference`` (a state dict; meta tensors are fine)."""
    out = {}
    for key, value in reference.items():
        if value.is_floating_point() and "." in key and not key.startswith("model_ema."):
            out[key] = det_tensor(key, value.shape, seed)
        else:
            out[key] = value.clone()
    return out
