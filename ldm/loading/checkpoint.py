"""Reading checkpoints safely and loading them into models strictly, without a second copy of the weights.

* ``.ckpt``/``.pt``/``.pth`` files are unpickled with ``weights_only=True``: nothing in the file is executed.
  The bookkeeping that original Lightning checkpoints carry beside the weights (the ``ModelCheckpoint``
  callback class used as a dict key, numpy scalars) is read into inert placeholders.
* ``.safetensors`` files are memory-mapped like ``.ckpt`` files: a tensor is only read when it is used.
* A diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ...) is read, memory-mapped, under the original
  keys (:mod:`ldm.loading.diffusers_format`), as the single file it corresponds to.
* Loading is strict: every key of the model must be present with its shape, and every key of the file must
  be used. The few keys real SD checkpoints carry that this code does not define are listed once, below.
* :func:`load_weights_into` loads a file or a state dict into a module; a tensor that must change (cast to
  ``dtype``, or a convolution kernel re-laid out channels_last) is converted on its own, and a ``release``
  callback may let go of its source at once (:mod:`ldm.loading.build` drops its file pages).
"""
from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ldm.backend.layout import is_conv_kernel
from ldm.errors import CheckpointError, first_line
from ldm.loading import diffusers_format
from ldm.loading.safetensors import read_safetensors

# Keys found in real SD v1 checkpoints that the model does not define (transformers < 5 saved CLIP's
# position ids, which transformers 5 keeps as a non-persistent buffer).
IGNORED_KEYS = frozenset({
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
})
# transformers < 5 nested CLIPTextModel's modules under ``text_model``; transformers 5 does not.
LEGACY_PREFIXES = {"cond_stage_model.transformer.text_model.": "cond_stage_model.transformer."}
EMA_PREFIX = "model_ema."
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class _Inert:
    """Stands in for a non-tensor object of a Lightning checkpoint; its constructor and state are ignored."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __reduce__(self):
        return (_Inert, ())


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


def _inert_dict(*args: Any, **kwargs: Any) -> dict:
    return {}


# Globals that original SD / Lightning checkpoints reference outside the state dict, mapped to inert stand-ins.
_LIGHTNING_EXTRAS = [
    (_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_Inert, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    (OrderedDict, "pytorch_lightning.utilities.parsing.AttributeDict"),  # dict subclasses: filled item by item
    (OrderedDict, "lightning.fabric.utilities.data.AttributeDict"),
    (_inert_dict, "collections.defaultdict"),
    (_Inert, "argparse.Namespace"),
    (_inert, "numpy.core.multiarray.scalar"),
    (_inert, "numpy._core.multiarray.scalar"),
    (_Inert, "numpy.core.multiarray._reconstruct"),
    (_Inert, "numpy._core.multiarray._reconstruct"),
    (_Inert, "numpy.ndarray"),
    (_Inert, "numpy.dtype"),
    (_inert, "_codecs.encode"),
    # hyper-parameters saved as OmegaConf configs, paths and slices
    (_Inert, "omegaconf.dictconfig.DictConfig"),
    (_Inert, "omegaconf.listconfig.ListConfig"),
    (_Inert, "omegaconf.base.ContainerMetadata"),
    (_Inert, "omegaconf.base.Metadata"),
    (_Inert, "omegaconf.nodes.AnyNode"),
    (_Inert, "typing.Any"),
    (_Inert, "builtins.dict"),
    (_Inert, "builtins.list"),
    (_Inert, "builtins.int"),
    (_inert, "pathlib.PosixPath"),
    (_inert, "pathlib.WindowsPath"),
    (_inert, "builtins.slice"),
]


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(_LIGHTNING_EXTRAS), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the legacy (pre-zip) serialization cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _pickle_globals(path: Path) -> list[str] | None:
    """The ``module.name`` globals a checkpoint's pickle references (zip checkpoints: their ``data.pkl``; legacy
    ones: the pickles at the start of the file), read with ``pickletools`` (nothing is unpickled); None where
    no pickle can be read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    found, strings, stream, complete = [], [], io.BytesIO(data), 0
    try:
        while stream.tell() < len(data):  # a legacy checkpoint is several pickles, then raw storage bytes
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name == "STOP":
                    complete += 1
                elif opcode.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except (ValueError, pickle.UnpicklingError, EOFError):  # the raw bytes after the last pickle
        pass
    return found if complete else None


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")


