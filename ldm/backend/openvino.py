"""OpenVINO as an inference engine for the CPU: PyTorch modules converted, compiled per input shape, cached on disk.

    part = OpenVINOPart("unet", call, weights=unet, axes=[{0: ("batch", 1), 2: ("height", 8), 3: ("width", 8)},
                        {0: ("batch", 1)}, {0: ("batch", 1)}], cache_dir=default_cache_dir(), code=digest)
    (eps,) = part(x, t, context, precision="fp32")     # torch tensors in, float32 torch tensors out

This module knows modules and tensors, not the model: :mod:`ldm.inference.openvino` builds the diffusion model's
four networks from it.

Conversion. A module is exported with ``torch.export`` (the ``axes`` symbolic: any batch and image size) and
converted by ``openvino.convert_model``, outside any autocast. ``torch.export`` traces with
``torch.compiler.is_compiling()`` true, where the CPU fast paths of :mod:`ldm.modules.ops` (oneDNN's fused and
prepacked ops, Winograd) give way to torch's public ops; a graph that still holds an op outside ``aten`` and
``prims`` is refused (:class:`OpenVINOConversionError`). Weights are traced in float32 whatever their stored dtype.

Compilation. Each input shape is compiled on its own (static shapes: OpenVINO plans memory and picks kernels for
it), in float32 (``INFERENCE_PRECISION_HINT`` f32, also where OpenVINO would pick bf16 by itself) or in bfloat16
where :func:`cpu_computes_bf16`, from the converted model at every run. OpenVINO's own compiled-model cache is not
used: on the CPU, compiling is mostly packing the weights, which a weightless cached blob does too, and the cache
first hashes every weight (SD v1's UNet, 2-core Zen 5: 2.9 s compiled afresh, 5.4 s from that cache).

Cache (``~/.cache/ldm/openvino`` or ``cache_dir``). One entry per network and weights:
``<name>-<key>/model.xml|.bin`` (the converted model, float32 weights), read memory-mapped and left in the page
cache for the next run. The key covers the checkpoint hash given by the caller, a sample of the module's weights,
its structure, the digest of its source code and the torch, transformers and OpenVINO versions. An entry is written
in a temporary folder and renamed into place; one that fails its checks (sizes, checksums, OpenVINO's reader) is
discarded and rebuilt. An entry that another one supersedes (the same network, made by other code or library
versions) is removed once it has gone unused for a day (:func:`remove_superseded`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ldm.backend.memory import releasing_mapped_file
from ldm.errors import LdmError, first_line
from ldm.util import user_cache_dir

FORMAT = 1  # of a cache entry; bump when what is exported or how it is stored changes
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> OpenVINO's INFERENCE_PRECISION_HINT
# temporary folders of crashed conversions, and entries superseded by a newer one, untouched this long are removed
_STALE_SECONDS = 24 * 3600
# what makes two entries the same network: a newer entry for these (other code, libraries or format) supersedes
_SAME_NETWORK = ("part", "checkpoint", "weights", "inputs")


class OpenVINOConversionError(LdmError, RuntimeError):
    """A network could not be converted to OpenVINO (the message says which one, and why)."""


# ---------------------------------------------------------------------------------------------- availability
def available() -> bool:
    """Whether the ``openvino`` package is installed (nothing is imported)."""
    return importlib.util.find_spec("openvino") is not None


@functools.cache
def core():
    """The process's ``openvino.Core`` (created at the first call)."""
    import openvino

    return openvino.Core()


def openvino_version() -> str:
    import openvino

    return openvino.get_version()


