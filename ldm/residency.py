"""Model parts that hold their compute weights only while they are in use (CPU).

A Stable Diffusion run uses its parts one after the other: the text encoder, the UNet for every step, then the
autoencoder. On the CPU the pipeline loads the checkpoint as stored (memory-mapped, nothing copied) and gives a
part its compute dtype and layout only while it is in use. :meth:`PartWeights.use` converts its weights
(bfloat16 from a float32 file) and has its convolutions lay out their kernels once for oneDNN
(:class:`ldm.precision.Conv2d`); :meth:`PartWeights.set_aside` frees those copies and hands the file's pages back
to the page cache. A weight that needs no conversion (float32 from a float32 checkpoint) is used straight from
the file's pages. So the process holds about one part at a time: the peak is the UNet's weights and
activations, not the whole model.

Converted weights live in anonymous memory mappings of their own, so setting a part aside returns their memory
to the system at once (the C heap would keep it; the prepacked kernels, which oneDNN allocates, are handed back
with ``malloc_trim``).
"""
from __future__ import annotations

import math
import mmap

import torch
from torch import nn

from ldm.checkpoint import _FilePages, release_file_pages
from ldm.precision import Conv2d, is_conv_kernel, return_freed_memory

# private anonymous memory (Python's default for fileno -1 is a shared mapping); not on Windows
_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}


def _empty_mapped(shape: torch.Size, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """An uninitialised tensor in an anonymous mapping of its own, unmapped when the tensor is freed (the tensor
    holds the mapping)."""
    numel = math.prod(shape)
    flat = torch.frombuffer(mmap.mmap(-1, max(numel * dtype.itemsize, 1), **_PRIVATE), dtype=dtype, count=numel)
    if memory_format == torch.channels_last and len(shape) == 4:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


class PartWeights:
    """The parameters of one model part as loaded, and the dtype and kernel layout it computes in.

    ``dtype`` applies to floating parameters; ``memory_format`` to convolution kernels (see
    :func:`ldm.precision.preferred_memory_format`). The part keeps its stored weights between uses.
    """

    def __init__(self, part: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format):
        self.part = part
        self.dtype = dtype
        self.memory_format = memory_format
        self.params = list(part.parameters())
        self.stored = [p.data for p in self.params]
        self.convs = {id(m.weight): m for m in part.modules() if isinstance(m, Conv2d)}
        self.in_use = False

    def _wanted(self, t: torch.Tensor) -> tuple[torch.dtype, torch.memory_format | None]:
        dtype = self.dtype if t.is_floating_point() else t.dtype
        fmt = self.memory_format if is_conv_kernel(t) and self.memory_format != torch.preserve_format else None
        return dtype, fmt

    def use(self) -> None:
        """Give every parameter the compute dtype and layout (converted copies; unchanged ones stay mapped)."""
        if self.in_use:
            return
        pages = _FilePages()
        for param, stored in zip(self.params, self.stored):
            dtype, fmt = self._wanted(stored)
            conv = self.convs.get(id(param))
            if conv is not None and conv.prepack(dtype, fmt or torch.contiguous_format):
                param.data = stored  # the convolution lays out its own kernel at its first call
                continue
            if stored.dtype == dtype and (fmt is None or stored.is_contiguous(memory_format=fmt)):
                param.data = stored
                continue
            converted = _empty_mapped(stored.shape, dtype, fmt or torch.contiguous_format)
            param.data = converted.copy_(stored)
            pages.release(stored)  # the file pages just read; they fault back in if converted again
        self.in_use = True

    def set_aside(self) -> None:
        """Free the converted weights and drop the stored ones' file pages; :meth:`use` brings them back."""
        for conv in self.convs.values():
            conv.release_packed()
        for param, stored in zip(self.params, self.stored):
            param.data = stored
        release_file_pages(self.part)
        return_freed_memory()
        self.in_use = False
