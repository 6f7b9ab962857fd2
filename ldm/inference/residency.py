"""Model parts that hold their compute weights only while they are in use (CPU).

A Stable Diffusion run uses its parts one after the other: the text encoder, the UNet for every step, then the
autoencoder. On the CPU the pipeline loads the checkpoint as stored (memory-mapped, nothing copied) and gives a
part its compute dtype and layout only while it is in use. :meth:`PartWeights.use` converts its weights
(bfloat16 from a float32 file) and has its convolutions lay out their kernels once for oneDNN
(:class:`ldm.modules.ops.Conv2d`); :meth:`PartWeights.set_aside` frees those copies and hands the file's pages back
to the page cache. A weight that needs no conversion (float32 from a float32 checkpoint) is used straight from
the file's pages. So the process holds about one part at a time: the peak is the UNet's weights and
activations, not the whole model.

Converted weights live in anonymous memory mappings of their own, so setting a part aside returns their memory
to the system at once (the C heap would keep it; the prepacked kernels, which oneDNN allocates, are handed back
with ``malloc_trim``).
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.backend.layout import is_conv_kernel
from ldm.backend.memory import FilePages, empty_mapped, release_file_pages, return_freed_memory
from ldm.modules.ops import Conv2d

_TRIM_AFTER_PACKING = 16 << 20  # bytes of kernel (float32 UNet: -0.15 GB peak RSS, under 0.1 s per batch)


def _after_packing(weight: torch.Tensor) -> None:
    """Let go of what packing ``weight`` touched: its file pages, and the large copies oneDNN made (else the C
    heap keeps them)."""
    FilePages().release(weight)
    if weight.numel() * weight.element_size() >= _TRIM_AFTER_PACKING:
        return_freed_memory()


class PartWeights:
    """The parameters of one model part as loaded, and the dtype and kernel layout it computes in.

    ``dtype`` applies to floating parameters; ``memory_format`` to convolution kernels (see
    :func:`ldm.backend.layout.preferred_memory_format`). The part keeps its stored weights between uses.
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
        pages = FilePages()
        for param, stored in zip(self.params, self.stored):
            dtype, fmt = self._wanted(stored)
            conv = self.convs.get(id(param))
            if conv is not None and conv.prepack(dtype, fmt or torch.contiguous_format, _after_packing):
                param.data = stored  # the convolution lays out its own kernel at its first call
                continue
            if stored.dtype == dtype and (fmt is None or stored.is_contiguous(memory_format=fmt)):
                param.data = stored
                continue
            converted = empty_mapped(stored.shape, dtype, fmt or torch.contiguous_format)
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
