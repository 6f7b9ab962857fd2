"""The device and the precision a run computes in, and the autoencoder decode that falls back to float32.

* :func:`resolve_device` -- ``auto`` is CUDA, then MPS, then the CPU;
* :func:`resolve_precision` -- what ``--precision full|autocast|bf16|fp16`` means on that device (the one place
  that decides it);
* :func:`decode_first_stage` -- the VAE decode, redone in float32 when a reduced-precision decode overflows.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from ldm.backend.onednn import computes_bf16_natively
from ldm.errors import DeviceError, InputError

PRECISIONS = ("full", "autocast", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA, else MPS, else CPU; an explicit device must be present here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}'; use one of {', '.join(DEVICES)} (or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"--device {name}: Apple MPS is not available on this machine; use --device cpu or auto")
    elif device.type != "cpu":
        raise InputError(f"unsupported device '{name}'; use one of {', '.join(DEVICES)}")
    return device


@dataclass(frozen=True)
class Precision:
    """How the model computes: weights dtype, and the autocast dtype (None: no autocast)."""

    name: str
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None

    def context(self, device: torch.device) -> ContextManager:
        """The autocast context for ``device`` (a null context without autocast)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @property
    def label(self) -> str:
        """Short name of what is actually used: fp32, bf16 or fp16."""
        dtype = self.autocast_dtype or self.weight_dtype
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``full``: float32; ``autocast``: fp16 autocast over float32 weights on CUDA (as the original), bfloat16
    weights and compute on a CPU that computes bf16 in hardware as oneDNN may use it (faster there than float32
    weights under autocast, and half the memory), else plain float32; ``bf16``/``fp16``: weights cast to that
    dtype, computed under autocast (on any CPU; without hardware bf16 through torch's slower kernels)."""
    if name == "full":
        return Precision(name, torch.float32, None)
    if name == "autocast":
        if device.type == "cuda":
            return Precision(name, torch.float32, torch.float16)
        if device.type == "cpu" and computes_bf16_natively():
            return Precision(name, torch.bfloat16, torch.bfloat16)
        return Precision(name, torch.float32, None)
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                              f"use --precision fp16 or full")
        return Precision(name, torch.bfloat16, torch.bfloat16)
    if name == "fp16":
        return Precision(name, torch.float16, torch.float16)
    raise InputError(f"unknown precision '{name}'; use one of {', '.join(PRECISIONS)}")


def slow_precision_notice(precision: Precision, device: torch.device) -> str | None:
    """A notice when ``precision`` computes through slow kernels on ``device``, else None."""
    if device.type == "cpu" and precision.autocast_dtype == torch.bfloat16 and not computes_bf16_natively():
        return ("notice: this CPU has no bfloat16 arithmetic oneDNN may use (AVX512-BF16/AMX); --precision bf16 "
                "runs through slower kernels here, --precision full is faster")
    return None


def decode_first_stage(model: Any, z: torch.Tensor,
                       decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``model.decode_first_stage(z)``; when a reduced-precision decode gives non-finite values, the
    autoencoder is decoded again in float32 (its weights are cast for that call, then restored).

    ``decode`` (default ``model.decode_first_stage``) is the decode to call, e.g. a tiled one.
    """
    decode = decode or model.decode_first_stage
    first_stage = model.first_stage_model
    dtype = next(first_stage.parameters()).dtype
    autocast_on = torch.is_autocast_enabled(z.device.type)
    x = decode(z)
    if torch.isfinite(x).all() or (dtype == torch.float32 and not autocast_on):
        return x
    first_stage.float()
    try:
        with torch.autocast(z.device.type, enabled=False):
            x = decode(z.float())
    finally:
        first_stage.to(dtype)
    return x
