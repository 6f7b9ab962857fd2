"""Small helpers shared by the whole package (the original's ``ldm/util.py`` surface)."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from inspect import isfunction
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Mapping) -> Any:
    """Build ``config["target"](**config.get("params", {}))``.

    The two sentinel strings the original configs use for the conditioning stage
    (``__is_first_stage__``, ``__is_unconditional__``) return ``None``.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def user_cache_dir() -> Path:
    """Where the package keeps what it can rebuild: ``$XDG_CACHE_HOME/ldm``, else ``~/.cache/ldm``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"


def write_json_atomically(path: Path, data: Any, prefix: str = ".tmp-") -> None:
    """Write ``data`` as JSON to ``path`` whole or not at all (a temporary file beside it, then renamed); raises
    OSError where it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` if it is not None, else ``d`` (called first when it is a function)."""
    if exists(val):
        return val
    return d() if isfunction(d) else d


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def count_params(model: nn.Module, verbose: bool = False) -> int:
    total_params = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total_params * 1.e-6:.2f} M params.")
    return total_params


def ismap(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and len(x.shape) == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and len(x.shape) == 4 and x.shape[1] in (1, 3)


def log_txt_as_img(wh: tuple[int, int], xc: list[str], size: int = 10) -> torch.Tensor:
    """Render captions as images, (B, 3, H, W) in [-1, 1], for Lightning image logs."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    txts = []
    for caption in xc:
        txt = Image.new("RGB", wh, color="white")
        draw = ImageDraw.Draw(txt)
        font = ImageFont.load_default()
        nc = max(1, int(40 * (wh[0] / 256)))
        lines = "\n".join(textwrap.wrap(str(caption), nc))
        draw.text((0, 0), lines, fill="black", font=font)
        txts.append(np.array(txt).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(txts), dtype=torch.float32)
