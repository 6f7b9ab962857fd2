"""The operating system's side of memory: the C heap, memory-mapped file pages, anonymous mappings, and how
much memory there is. Everything here is Linux/glibc-specific and a no-op (or None) elsewhere.

* :func:`tuned_allocator` -- a context in which glibc keeps freed memory for reuse instead of returning it to
  the OS and faulting it back in (a sampling step's large temporaries);
  :func:`return_freed_memory` -- hand the heap's free memory back (``malloc_trim``).
* :class:`FilePages` / :func:`release_file_pages` -- drop the clean pages of memory-mapped checkpoint tensors
  (``MADV_DONTNEED`` on pages ``/proc/self/pagemap`` shows unmodified): they fault back in with the same bytes.
* :func:`release_library_pages` -- ask the kernel to reclaim the pages of the shared libraries loaded so far.
* :func:`empty_mapped` -- a tensor in an anonymous mapping of its own, returned to the OS when freed.
* :func:`total_memory_bytes`, :func:`available_memory_bytes` -- how much memory a run can use.

Only the application changes process-wide settings (:func:`tuned_allocator`, :func:`release_library_pages`);
library code calls the rest.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import math
import mmap
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

# glibc mallopt parameters and their defaults
_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_DEFAULT = -1, 128 * 1024
_M_MMAP_MAX, _MMAP_MAX_DEFAULT = -4, 65536
_MADV_PAGEOUT = 21  # Linux 5.4+
_MADV_DONTNEED = 4  # Linux
_SHARED_OBJECT = re.compile(r"\.so(\.[\d.]+)?$")
# private anonymous memory (Python's default for fileno -1 is a shared mapping); not on Windows
_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
_allocator_depth = 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _libc_function(name: str, argtypes: list) -> ctypes._CFuncPtr | None:
    function = getattr(_libc(), name, None)
    if function is not None:
        function.argtypes = argtypes
    return function


def _mappings() -> Iterator[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of this process's memory mappings (Linux ``/proc/self/maps``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, hi = fields[0].split("-")
        yield int(lo, 16), int(hi, 16), fields[1], fields[5].strip() if len(fields) == 6 else ""


# ---------------------------------------------------------------------------------------------- the C heap
def _mallopt(settings: dict[int, int]) -> bool:
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    return mallopt is not None and all(bool(mallopt(param, value)) for param, value in settings.items())


@contextmanager
def tuned_allocator() -> Iterator[bool]:
    """While active, glibc serves every allocation from its heap and never trims it, so freed memory is reused
    instead of being returned to the OS and page-faulted back in; yields whether that took effect (False where
    the C library is not glibc). On exit glibc's default values come back (its dynamic mmap threshold stays off,
    as after any ``mallopt``).

    PyTorch's CPU allocator is plain ``malloc``: every activation above glibc's mmap threshold (at most 32 MB)
    is a fresh ``mmap`` whose pages the kernel zeroes on first touch (about 8 % of a float32 UNet step on a
    2-core CPU). The peak RSS stays the peak of live tensors, but freed memory is only handed back by
    :func:`return_freed_memory`. Process-wide: only the application enters it; nested entries are one.
    """
    global _allocator_depth
    tuned = _allocator_depth > 0 or _mallopt({_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1})
    _allocator_depth += 1
    try:
        yield tuned
    finally:
        _allocator_depth -= 1
        if _allocator_depth == 0 and tuned:
            _mallopt({_M_MMAP_MAX: _MMAP_MAX_DEFAULT, _M_TRIM_THRESHOLD: _TRIM_THRESHOLD_DEFAULT})


def return_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc ``malloc_trim``); a no-op elsewhere."""
    malloc_trim = _libc_function("malloc_trim", [ctypes.c_size_t])
    if malloc_trim is not None:
        malloc_trim(0)


# ---------------------------------------------------------------------------------------------- file pages
class FilePages:
    """This process's private mappings of ``paths`` (or of any file), whose clean pages can be dropped.

    A page that ``/proc/self/pagemap`` shows as an unmodified file page is dropped with ``MADV_DONTNEED``; if it
    is used again it faults back in from the page cache (or the file) with the same bytes, so dropping can never
    change a value. A page written after mapping (a private copy) is kept. Linux only; elsewhere nothing happens.
    """

    def __init__(self, paths: tuple[str, ...] | None = None):
        self.ranges = [] if paths == () else [
            (lo, hi) for lo, hi, perms, name in _mappings()
            if perms.endswith("p") and (name in paths if paths else name.startswith("/"))]
        self.madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
        if self.madvise is None:
            self.ranges = []

    @classmethod
    def of(cls, path: str | Path) -> FilePages:
        """The mappings of the file at ``path``."""
        return cls(tuple({str(Path(path)), os.path.realpath(path)}))

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


