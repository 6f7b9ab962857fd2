"""How the model computes on a device: dtype, autocast, memory format, and CPU allocator settings.

Nothing here runs at import. The pipeline and scripts call these functions explicitly:

* :data:`onednn` -- the one gate for torch's private oneDNN ops (fused and prepacked CPU kernels): a path is
  taken only where oneDNN computes its dtype on this CPU, and a call that fails switches it to the public op.
* :func:`cpu_computes_bf16` -- whether this CPU computes bfloat16 in hardware, as oneDNN may use it.
* :func:`preferred_memory_format` -- channels_last where the convolutions are faster with it (CUDA; bf16 on
  CPU); the checkpoint loader lays out the convolution kernels in it, and the UNet and the autoencoder
  compute in their kernels' format.
* :func:`tune_cpu_allocator` -- keep freed activation buffers in the process (glibc), so a sampling step does
  not page-fault its large temporaries in again.
* :func:`release_library_pages` -- hand back the library pages that loading touched and a CPU run does not use.
* :func:`decode_first_stage` -- the VAE decode, redone in float32 when a reduced-precision decode overflows.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm import winograd

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_MADV_PAGEOUT = 21  # Linux
_SHARED_OBJECT = re.compile(r"\.so(\.[\d.]+)?$")
_allocator_tuned = False
# ONEDNN_MAX_CPU_ISA values below the first ISA with bfloat16 arithmetic (AVX512_CORE_BF16); oneDNN emulates
# bf16 on AVX512_CORE and converts only on AVX2_VNNI_2
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


class OneDNN:
    """The gate for torch's private oneDNN ops (``torch.ops.mkldnn.*``, ``mkldnn_reorder_conv2d_weight``).

    They fuse a sum or an activation into a matmul or a convolution, and keep convolution kernels prepacked;
    each has a public op that computes the same (``F.conv2d``, ``F.linear``, ...). A path is taken only where
    oneDNN computes its dtype on this CPU (float32 wherever torch has oneDNN; bfloat16 where
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which honours ``ONEDNN_MAX_CPU_ISA``), and a call that
    raises switches that path (op and dtype) to the public op for the rest of the process, with one notice on
    stderr for the process.
    """

    OPS = ("convolution", "linear")

    def __init__(self):
        self.failed: dict[tuple[str, torch.dtype], str] = {}
        self.noticed = False
        self._computes: dict[torch.dtype, bool] = {}

    @functools.cached_property
    def present(self) -> bool:
        """Whether this torch build has the private ops with the names we call."""
        mkldnn = getattr(torch.ops, "mkldnn", None)
        try:
            return bool(torch.backends.mkldnn.is_available() and mkldnn is not None
                        and hasattr(mkldnn._convolution_pointwise, "binary")
                        and hasattr(mkldnn._linear_pointwise, "binary")
                        and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
        except (AttributeError, RuntimeError):
            return False

    def computes(self, dtype: torch.dtype) -> bool:
        """Whether oneDNN computes ``dtype`` on this CPU (within ``ONEDNN_MAX_CPU_ISA``)."""
        if dtype not in self._computes:
            self._computes[dtype] = self.present and (dtype == torch.float32 or (
                dtype == torch.bfloat16 and _ask(lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported())))
        return self._computes[dtype]

    def usable(self, op: str, dtype: torch.dtype) -> bool:
        """Whether the fast path ``op`` (one of :attr:`OPS`) may run in ``dtype`` now."""
        return (op, dtype) not in self.failed and torch.backends.mkldnn.enabled and self.computes(dtype)

    def run(self, op: str, dtype: torch.dtype, fast: Callable[[], torch.Tensor],
            public: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fast()``; if it raises, ``public()``, and ``op`` in ``dtype`` takes the public op from then on."""
        try:
            return fast()
        except (RuntimeError, TypeError, ValueError, AttributeError) as err:
            self.fail(op, dtype, err)
        return public()

    def fail(self, op: str, dtype: torch.dtype, err: BaseException) -> None:
        """Switch ``op`` in ``dtype`` to the public op for the rest of the process."""
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        self.failed[(op, dtype)] = why
        if not self.noticed:
            self.noticed = True
            print(f"notice: oneDNN's fused {op} kernel failed on this CPU in {str(dtype).removeprefix('torch.')} "
                  f"({why[:160]}); using torch's standard ops instead (same results, slower)", file=sys.stderr,
                  flush=True)


def _ask(query: Callable[[], Any]) -> bool:
    """``bool(query())``, False where the query itself fails (an older or a non-oneDNN torch)."""
    try:
        return bool(query())
    except (AttributeError, RuntimeError):
        return False