def cpu_computes_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 on this CPU (AVX512-BF16 or AMX: ``BF16`` among the
    device's ``OPTIMIZATION_CAPABILITIES``)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def inference_precision_hint(precision: str) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for ``precision`` (``fp32`` or ``bf16``); bf16 only where the CPU
    computes it (elsewhere OpenVINO would quietly run float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision '{precision}' unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not cpu_computes_bf16():
        raise ValueError("this CPU has no bfloat16 arithmetic OpenVINO uses (AVX512-BF16 or AMX); use fp32")
    return PRECISIONS[precision]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ldm/openvino``, else ``~/.cache/ldm/openvino``."""
    return user_cache_dir() / "openvino"


# ---------------------------------------------------------------------------------------------- cache keys
def weights_fingerprint(module: nn.Module, samples: int = 16) -> str:
    """sha256 over the names, shapes and dtypes of ``module``'s state and the first and last ``samples // 2``
    values of each tensor: tells checkpoints (and EMA from plain weights) apart while reading at most two pages
    per tensor of a memory-mapped checkpoint (evenly spaced samples read 16, which on a cold page cache cost SD v1
    3.7 s of a cached OpenVINO run)."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            half = samples // 2
            index = torch.arange(t.numel()) if t.numel() <= samples else \
                torch.cat([torch.arange(half), torch.arange(t.numel() - half, t.numel())])
            values = t[torch.unravel_index(index, t.shape)] if t.dim() else t.reshape(1)
            digest.update(values.to(torch.float64 if t.is_floating_point() else torch.int64).numpy().tobytes())
    return digest.hexdigest()


def structure_digest(module: nn.Module) -> str:
    """sha256 of the module tree's repr (layer types and their settings)."""
    return hashlib.sha256(repr(module).encode()).hexdigest()


def source_digest(module: nn.Module, package: str = "ldm") -> str:
    """sha256 of the source that defines ``module``'s computation: the files of ``package``'s Python modules whose
    classes make up its tree and, transitively, of the ``package`` modules whose names those use (functions,
    classes, modules), with this file. Libraries outside ``package`` are covered by their versions. An edit
    elsewhere (the samplers, the command line) keeps the cache."""
    return _files_digest(source_modules(module, package))


def source_modules(module: nn.Module, package: str = "ldm") -> frozenset[str]:
    """The ``package`` modules :func:`source_digest` covers for ``module``."""
    return frozenset(_package_closure({type(m).__module__ for m in module.modules()}, package))


def _package_closure(names: set[str], package: str) -> set[str]:
    """The modules among ``names`` in ``package``, and the ``package`` modules they refer to, transitively."""
    found: set[str] = set()
    todo = [n for n in names if n == package or n.startswith(package + ".")]
    while todo:
        name = todo.pop()
        module = sys.modules.get(name)
        if name in found or module is None:
            continue
        found.add(name)
        for value in vars(module).values():
            ref = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(ref, str) and (ref == package or ref.startswith(package + ".")) and ref not in found:
                todo.append(ref)
    return found


@functools.cache
def _files_digest(names: frozenset[str]) -> str:
    return files_digest({name: getattr(sys.modules[name], "__file__", None) for name in names})


def files_digest(files: dict[str, str | None]) -> str:
    """sha256 of this file and of ``files`` ({module name: its file}, read in name order; None: skipped)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for name in sorted(files):
        if files[name]:
            digest.update(name.encode() + b"\0" + Path(files[name]).read_bytes() + b"\0")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions of torch, OpenVINO and transformers (read from the installed metadata: nothing imported)."""
    versions = {"torch": torch.__version__, "openvino": openvino_version()}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["transformers"] = importlib.metadata.version("transformers")
    return versions


# ---------------------------------------------------------------------------------------------- conversion
@contextlib.contextmanager
def float32_weights(module: nn.Module) -> Iterator[None]:
    """``module``'s floating parameters and buffers as float32 for the duration (stored tensors restored after)."""
    changed = []
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            changed.append((t, t.data))
            t.data = t.data.float()
    try:
        yield
    finally:
        for t, stored in changed:
            t.data = stored


@contextlib.contextmanager
def kept_attributes(module: nn.Module) -> Iterator[None]:
    """The plain attributes of ``module`` and its submodules as they were before: a forward traced with symbolic
    shapes can leave them behind in its attributes (the autoencoder's ``Decoder.last_z_shape``), where they would
    break the model's later use (``copy.deepcopy``)."""
    saved = [(m, dict(vars(m))) for m in module.modules()]
    try:
        yield
    finally:
        for m, attributes in saved:
            current = vars(m)
            for name in set(current) - set(attributes):
                del current[name]
            current.update((name, value) for name, value in attributes.items() if current.get(name) is not value)


def check_plain_ops(exported: Any, name: str) -> None:
    """Refuse an exported graph with an op outside ``aten`` and ``prims`` (a private CPU fast path that was
    traced; OpenVINO would fail on it or compute something else)."""
    for node in exported.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
                target.namespace not in ("aten", "prims"):
            raise OpenVINOConversionError(
                f"the {name} graph holds {target.namespace}::{target._opname}, a private op of a CPU fast path; "
                f"tracing must take torch's public ops (torch.compiler.is_compiling() is true under torch.export)")


def export_to_openvino(module: nn.Module, example: Sequence[torch.Tensor], dynamic_shapes: Sequence[Any],
                       name: str, path: Path | None = None):
    """``module`` (called on tensors like ``example``) -> an ``openvino.Model`` holding its own copy of the weights,
    via ``torch.export`` with the given symbolic dimensions; or, with ``path``, that model written there as IR
    (float32 weights, read from torch's tensors while writing: nothing copied) and None returned. Weights are
    traced in float32; the graph must hold only public ops. Raises :class:`OpenVINOConversionError`, or OSError
    where the IR cannot be written."""
    import openvino

    # autocast off: the caller may run under the pipeline's bf16 autocast, which would trace bf16 casts into the
    # graph (OpenVINO's bf16 is its inference-precision hint, applied when compiling)
    with torch.no_grad(), torch.autocast("cpu", enabled=False), float32_weights(module), kept_attributes(module):
        try:
            exported = torch.export.export(module, tuple(example), dynamic_shapes=tuple(dynamic_shapes),
                                           strict=False)
            check_plain_ops(exported, name)
            # shared weights point into the (float32) tensors of this context: only while it lasts
            model = openvino.convert_model(exported, share_weights=path is not None)
        except OpenVINOConversionError:
            raise
        except Exception as err:  # torch.export and OpenVINO raise many kinds
            raise OpenVINOConversionError(f"cannot convert the {name} to OpenVINO: {first_line(err)}; "
                                          f"the torch backend runs this model") from err
        if path is None:
            return model
        try:
            openvino.save_model(model, path, compress_to_fp16=False)
        except RuntimeError as err:
            raise OSError(f"cannot write {path}: {first_line(err)}") from err
        return None


def _symbolic_dims(shapes: Sequence[Sequence[int]], axes: Sequence[dict[int, tuple[str, int]]]):
    """Example shapes and ``torch.export`` dynamic shapes for inputs whose ``axes`` map an axis to (symbol,
    multiple): each symbolic axis gets the example size 2 x multiple (sizes 0 and 1 would be specialised)."""
    from torch.export import Dim

    symbols: dict[str, Any] = {}
    examples, dynamic = [], []
    for shape, input_axes in zip(shapes, axes):
        shape = list(shape)
        spec = {}
        for axis, (symbol, multiple) in input_axes.items():
            dim = symbols.setdefault(symbol, Dim(symbol, min=1))
            spec[axis] = dim if multiple == 1 else multiple * dim
            shape[axis] = 2 * multiple
        examples.append(shape)
        dynamic.append(spec or None)
    return examples, dynamic


# ---------------------------------------------------------------------------------------------- cache entries
def _sample_digest(path: Path, chunks: int = 64, size: int = 4096) -> str:
    """sha256 of ``chunks`` evenly spaced blocks of a file and its size (a large file is not read whole)."""
    total = path.stat().st_size
    digest = hashlib.sha256(str(total).encode())
    with open(path, "rb") as f:
        for i in range(chunks):
            f.seek(max(0, total - size) * i // max(1, chunks - 1))
            digest.update(f.read(size))
    return digest.hexdigest()


def _file_record(path: Path) -> dict:
    """Size and checksum of a cache file: sha256 of the whole file up to 64 MB (the XML), of samples above."""
    size = path.stat().st_size
    if size <= 64 << 20:
        return {"size": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"size": size, "sample_sha256": _sample_digest(path)}


def check_entry(entry: Path, key: str) -> None:
    """Raise ValueError unless ``entry`` is a complete entry for ``key`` (meta.json and the files it lists)."""
    meta = json.loads((entry / "meta.json").read_text())
    if meta.get("key") != key or meta.get("format") != FORMAT:
        raise ValueError("its key does not match")
    for name, record in meta["files"].items():
        if _file_record(entry / name) != record:
            raise ValueError(f"{name} differs from when it was written")


def _discard(path: Path) -> None:
    """Remove a folder: first renamed aside (at once, so no reader takes it for an entry), then deleted."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        path.rename(trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temporaries(root: Path) -> None:
    now = time.time()
    for path in itertools.chain(root.glob(".tmp-*"), root.glob(".trash-*")):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)


def mark_used(entry: Path) -> None:
    """Note that ``entry`` was used now (its folder's modification time), which keeps it from
    :func:`remove_superseded` for a day."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def _description(entry: Path) -> dict | None:
    """What an entry's key was made of (its meta.json's ``describe``), or None where that cannot be read."""
    try:
        described = json.loads((entry / "meta.json").read_text()).get("describe")
    except (OSError, ValueError, AttributeError):
        return None
    return described if isinstance(described, dict) else None


def remove_superseded(entry: Path) -> list[Path]:
    """Remove the cache entries ``entry`` supersedes and return them: the same network (part, checkpoint, weights
    and inputs) written by other code or library versions, untouched for a day (:func:`mark_used`). An upgrade or
    an edit of the model code thus leaves no converted copy behind, while two installs that share the cache and are
    both in use keep theirs. Entries without a checkpoint hash are left alone."""
    ours = _description(entry)
    if ours is None or not ours.get("checkpoint"):
        return []
    removed, now = [], time.time()
    for other in entry.parent.glob(f"{ours['part']}-*"):
        theirs = _description(other) if other != entry else None
        if theirs is None or any(theirs.get(name) != ours.get(name) for name in _SAME_NETWORK):
            continue
        with contextlib.suppress(OSError):
            if now - other.stat().st_mtime > _STALE_SECONDS:
                _discard(other)
                removed.append(other)
    return removed


# ---------------------------------------------------------------------------------------------- one network
class OpenVINOPart:
    """One network through OpenVINO: converted once (or read from the cache), compiled per input shape.

    ``call``: the module to convert, called on tensors; ``weights``: the module whose weights key the cache (and
    that ``release_weights`` gets once OpenVINO holds the network); both may instead come from ``modules``, called
    once when first needed (a part bound to a cache entry, :meth:`bind`, may never need them); ``axes``: per input,
    its symbolic axes as {axis: (symbol, multiple)} (a symbol may appear in several inputs; sizes must be
    multiples); ``cache_dir``: where entries live (None: converted in memory); ``model_hash``: returns the
    checkpoint's hash for the key; ``code``: a digest of the source ``call`` computes with (default
    :func:`source_digest`); ``keep``: compiled shapes kept at once (each holds its own packed weights); ``say``:
    one-line notices; ``fallback``: where OpenVINO cannot convert or compile the network, say so and run ``call`` in
    torch (float32 weights) instead of raising :class:`OpenVINOConversionError`; ``on_entry``: called with the part
    when it has taken a cache entry. Calls take CPU torch tensors and return float32 torch tensors.
    """

    def __init__(self, name: str, call: nn.Module | None, weights: nn.Module | None,
                 axes: Sequence[dict[int, tuple[str, int]]], cache_dir: Path | None = None,
                 model_hash: Callable[[], str | None] = lambda: None, code: str | None = None,
                 keep: int = 1, say: Callable[[str], None] = lambda message: None,
                 release_weights: Callable[[nn.Module], Any] | None = None, fallback: bool = False,
                 modules: Callable[[], tuple[nn.Module, nn.Module]] | None = None,
                 on_entry: Callable[[OpenVINOPart], Any] | None = None):
        if call is None and modules is None:
            raise ValueError("OpenVINOPart needs its module: call and weights, or modules")
        self.name, self._call, self._weights, self.axes = name, call, weights, list(axes)
        self._modules, self._code = modules, code
        self.fallback, self.in_torch = fallback, False
        self.cache_dir, self.model_hash, self.keep, self.say = cache_dir, model_hash, keep, say
        self.release_weights, self.on_entry = release_weights, on_entry
        self.entry: Path | None = None  # the cache entry in use (None: converted in memory only)
        self.entry_key: str | None = None
        self.entry_types: list[str] | None = None  # its inputs' dtypes and fixed sizes
        self.conversions = 0  # how many times this object converted the network (the cache tests read it)
        self._model = None  # the converted openvino.Model, when there is no cache to compile from
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._swept: Path | None = None  # the entry whose superseded entries were looked for (once per entry)

    def _take_modules(self) -> None:
        if self._call is None:
            self._call, self._weights = self._modules()

    @property
    def call(self) -> nn.Module:
        """The torch module the network is converted from (from ``modules`` at the first use)."""
        self._take_modules()
        return self._call

    @property
    def weights(self) -> nn.Module:
        """The module whose weights key the cache (from ``modules`` at the first use)."""
        self._take_modules()
        return self._weights

    @property
    def code(self) -> str:
        """The digest of the source ``call`` computes with (:func:`source_digest`), part of the key."""
        if self._code is None:
            self._code = source_digest(self.call)
        return self._code

    @code.setter
    def code(self, value: str) -> None:
        self._code = value

    def has_modules(self) -> bool:
        """Whether the torch modules are at hand (a bound part may not have needed them)."""
        return self._call is not None

    def bind(self, entry: Path, key: str, input_types: Sequence[str]) -> None:
        """Use the cache entry ``entry`` (checked against ``key`` by the caller) for inputs of ``input_types``
        (:meth:`input_types`), without computing its key: nothing of the torch module is needed to run."""
        self.entry, self.entry_key, self.entry_types = entry, key, list(input_types)

    # -------------------------------------------------------------- key and entry
    def describe(self, input_types: Sequence[str]) -> dict:
        """What the cache key is made of (written to the entry's meta.json)."""
        return {"format": FORMAT, "part": self.name, "checkpoint": self.model_hash(),
                "weights": weights_fingerprint(self.weights), "structure": structure_digest(self.call),
                "code": self.code, "inputs": list(input_types), "axes": [
                    {str(k): list(v) for k, v in a.items()} for a in self.axes], **library_versions()}

    def _static_shapes(self, inputs: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
        """The input shapes with the symbolic axes blanked (-1): what one converted model serves."""
        return [tuple(-1 if axis in a else n for axis, n in enumerate(t.shape)) for t, a in zip(inputs, self.axes)]

    def input_types(self, inputs: Sequence[torch.Tensor]) -> list[str]:
        """The inputs' dtypes and fixed sizes (symbolic axes -1): what one cache entry serves."""
        return [f"{t.dtype}{list(s)}" for t, s in zip(inputs, self._static_shapes(inputs))]

    def key(self, inputs: Sequence[torch.Tensor]) -> tuple[str, dict]:
        description = self.describe(self.input_types(inputs))
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest(), description

    def _convert(self, inputs: Sequence[torch.Tensor], path: Path | None = None):
        """The network converted (see :func:`export_to_openvino`): in memory, or written to ``path``."""
        shapes, dynamic = _symbolic_dims([t.shape for t in inputs], self.axes)
        example = [torch.zeros(s, dtype=t.dtype) for s, t in zip(shapes, inputs)]
        self.say(f"converting the {self.name} to OpenVINO (once per checkpoint)")
        self.conversions += 1
        return export_to_openvino(self.call, example, dynamic, self.name, path)

    def _entry(self, inputs: Sequence[torch.Tensor]) -> Path | None:
        """The cache entry for this network (built when missing or damaged); None where the cache cannot be
        written (the network is then converted in memory)."""
        key, description = self.key(inputs)
        self.entry_key = key
        root = Path(self.cache_dir)
        entry = root / f"{self.name}-{key[:24]}"
        if entry.exists():
            try:
                check_entry(entry, key)
                return entry
            except (OSError, ValueError, KeyError, TypeError) as err:
                self.say(f"notice: the OpenVINO cache entry {entry} is damaged ({err}); converting again")
                _discard(entry)
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(root)
            temp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.name}-", dir=root))
        except OSError as err:
            self.say(f"notice: cannot write the OpenVINO cache in {root} ({err}); converting without a cache")
            return None
        try:
            self._convert(inputs, temp / "model.xml")
            files = {name: _file_record(temp / name) for name in ("model.xml", "model.bin")}
            meta = {"key": key, "format": FORMAT, "files": files, "describe": description}
            (temp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                temp.rename(entry)
            except OSError:
                if not entry.exists():
                    raise
                _discard(temp)  # another process wrote the same entry meanwhile
                check_entry(entry, key)
        except OSError as err:
            _discard(temp)
            self.say(f"notice: cannot write the OpenVINO cache in {root} ({err}); converting without a cache")
            return None
        except BaseException:
            _discard(temp)
            raise
        return entry

    # -------------------------------------------------------------- compile and run
    def _compile(self, inputs: Sequence[torch.Tensor], hint: str):
        if self.entry is not None and self.entry_types is not None and self.entry_types != self.input_types(inputs):
            self.entry = None  # a bound entry serves other inputs: this one is looked up by its key
        if self.entry is None and self._model is None:
            self.entry = self._entry(inputs) if self.cache_dir is not None else None
            self.entry_types = self.input_types(inputs)
            if self.entry is None:
                self._model = self._convert(inputs)
            elif self.on_entry is not None:
                self.on_entry(self)
            if self.release_weights is not None:
                self.release_weights(self.weights)
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.entry is None:
            model = self._model.clone()
        else:
            try:
                model = core().read_model(self.entry / "model.xml")
            except RuntimeError as err:
                self.say(f"notice: OpenVINO cannot read {self.entry} ({str(err).strip()[:200]}); converting again")
                _discard(self.entry)
                self.entry = None
                return self._compile(inputs, hint)
        model.reshape({i: list(t.shape) for i, t in enumerate(inputs)})
        # compiling packs the weights, read once from the entry's memory-mapped file: its pages are let go as they
        # are read (SD v1's UNet in fp32: peak RSS 7.7 -> 5.6 GB), not held beside the packed copy
        weights = self.entry / "model.bin" if self.entry is not None else None
        try:
            with releasing_mapped_file(weights) if weights is not None else contextlib.nullcontext():
                compiled = core().compile_model(model, "CPU", config)
        except RuntimeError as err:
            raise self._compile_error(err, hint) from err
        if self.entry is not None:
            mark_used(self.entry)
            if self._swept != self.entry:  # a set-aside network compiles again each batch: one look is enough
                self._swept = self.entry
                for old in remove_superseded(self.entry):
                    self.say(f"notice: removed {old.name} from the OpenVINO cache (superseded by {self.entry.name})")
        return compiled

    def _compile_error(self, err: RuntimeError, hint: str) -> OpenVINOConversionError:
        """OpenVINO's multi-line compile error as one line: its last line that names a cause."""
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        causes = [line for line in lines if not line.startswith("Exception from")] or lines or ["unknown error"]
        return OpenVINOConversionError(f"OpenVINO cannot compile the {self.name} ({hint}): {causes[-1][:300]}; "
                                       f"the torch backend runs this model (--backend torch)")

    def __call__(self, *inputs: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
        """Run the network on ``inputs`` (CPU tensors) -> its outputs as float32 torch tensors."""
        hint = inference_precision_hint(precision)
        if self.in_torch:
            return self._torch(inputs)
        arrays = [t.detach().cpu().contiguous().numpy() for t in inputs]
        signature = (hint, *((a.shape, a.dtype.str) for a in arrays))
        if signature in self._compiled:
            self._compiled.move_to_end(signature)
        else:
            while len(self._compiled) >= self.keep:
                self._compiled.popitem(last=False)  # its packed weights go with it
            try:
                compiled = self._compile(inputs, hint)
            except OpenVINOConversionError as err:
                if not self.fallback:
                    raise
                self.say(f"notice: {err}; it runs in torch from now on")
                self.in_torch = True
                self.call.float()  # as the conversion traced it, whatever the stored dtype
                return self._torch(inputs)
            self._compiled[signature] = (compiled, compiled.create_infer_request())
        _, request = self._compiled[signature]
        results = request.infer(arrays, share_inputs=True, share_outputs=False)
        return [torch.from_numpy(array) for array in results.to_tuple()]

    def _torch(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The network's outputs computed by its torch module (the fallback), as float32 tensors."""
        with torch.no_grad():
            out = self.call(*inputs)
        return [t.float() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    def release(self) -> None:
        """Drop the compiled models (their memory); the next call compiles again (from the cache)."""
        self._compiled.clear()
