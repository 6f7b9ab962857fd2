"""Deterministic stand-in weights for full-size models: the rule of the reference data (tests/fixtures/REFERENCE.md).

Tests and benchmarks use them to build full-size models offline, without a real checkpoint.

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


def write_deterministic_checkpoint(config, path, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """Save a checkpoint in the original layout ({"state_dict": ...}) with deterministic weights for ``config``."""
    from ldm.loading.build import parameters_on_meta
    from ldm.util import instantiate_from_config

    model_config = config.model if "model" in config else config
    with parameters_on_meta():
        model = instantiate_from_config(model_config)
    state_dict = det_state_dict(model.state_dict(), seed)
    del model
    if dtype != torch.float32:
        state_dict = {k: v.to(dtype) if v.is_floating_point() and "." in k else v for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "global_step": 0}, path)
