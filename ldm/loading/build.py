"""Building a model from its config with the checkpoint's weights, without holding the weights twice.

:func:`load_model_from_config` builds the model with its parameters on the ``meta`` device
(:func:`parameters_on_meta`) and assigns the (memory-mapped) checkpoint tensors to it. A tensor that must change
(cast to ``dtype``, or a convolution kernel re-laid out channels_last) is converted on its own, and the file pages
it came from are dropped right away, so converting never holds both copies.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ldm.backend.layout import preferred_memory_format
from ldm.backend.memory import FilePages
from ldm.loading import diffusers_format
from ldm.loading.checkpoint import _load, read_checkpoint
from ldm.util import instantiate_from_config

_meta_threads: set[int] = set()
_meta_lock = threading.Lock()
_meta_hook = None


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    """The parameter registration hook: in a thread inside :func:`parameters_on_meta`, the parameter moves to
    ``meta`` (its initialisation then costs nothing)."""
    if param is None or param.device.type == "meta" or threading.get_ident() not in _meta_threads:
        return None
    return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, parameters registered in this thread are created on the ``meta`` device (no memory, no
    init cost); other threads are not affected, and nothing stays changed after it.

    Buffers stay real, so schedules and non-persistent buffers computed in constructors survive; the
    parameters are then replaced by checkpoint tensors with ``load_state_dict(..., assign=True)``.
    """
    global _meta_hook
    me = threading.get_ident()
    with _meta_lock:
        nested = me in _meta_threads
        _meta_threads.add(me)
        if _meta_hook is None:
            _meta_hook = torch.nn.modules.module.register_module_parameter_registration_hook(_to_meta)
    try:
        yield
    finally:
        with _meta_lock:
            if not nested:
                _meta_threads.discard(me)
            if not _meta_threads and _meta_hook is not None:
                _meta_hook.remove()
                _meta_hook = None


def load_model_from_config(config: Any, ckpt: str | Path | None, *, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None, verbose: bool = False,
                           memory_format: torch.memory_format | None = None, as_stored: bool = False) -> nn.Module:
    """Build ``config.model`` and load ``ckpt`` into it; returns the model in eval mode on ``device``.

    ``config`` is the whole OmegaConf config (with a ``model`` entry) or the model entry itself.
    ``dtype`` (e.g. ``torch.bfloat16``) casts the module weights while loading; schedule buffers stay float32.
    ``memory_format`` of the convolution kernels defaults to the faster one for ``device`` and ``dtype``
    (:func:`ldm.backend.layout.preferred_memory_format`); the UNet and the autoencoder compute in their kernels'
    format. ``as_stored`` keeps every module weight as the file stores it (dtype and layout, memory-mapped,
    nothing converted; :class:`ldm.inference.residency.PartWeights` converts a part when it is used).
    Without ``ckpt`` the model keeps its random initialisation.
    """
    model_config = config.model if "model" in config else config
    if as_stored:
        dtype, memory_format = None, torch.preserve_format
    if memory_format is None:
        memory_format = preferred_memory_format(device, dtype)
    if ckpt is None:
        model = instantiate_from_config(model_config)
        if dtype is not None:
            model.to(dtype)
        return model.eval().to(device, memory_format=memory_format)
    if diffusers_format.is_diffusers_folder(ckpt):
        diffusers_format.check_fits(ckpt, model_config.get("params") or {})
    state_dict, extras = read_checkpoint(ckpt)
    if verbose and "global_step" in extras:
        print(f"Global Step: {extras['global_step']}")
    with parameters_on_meta():
        model = instantiate_from_config(model_config)
    model.checkpoint_global_step = extras.get("global_step")  # what the checkpoint says, for records of it
    _load(model, state_dict, str(ckpt), (), (), dtype, memory_format, True, True, FilePages.of(ckpt).release,
          as_stored)
    del state_dict
    return model.eval().to(device)
