"""Reading checkpoints safely and loading them into models strictly, without a second copy of the weights.

* ``.ckpt``/``.pt``/``.pth`` files are unpickled with ``weights_only=True``: nothing in the file is executed.
  The bookkeeping that original Lightning checkpoints carry beside the weights (the ``ModelCheckpoint``
  callback class used as a dict key, numpy scalars) is read into inert placeholders.
* ``.safetensors`` files are memory-mapped like ``.ckpt`` files: a tensor is only read when it is used.
* A diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ...) is read, memory-mapped, under the original
  keys (:mod:`ldm.diffusers_format`), as the single file it corresponds to.
* Loading is strict: every key of the model must be present with its shape, and every key of the file must
  be used. The few keys real SD checkpoints carry that this code does not define are listed once, below.
* :func:`load_model_from_config` builds the model with its parameters on the ``meta`` device and assigns the
  (memory-mapped) checkpoint tensors to it, so the weights are never held twice. A tensor that must change
  (cast to ``dtype``, or a convolution kernel re-laid out channels_last) is converted on its own, and the
  file pages it came from are released right away (``madvise``), so converting never holds both copies.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import mmap
import os
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ldm import diffusers_format
from ldm.errors import LdmError
from ldm.precision import is_conv_kernel, preferred_memory_format
from ldm.util import instantiate_from_config

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


class CheckpointError(LdmError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line for the user."""


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
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # the legacy (pre-zip) serialization cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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
        return _read_safetensors(path), {}
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)|(Can only build)", str(err))
        if found is None:  # quote torch's reason, not its advice to turn weights_only off
            reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
            detail = reason.group(1) if reason else _first_line(err)
            raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or not a PyTorch checkpoint "
                                  f"({detail[:200]})") from None
        detail = f"it references {found.group(1)}" if found.group(1) else "it builds Python objects"
        raise CheckpointError(
            f"refusing to load {path}: {detail}, which could run code when unpickled (nothing was executed); "
            f"use a .safetensors file or re-save the state dict from a trusted environment") from None
    except Exception as err:  # torch parses untrusted bytes: IndexError, struct.error, AssertionError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({_first_line(err)[:200]})") from None
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one private memory map of it (no data is read yet)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: not a valid safetensors file ({why})")

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad("shorter than its 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n < 2 or n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise bad(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise bad(_first_line(err)[:200]) from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_size = 8 + n, size - 8 - n
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if data_size else None
    out = {}
    for key, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry '{key}' has no valid dtype, shape and data_offsets") from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != numel * itemsize:
            raise bad(f"entry '{key}' lies outside the data or does not match its shape")
        offset = start + begin
        if numel == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        elif offset % itemsize == 0:
            out[key] = torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)
        else:  # unaligned: copy the bytes out
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, [end - begin])
            out[key] = raw.clone().view(dtype).reshape(shape)
    return out


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