def release_file_pages(module: nn.Module) -> int:
    """Hand the memory-mapped checkpoint pages under ``module``'s CPU tensors back to the page cache; returns
    the bytes released from this process (Linux; 0 elsewhere).

    Weights loaded memory-mapped stay in the file's pages. A model part that is not needed for a while (the
    UNet while the autoencoder decodes) need not count in the process's memory: its clean pages are dropped and
    fault back in when next used. A weight written after loading keeps its value (see :class:`FilePages`).
    """
    pages = FilePages()
    if not pages.ranges:
        return 0
    storages = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(pages.drop(lo, lo + size) for lo, size in storages.items())


def release_library_pages() -> int:
    """Ask the kernel to reclaim the resident pages of the shared libraries mapped so far (Linux 5.4+,
    ``MADV_PAGEOUT``), and return how many mappings it advised (0 where this is not Linux).

    Loading touches far more library code and data than a CPU run uses again: above all the CUDA libraries that
    a CUDA build of torch maps and initialises even without a GPU, and what torch._dynamo and triton load at
    import (about 270 MB of a 512x512 run's peak RSS here). Only clean pages go (they are file pages; the
    relocated, private ones stay); those still in use fault back in. Process-wide: only the application calls it.
    """
    return _page_out(lambda name: bool(_SHARED_OBJECT.search(name)))


def release_mapped_file(path: str | os.PathLike) -> int:
    """Unmap this process's resident pages of a file mapped read-only (OpenVINO's converted weights, which it no
    longer reads once compiled) while the page cache keeps them (``MADV_DONTNEED``: the next run reads them from
    memory, not from disk); returns how many mappings were advised (0 elsewhere). A page read again faults back
    in, unchanged. Writable mappings are left alone (``MADV_DONTNEED`` would drop their changes)."""
    target = os.path.realpath(path)
    return _page_out(lambda name: name == target, _MADV_DONTNEED, read_only=True)


@contextmanager
def releasing_mapped_file(path: str | os.PathLike, every: float = 0.2) -> Iterator[None]:
    """:func:`release_mapped_file` every ``every`` seconds while the block runs, and at its end: a library that
    reads a large mapped file through once (OpenVINO packing the converted weights while it compiles) then holds
    little more of it than it read in the last moment, instead of all of it beside its packed copy."""
    if not sys.platform.startswith("linux"):
        yield
        return
    stop = threading.Event()

    def release() -> None:
        while not stop.wait(every):
            release_mapped_file(path)

    thread = threading.Thread(target=release, name="release-mapped-file", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release_mapped_file(path)


def _page_out(chosen: Callable[[str], bool], advice: int = _MADV_PAGEOUT, read_only: bool = False) -> int:
    """``advice`` (default ``MADV_PAGEOUT``: out of memory, into the page cache or not at all) on each mapping
    whose path is ``chosen`` (``read_only``: and that is not writable); how many the kernel took (0 without
    madvise)."""
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    if madvise is None:
        return 0
    return sum(madvise(lo, hi - lo, advice) == 0 for lo, hi, permissions, name in list(_mappings())
               if chosen(name) and not (read_only and "w" in permissions))


# ---------------------------------------------------------------------------------------------- mappings
def empty_mapped(shape: torch.Size, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """An uninitialised tensor in an anonymous mapping of its own, unmapped when the tensor is freed (the tensor
    holds the mapping): its memory goes back to the system at once, which the C heap would keep."""
    numel = math.prod(shape)
    flat = torch.frombuffer(mmap.mmap(-1, max(numel * dtype.itemsize, 1), **_PRIVATE), dtype=dtype, count=numel)
    if memory_format == torch.channels_last and len(shape) == 4:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


# ---------------------------------------------------------------------------------------------- sizes
def total_memory_bytes(device: torch.device) -> int | None:
    """The memory a run on ``device`` can use at most: the GPU's, or this machine's RAM (within its cgroup
    limit); None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps":
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        return int(recommended()) if recommended is not None else None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of this machine (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