onednn = OneDNN()


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX) and oneDNN may use it: not capped
    below that by ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``). Elsewhere bf16 is emulated or converted, and
    float32 is faster."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    hardware = any(_ask(getattr(torch.cpu, name, lambda: False))
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return hardware and cap not in _ISAS_WITHOUT_BF16 and onednn.computes(torch.bfloat16)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor laid out that way, else ``torch.contiguous_format``."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def is_conv_kernel(t: torch.Tensor) -> bool:
    """A 4-D weight with a kernel larger than 1x1: the tensors whose layout (memory format) matters."""
    return t.dim() == 4 and t.shape[2] * t.shape[3] > 1


def module_memory_format(module: nn.Module) -> torch.memory_format:
    """The memory format the convolutions of ``module`` compute in: that of its first convolution kernel larger
    than 1x1 (or the layout that kernel is prepacked for, see :class:`Conv2d`)."""
    for m in module.modules():
        kernel = getattr(m, "weight", None)
        if isinstance(kernel, torch.Tensor) and is_conv_kernel(kernel) and kernel.device.type != "meta":
            compute = getattr(m, "compute", None)
            return compute[1] if compute is not None else memory_format_of(kernel)
    return torch.contiguous_format


def kernel_dtype(conv: nn.Module) -> torch.dtype:
    """The dtype ``conv`` computes in: its weight's, or the one its kernel is prepacked in (:class:`Conv2d`)."""
    compute = getattr(conv, "compute", None)
    return compute[0] if compute is not None else conv.weight.dtype