def _unsafe_globals(path: Path) -> list[str] | None:
    """The globals of the checkpoint's pickle that the safe unpickler refuses (neither torch's own nor a Lightning
    extra read as inert data), or None where the file holds no readable pickle."""
    found = _pickle_globals(path)
    if found is None:
        return None
    extras = {name for _, name in _LIGHTNING_EXTRAS}
    return [g for g in dict.fromkeys(found) if not g.startswith(_SAFE_GLOBAL_PREFIXES) and g not in extras]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``path`` -> (state_dict, extras). Extras are the Lightning entries such as ``global_step``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if diffusers_format.is_diffusers_folder(path):  # its files, memory-mapped, under the original keys
        return diffusers_format.read_folder(path, read_state_dict), {}
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_safetensors(path), {}
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path)
        if unsafe is None:  # not a checkpoint's pickle: torch's reason would only advise turning weights_only off
            raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or not a PyTorch checkpoint "
                                  f"(its pickle cannot be read)") from None
        detail = f"it references {unsafe[0]}" if unsafe else "it builds Python objects"
        raise CheckpointError(
            f"refusing to load {path}: {detail}, which could run code when unpickled (nothing was executed); "
            f"use a .safetensors file or re-save the state dict from a trusted environment") from None
    except Exception as err:  # torch parses untrusted bytes: IndexError, struct.error, AssertionError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({first_line(err)[:200]})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state_dict, extras = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, extras = obj, {}
    else:
        raise CheckpointError(f"{path} is not a model checkpoint: expected a dict with a 'state_dict' entry "
                              f"or a dict of tensors")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entry '{bad[0]}' is not a tensor")
    return dict(state_dict), extras


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``.ckpt`` or ``.safetensors`` file (tensors memory-mapped where possible)."""
    return read_checkpoint(path)[0]


def normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map keys of older layouts to this code's (see :data:`LEGACY_PREFIXES`) and drop :data:`IGNORED_KEYS`."""
    out = {}
    for key, value in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        for old, new in LEGACY_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _names(keys: list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def match_state_dict(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                     source: str = "checkpoint", ignore_prefixes: tuple[str, ...] = (),
                     optional_prefixes: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check ``state_dict`` against the model's ``expected`` entries; return (usable state dict, notes).

    Raises :class:`CheckpointError` naming missing, unexpected or mis-shaped keys. Notes are one-line remarks
    for the user (e.g. EMA weights present but not used).
    """
    sd = {k: v for k, v in normalize_keys(state_dict).items() if not k.startswith(ignore_prefixes or ("\0",))}
    notes = []
    model_has_ema = any(k.startswith(EMA_PREFIX) for k in expected)
    file_ema = [k for k in sd if k.startswith(EMA_PREFIX)]
    if file_ema and not model_has_ema:
        for k in file_ema:
            del sd[k]
        notes.append(f"{source} has EMA weights (model_ema.*); they are ignored because the config sets "
                     f"use_ema: False")
    if model_has_ema and not file_ema:
        raise CheckpointError(f"{source} has no EMA weights (model_ema.*) but the config sets use_ema: True; "
                              f"set model.params.use_ema: False to use its weights")

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not k.startswith(optional_prefixes or ("\0",))]
    for k in [k for k in sd if k not in expected]:
        del sd[k]
    if missing:
        for prefix, part in (("first_stage_model.", "autoencoder"), ("cond_stage_model.", "text encoder"),
                             ("model.diffusion_model.", "UNet")):
            wanted = [k for k in expected if k.startswith(prefix)]
            if wanted and all(k in missing for k in wanted):
                raise CheckpointError(f"{source} has no {part} weights ({prefix}*): it does not fit this config "
                                      f"({len(missing)} keys missing)")
        raise CheckpointError(f"{source} does not fit the config: {len(missing)} keys missing: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{source} does not fit the config: {len(unexpected)} unexpected keys: "
                              f"{_names(unexpected)}")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
             if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{source} does not fit the config: {len(wrong)} tensors have other shapes "
                              f"(checkpoint vs model): {_names(wrong, 3)}")
    return sd, notes


Release = Callable[[torch.Tensor], None]  # lets go of a converted source tensor's file pages


def _cast_like(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
               memory_format: torch.memory_format = torch.preserve_format,
               release: Release | None = None, as_stored: bool = False) -> dict[str, torch.Tensor]:
    """Give each tensor the model's dtype (or ``dtype`` for floating module weights, or with ``as_stored`` the
    dtype it has in the file) and, for convolution kernels, ``memory_format``; one tensor at a time, calling
    ``release`` on each converted source."""
    for key in list(sd):
        value, target = sd[key], expected[key]
        if not value.is_floating_point() or not target.is_floating_point():
            want = target.dtype
        elif "." in key and (as_stored or dtype is not None):  # module weights; schedules (no dot) stay float32
            want = value.dtype if as_stored else dtype
        else:
            want = target.dtype
        fmt = memory_format if is_conv_kernel(value) and memory_format != torch.preserve_format else None
        if value.dtype == want and (fmt is None or value.is_contiguous(memory_format=fmt)):
            continue
        sd[key] = value.to(want, memory_format=fmt or torch.preserve_format, copy=True)
        if release is not None:
            release(value)
    return sd


def load_weights_into(module: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *,
                      ignore_prefixes: tuple[str, ...] = (), optional_prefixes: tuple[str, ...] = (),
                      dtype: torch.dtype | None = None, assign: bool = False, verbose: bool = True,
                      name: str | None = None, memory_format: torch.memory_format = torch.preserve_format,
                      release: Release | None = None) -> list[str]:
    """Strictly load a checkpoint file (or a state dict) into ``module``; returns the notes printed.

    ``memory_format`` (e.g. ``torch.channels_last``) is given to the convolution kernels while loading;
    ``release`` is called on each source tensor that was converted (e.g. to drop its file pages).
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "state dict")
    state_dict = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    return _load(module, state_dict, name, ignore_prefixes, optional_prefixes, dtype, memory_format, assign,
                 verbose, release)


def _load(module: nn.Module, state_dict: dict[str, torch.Tensor], name: str, ignore_prefixes: tuple[str, ...],
          optional_prefixes: tuple[str, ...], dtype: torch.dtype | None, memory_format: torch.memory_format,
          assign: bool, verbose: bool, release: Release | None, as_stored: bool = False) -> list[str]:
    expected = module.state_dict(keep_vars=True)
    sd, notes = match_state_dict(expected, state_dict, name, ignore_prefixes, optional_prefixes)
    state_dict.clear()
    sd = _cast_like(sd, expected, dtype, memory_format, release, as_stored)
    module.load_state_dict(sd, strict=True, assign=assign)
    if verbose:
        for note in notes:
            print(note)
    return notes