def _file_mappings(paths: tuple[str, ...] | None) -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of ``paths``, or of any file when ``paths`` is None
    (Linux; empty elsewhere)."""
    if paths == () or not sys.platform.startswith("linux"):
        return []
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                name = fields[5].strip() if len(fields) == 6 else ""
                if fields[1].endswith("p") and (name in paths if paths else name.startswith("/")):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


class _FilePages:
    """This process's private mappings of ``paths`` (or of any file), whose clean pages can be dropped.

    A page that ``/proc/self/pagemap`` shows as an unmodified file page is dropped with ``MADV_DONTNEED``; if it
    is used again it faults back in from the page cache (or the file) with the same bytes, so dropping can never
    change a value. A page written after mapping (a private copy) is kept. Linux only; elsewhere nothing happens.
    """

    def __init__(self, paths: tuple[str, ...] | None = None):
        self.ranges = _file_mappings(paths)
        self.madvise = None
        if self.ranges:
            try:
                self.madvise = _libc_madvise()
            except (OSError, AttributeError):
                self.ranges = []

    @classmethod
    def of(cls, path: str | Path) -> _FilePages:
        files = diffusers_format.all_weight_files(path) if Path(path).is_dir() else [path]
        return cls(tuple({name for f in files for name in (str(Path(f)), os.path.realpath(f))}))

    def drop(self, lo: int, hi: int) -> int:
        """Drop the clean pages under the bytes [lo, hi) of one mapping; returns the bytes dropped."""
        span = next(((a, b) for a, b in self.ranges if a <= lo < b), None)
        if span is None or hi <= lo:
            return 0
        page = mmap.PAGESIZE
        first, last = lo // page * page, min(-(-hi // page) * page, span[1])
        n = (last - first) // page
        try:
            with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                entries = np.frombuffer(os.pread(pagemap.fileno(), 8 * n, first // page * 8), dtype=np.uint64)
        except OSError:
            return 0
        if len(entries) != n:
            return 0
        present, file_page = ((entries >> np.uint64(bit)) & np.uint64(1) for bit in (63, 61))
        droppable = np.flatnonzero((present == 1) & (file_page == 1))
        dropped = 0
        breaks = np.flatnonzero(np.diff(droppable) != 1)  # runs of consecutive pages, one madvise each
        for start, stop in zip(np.r_[0, breaks + 1], np.r_[breaks, droppable.size - 1]) if droppable.size else ():
            a, b = first + int(droppable[start]) * page, first + (int(droppable[stop]) + 1) * page
            if self.madvise(a, b - a, mmap.MADV_DONTNEED) == 0:
                dropped += b - a
        return dropped

    def release(self, t: torch.Tensor) -> None:
        """Drop the pages that lie wholly inside a tensor whose data is no longer needed (a converted source).
        The pages it shares with its neighbours stay: faulting one back in would map its neighbours again."""
        if t.device.type == "cpu" and t.is_contiguous():
            page = mmap.PAGESIZE
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            self.drop(-(-lo // page) * page, hi // page * page)


def _libc_madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def release_file_pages(module: nn.Module) -> int:
    """Hand the memory-mapped checkpoint pages under ``module``'s CPU tensors back to the page cache; returns
    the bytes released from this process (Linux; 0 elsewhere).

    Weights loaded memory-mapped (float32 ``.ckpt``) stay in the file's pages. A model part that is not needed
    for a while (the UNet while the autoencoder decodes) need not count in the process's memory: its clean pages
    are dropped and fault back in when next used. A weight written after loading keeps its value (see
    :class:`_FilePages`).
    """
    pages = _FilePages()
    if not pages.ranges:
        return 0
    storages = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(pages.drop(lo, lo + size) for lo, size in storages.items())


def _cast_like(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
               memory_format: torch.memory_format = torch.preserve_format,
               release: _FilePages | None = None, as_stored: bool = False) -> dict[str, torch.Tensor]:
    """Give each tensor the model's dtype (or ``dtype`` for floating module weights, or with ``as_stored`` the
    dtype it has in the file) and, for convolution kernels, ``memory_format``; one tensor at a time, releasing
    the file pages of each converted source."""
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
            release.release(value)
    return sd


def load_weights_into(module: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *,
                      ignore_prefixes: tuple[str, ...] = (), optional_prefixes: tuple[str, ...] = (),
                      dtype: torch.dtype | None = None, assign: bool = False, verbose: bool = True,
                      name: str | None = None,
                      memory_format: torch.memory_format = torch.preserve_format) -> list[str]:
    """Strictly load a checkpoint file (or a state dict) into ``module``; returns the notes printed.

    ``memory_format`` (e.g. ``torch.channels_last``) is given to the convolution kernels while loading.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "state dict")
    if isinstance(source, (str, Path)):
        state_dict, release = read_state_dict(source), _FilePages.of(source)
    else:
        state_dict, release = dict(source), None
    return _load(module, state_dict, name, ignore_prefixes, optional_prefixes, dtype, memory_format, assign,
                 verbose, release)


def _load(module: nn.Module, state_dict: dict[str, torch.Tensor], name: str, ignore_prefixes: tuple[str, ...],
          optional_prefixes: tuple[str, ...], dtype: torch.dtype | None, memory_format: torch.memory_format,
          assign: bool, verbose: bool, release: _FilePages | None, as_stored: bool = False) -> list[str]:
    expected = module.state_dict(keep_vars=True)
    sd, notes = match_state_dict(expected, state_dict, name, ignore_prefixes, optional_prefixes)
    state_dict.clear()
    sd = _cast_like(sd, expected, dtype, memory_format, release, as_stored)
    module.load_state_dict(sd, strict=True, assign=assign)
    if verbose:
        for note in notes:
            print(note)
    return notes


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, new parameters are created on the ``meta`` device (no memory, no init cost).

    Buffers stay real, so schedules and non-persistent buffers computed in constructors survive; the
    parameters are then replaced by checkpoint tensors with ``load_state_dict(..., assign=True)``.
    """
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_model_from_config(config: Any, ckpt: str | Path | None, *, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None, verbose: bool = False,
                           memory_format: torch.memory_format | None = None, as_stored: bool = False) -> nn.Module:
    """Build ``config.model`` and load ``ckpt`` into it; returns the model in eval mode on ``device``.

    ``config`` is the whole OmegaConf config (with a ``model`` entry) or the model entry itself.
    ``dtype`` (e.g. ``torch.bfloat16``) casts the module weights while loading; schedule buffers stay float32.
    ``memory_format`` of the convolution kernels defaults to the faster one for ``device`` and ``dtype``
    (:func:`ldm.precision.preferred_memory_format`); the UNet and the autoencoder compute in their kernels'
    format. ``as_stored`` keeps every module weight as the file stores it (dtype and layout, memory-mapped,
    nothing converted; :class:`ldm.residency.PartWeights` converts a part when it is used).
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
    _load(model, state_dict, str(ckpt), (), (), dtype, memory_format, True, True, _FilePages.of(ckpt), as_stored)
    del state_dict
    return model.eval().to(device)