_TRIM_AFTER_PACKING = 16 << 20  # bytes of kernel (float32 UNet: -0.15 GB peak RSS, under 0.1 s per batch)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` whose kernel can be kept prepacked in oneDNN's blocked layout for CPU inference.

    A plain convolution re-lays out its kernel into oneDNN's blocked layout on every call: a full-size copy of
    the kernel per call (118 MB for the largest UNet kernel in float32) and 3-5 % (float32) to 9 % (bf16)
    of a UNet step on a 2-core CPU. When ``compute`` is set to ``(dtype, memory_format)`` (by
    :class:`ldm.residency.PartWeights`, on the CPU), the first call without autograd lays the kernel out once
    for its input's shape and keeps only that (the weight parameter stays as stored; its file pages are
    dropped); later calls reuse it until the weight changes (another tensor, or an in-place write such as
    ``load_state_dict`` or an EMA swap). Setting ``compute`` to None, or any ``.to()``/``.float()``, drops it.

    In float32, a 3x3 convolution with stride 1 and padding 1 on a large enough input computes by Winograd
    instead (:mod:`ldm.winograd`; a 512x512 UNet step -15 %, the autoencoder's decode -30 %), straight from the
    stored weight (nothing packed).

    ``forward(x, residual)`` returns ``conv(x) + residual`` (the UNet's residual blocks), on CPU inference with
    the sum in the convolution's epilogue (Winograd: in its output transform).

    The oneDNN calls go through :data:`onednn`: where oneDNN does not compute the dtype on this CPU, or a call
    fails, the convolution is torch's public one.
    """

    compute: tuple[torch.dtype, torch.memory_format] | None = None
    _packed: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (kernel, the weight it was made from, version)

    def prepack(self, dtype: torch.dtype, memory_format: torch.memory_format) -> bool:
        """Compute with the kernel prepacked in ``dtype`` from the next call on; False where it cannot be."""
        self.release_packed()
        if not (self.weight.device.type == "cpu" and self._can_pack(dtype)):
            return False
        self.compute = (dtype, memory_format)
        return True

    def _can_pack(self, dtype: torch.dtype) -> bool:
        return (onednn.usable("convolution", dtype) and self.padding_mode == "zeros" and self.groups == 1
                and isinstance(self.padding, tuple) and is_conv_kernel(self.weight))

    def release_packed(self) -> None:
        self.compute, self._packed = None, None

    def _apply(self, fn, recurse=True):
        self.release_packed()  # the packed kernel is derived from the weight as it was
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(x)``, plus ``residual`` when given. On CPU inference in channels_last the sum is taken in the
        convolution's epilogue (in bf16 rounded once), whether the kernel is prepacked or not."""
        inference = (not torch.is_grad_enabled() and x.device.type == "cpu"
                     and not torch.compiler.is_compiling())  # inductor lowers the plain convolution itself
        if self.compute is not None and inference:
            dtype = self.compute[0]
            tile = self._winograd_tile(x, residual)
            if tile:
                return winograd.conv3x3(x, self.weight, self.bias, tile, residual)
            if onednn.usable("convolution", dtype):
                return onednn.run("convolution", dtype, lambda: self._onednn(x.to(dtype), residual, packed=True),
                                  lambda: self._public(x.to(dtype), residual, dtype))
            return self._public(x.to(dtype), residual, dtype)
        if (inference and residual is not None and self._sum_fits(x, residual)
                and x.dtype == self.weight.dtype and _autocast_keeps(x.dtype) and self._can_pack(x.dtype)):
            return onednn.run("convolution", x.dtype, lambda: self._onednn(x, residual, packed=False),
                              lambda: self._public(x, residual))
        return self._public(x, residual)

    def _public(self, x: torch.Tensor, residual: torch.Tensor | None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """The convolution by torch's public op (weights cast to ``dtype`` when given)."""
        if dtype is None or dtype == self.weight.dtype:
            y = super().forward(x)
        else:
            bias = None if self.bias is None else self.bias.to(dtype)
            y = self._conv_forward(x, self.weight.to(dtype), bias)
        return y if residual is None else y.add_(residual)

    def _onednn(self, x: torch.Tensor, residual: torch.Tensor | None, packed: bool) -> torch.Tensor:
        """The convolution by oneDNN, the sum in its epilogue where it fits; ``packed``: with the kernel
        prepacked for ``x``'s shape (see :meth:`_packed_kernel`)."""
        dtype = x.dtype
        weight = self._packed_kernel(x) if packed else self.weight
        bias = None if self.bias is None else self.bias.to(dtype)
        conv_args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if residual is not None and residual.dtype == dtype and self._sum_fits(x, residual):
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *conv_args,
                                                                  "add", None, None, [], None)
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *conv_args, "none", [], "")
        return y if residual is None else y.add_(residual)

    def _sum_fits(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether oneDNN can add ``residual`` in the epilogue: the output's shape, both channels_last."""
        return _both_channels_last(x, residual) and residual.shape == self._output_shape(x)

    def _output_shape(self, x: torch.Tensor) -> torch.Size:
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s
                in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return torch.Size([x.shape[0], self.out_channels, *size])

    def _winograd_tile(self, x: torch.Tensor, residual: torch.Tensor | None) -> int:
        """The Winograd tile size for this call (:mod:`ldm.winograd`: float32 3x3 convolutions with padding 1),
        or 0 for oneDNN's direct convolution."""
        if not (self.compute[0] == x.dtype == self.weight.dtype == torch.float32 and self.weight.is_contiguous()
                and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and _autocast_keeps(torch.float32)
                and (residual is None or residual.shape == self._output_shape(x))):
            return 0
        return winograd.tile_size(x.shape, self.in_channels, self.out_channels)

    def _packed_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel laid out for ``x``'s shape, packed at the first call and again whenever the weight is
        another tensor or was written in place (its version counter moved). The weight is cast in torch:
        oneDNN is never asked to convert between two reduced types (fp16 -> bf16 needs AVX512-FP16)."""
        weight = self.weight.detach()
        if self._packed is not None:
            kernel, source, version = self._packed
            if source.data_ptr() == weight.data_ptr() and version == self.weight._version:
                return kernel
            self._packed = None
        dtype = self.compute[0]
        kernel = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to(dtype).contiguous().to_mkldnn(), list(self.padding), list(self.stride),
            list(self.dilation), self.groups, list(x.shape))
        self._packed = (kernel, weight, self.weight._version)  # the source stays referenced: its address is unique
        _release_pages(weight)
        if weight.numel() * dtype.itemsize >= _TRIM_AFTER_PACKING:
            return_freed_memory()  # the large copies made while packing, else the heap keeps them
        return kernel


def _both_channels_last(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether oneDNN can add ``residual`` in the epilogue of an op on ``x`` without a re-layout: both are
    channels_last (in the plain layout oneDNN computes in a blocked one)."""
    return memory_format_of(x) == torch.channels_last and memory_format_of(residual) == torch.channels_last


def _release_pages(t: torch.Tensor) -> None:
    from ldm.checkpoint import _FilePages  # checkpoint imports this module

    _FilePages().release(t)


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution, plus ``residual`` when given. On a channels_last ``x`` it is one matmul
    over the channels (on the (B, H, W, C) view; the sum in its epilogue where possible), which skips the
    convolution machinery. The result is channels_last.
    """
    if (x.dim() != 4 or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0)
            or conv.groups != 1 or conv.dilation != (1, 1) or memory_format_of(x) != torch.channels_last):
        y = conv(x)
        return y if residual is None else y.add_(residual)
    weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
    tokens = x.permute(0, 2, 3, 1)

    def public() -> torch.Tensor:
        y = F.linear(tokens, weight, conv.bias).permute(0, 3, 1, 2)
        return y if residual is None else y.add_(residual)

    if (residual is None or not _fused_linear_ok(tokens, weight) or residual.dtype != x.dtype
            or not _both_channels_last(x, residual)
            or residual.shape != (x.shape[0], conv.out_channels, *x.shape[2:])):
        return public()
    sum_in = residual.permute(0, 2, 3, 1)
    return onednn.run("linear", x.dtype, lambda: torch.ops.mkldnn._linear_pointwise.binary(
        tokens, sum_in, weight, conv.bias, "add").permute(0, 3, 1, 2), public)


def _fused_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused linear ops apply: CPU inference without autograd, input and weight of one dtype
    that oneDNN computes here, and no autocast to another dtype."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype and not torch.is_grad_enabled()
            and _autocast_keeps(x.dtype) and onednn.usable("linear", x.dtype)
            and not torch.compiler.is_compiling())  # inductor cannot lower these calls; it fuses the plain ops


def _autocast_keeps(dtype: torch.dtype) -> bool:
    """Whether CPU autocast, if on, computes in ``dtype``."""
    return not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == dtype


def linear_add(linear: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``linear(x) + residual``; on CPU inference one oneDNN matmul with the sum in its epilogue."""
    def public() -> torch.Tensor:
        return linear(x).add_(residual)

    if _fused_linear_ok(x, linear.weight) and residual.dtype == x.dtype and residual.is_contiguous():
        return onednn.run("linear", x.dtype, lambda: torch.ops.mkldnn._linear_pointwise.binary(
            x, residual, linear.weight, linear.bias, "add"), public)
    return public()


def linear_geglu(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """GEGLU on the projection ``proj`` (out = 2 * d): ``h * gelu(gate)`` with ``h, gate = proj(x).chunk(2, -1)``.

    On CPU inference the two halves are two oneDNN matmuls, the exact (erf) GELU applied in the gate's
    epilogue, and the product taken in place: no (tokens x 2d) buffer and no separate GELU pass.
    """
    def public() -> torch.Tensor:
        h, gate = proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return h * F.gelu(gate)
        return F.gelu(gate).mul_(h)

    if not _fused_linear_ok(x, proj.weight):
        return public()
    return onednn.run("linear", x.dtype, lambda: _fused_geglu(proj, x), public)


def _fused_geglu(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    d = proj.out_features // 2
    w_h, w_gate = proj.weight[:d], proj.weight[d:]
    b_h, b_gate = (None, None) if proj.bias is None else (proj.bias[:d], proj.bias[d:])
    linear = torch.ops.mkldnn._linear_pointwise
    gate = linear(x, w_gate, b_gate, "gelu", [], "none")
    if x.dtype == torch.bfloat16:
        return linear.binary(x, gate, w_h, b_h, "mul")
    return gate.mul_(linear(x, w_h, b_h, "none", [], ""))


def preferred_memory_format(device: str | torch.device, dtype: torch.dtype | None = None) -> torch.memory_format:
    """The layout whose convolutions are faster for weights of ``dtype`` (default float32) on ``device``.

    CUDA: channels_last (cuDNN's NHWC kernels). CPU: channels_last for bf16/fp16 (oneDNN's AMX/AVX512 kernels
    are about 25 % faster on NHWC, measured on the SD UNet's convolutions), the plain layout for float32
    (a float32 UNet step takes the same time in both with prepacked kernels, see :class:`Conv2d`; with kernels
    re-laid out per call the plain layout is about 8 % faster). Elsewhere (MPS): the plain layout.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.channels_last
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.channels_last
    return torch.contiguous_format


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (and faulting it back in).

    PyTorch's CPU allocator is plain ``malloc``: every activation above glibc's mmap threshold (at most
    32 MB) is a fresh ``mmap`` whose pages are zeroed by the kernel on first touch, and oneDNN re-lays out the
    large convolution weights into fresh buffers on every call. Serving all sizes from the heap and never
    trimming it removes that system time (about 8 % of a float32 UNet step on a 2-core CPU). Process-wide;
    the peak RSS stays the peak of live tensors, but freed memory is not handed back until exit.
    Returns False where the C library is not glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _allocator_tuned = ok
    return ok


def return_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc ``malloc_trim``; after a model part is set aside,
    since :func:`tune_cpu_allocator` keeps freed memory); a no-op elsewhere."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def release_library_pages() -> int:
    """Ask the kernel to reclaim the resident pages of the shared libraries mapped so far (Linux 5.4+,
    ``MADV_PAGEOUT``), and return how many mappings it advised (0 where this is not Linux).

    Loading touches far more library code and data than a CPU run uses again: above all the CUDA libraries that
    a CUDA build of torch maps and initialises even without a GPU, and what torch._dynamo and triton load at
    import (about 270 MB of a 512x512 run's peak RSS here). Only clean pages go (they are file pages; the
    relocated, private ones stay); those still in use fault back in.
    """
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or not os.path.exists("/proc/self/maps"):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and _SHARED_OBJECT.search(fields[5]):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                advised += madvise(start, end - start, _MADV_PAGEOUT) == 0
    return advised


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def decode_first_stage(model: Any, z: torch.Tensor, decode=None) -> torch.Tensor:
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
