"""The model's fast ops: the one place where model code reaches the CPU backend's kernels.

The UNet, the autoencoder and the attention blocks call these four instead of the plain torch ops:

* :class:`Conv2d` -- ``nn.Conv2d`` with ``forward(x, residual)``; on CPU inference it can keep its kernel
  prepacked for oneDNN, computes float32 3x3 convolutions by Winograd, and adds a residual in the epilogue;
* :func:`pointwise_conv` -- a 1x1 convolution as one matmul on channels_last inputs;
* :func:`linear_add` -- ``linear(x) + residual`` with the sum in the matmul's epilogue;
* :func:`linear_geglu` -- GEGLU without the (tokens x 2d) intermediate.

Each computes what the plain ops compute (within float rounding) and falls back to them wherever a fast kernel
does not apply: with autograd, under ``torch.compile``, off the CPU, in a dtype oneDNN does not compute on this
CPU, or after a kernel failed (:data:`ldm.backend.onednn.gate`). The kernels are pure computation
(:mod:`ldm.backend.onednn`, :mod:`ldm.backend.winograd`); nothing here touches the operating system.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm.backend import onednn, winograd
from ldm.backend.layout import is_conv_kernel, memory_format_of
from ldm.backend.onednn import gate


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


def _cpu_inference(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())  # inductor lowers the plain ops itself


def _autocast_keeps(dtype: torch.dtype) -> bool:
    """Whether CPU autocast, if on, computes in ``dtype``."""
    return not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == dtype


def _both_channels_last(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether oneDNN can add ``residual`` in the epilogue of an op on ``x`` without a re-layout: both are
    channels_last (in the plain layout oneDNN computes in a blocked one)."""
    return memory_format_of(x) == torch.channels_last and memory_format_of(residual) == torch.channels_last


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` whose kernel can be kept prepacked in oneDNN's blocked layout for CPU inference.

    A plain convolution re-lays out its kernel into oneDNN's blocked layout on every call: a full-size copy of
    the kernel per call (118 MB for the largest UNet kernel in float32) and 3-5 % (float32) to 9 % (bf16)
    of a UNet step on a 2-core CPU. After :meth:`prepack` (called by :class:`ldm.inference.residency.PartWeights`
    on the CPU), the first call without autograd lays the kernel out once for its input's shape and keeps only
    that (the weight parameter stays as stored); later calls reuse it until the weight changes (another tensor,
    or an in-place write such as ``load_state_dict`` or an EMA swap). :meth:`release_packed`, or any
    ``.to()``/``.float()``, drops it.

    In float32, a 3x3 convolution with stride 1 and padding 1 on a large enough input computes by Winograd
    instead (:mod:`ldm.backend.winograd`), straight from the stored weight (nothing packed).

    ``forward(x, residual)`` returns ``conv(x) + residual`` (the UNet's residual blocks), on CPU inference with
    the sum in the convolution's epilogue (Winograd: in its output transform).
    """

    compute: tuple[torch.dtype, torch.memory_format] | None = None
    _packed: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (kernel, the weight it was made from, version)
    _on_packed: Callable[[torch.Tensor], None] | None = None

    def prepack(self, dtype: torch.dtype, memory_format: torch.memory_format,
                on_packed: Callable[[torch.Tensor], None] | None = None) -> bool:
        """Compute with the kernel prepacked in ``dtype`` from the next call on; False where it cannot be.
        ``on_packed(weight)`` is called after each packing (to let go of what reading the weight touched)."""
        self.release_packed()
        if not (self.weight.device.type == "cpu" and self._can_pack(dtype)):
            return False
        self.compute, self._on_packed = (dtype, memory_format), on_packed
        return True

    def _can_pack(self, dtype: torch.dtype) -> bool:
        return (gate.usable("convolution", dtype) and self.padding_mode == "zeros" and self.groups == 1
                and isinstance(self.padding, tuple) and is_conv_kernel(self.weight))

    def release_packed(self) -> None:
        self.compute, self._packed, self._on_packed = None, None, None

    def _apply(self, fn, recurse=True):
        self.release_packed()  # the packed kernel is derived from the weight as it was
        return super()._apply(fn, recurse)

    @property
    def _args(self) -> onednn.ConvArgs:
        return list(self.padding), list(self.stride), list(self.dilation), self.groups

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(x)``, plus ``residual`` when given. On CPU inference in channels_last the sum is taken in the
        convolution's epilogue (in bf16 rounded once), whether the kernel is prepacked or not."""
        inference = _cpu_inference(x)
        if self.compute is not None and inference:
            dtype = self.compute[0]
            tile = self._winograd_tile(x, residual)
            if tile:
                return winograd.conv3x3(x, self.weight, self.bias, tile, residual)
            x = x.to(dtype)
            if gate.usable("convolution", dtype):
                return gate.run("convolution", dtype, lambda: self._fused(x, residual, self._packed_kernel(x)),
                                lambda: self._public(x, residual, dtype))
            return self._public(x, residual, dtype)
        if (inference and residual is not None and self._sum_fits(x, residual)
                and x.dtype == self.weight.dtype and _autocast_keeps(x.dtype) and self._can_pack(x.dtype)):
            return gate.run("convolution", x.dtype, lambda: self._fused(x, residual, self.weight),
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

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """The convolution by oneDNN with ``weight`` (as stored or packed), the sum in its epilogue where it
        fits."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if residual is not None and residual.dtype == x.dtype and self._sum_fits(x, residual):
            return onednn.conv2d(x, weight, bias, self._args, residual)
        y = onednn.conv2d(x, weight, bias, self._args)
        return y if residual is None else y.add_(residual)

    def _sum_fits(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether oneDNN can add ``residual`` in the epilogue: the output's shape, both channels_last."""
        return _both_channels_last(x, residual) and residual.shape == self._output_shape(x)

    def _output_shape(self, x: torch.Tensor) -> torch.Size:
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s
                in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return torch.Size([x.shape[0], self.out_channels, *size])

    def _winograd_tile(self, x: torch.Tensor, residual: torch.Tensor | None) -> int:
        """The Winograd tile size for this call (float32 3x3 convolutions with padding 1), or 0 for oneDNN's
        direct convolution."""
        if not (self.compute[0] == x.dtype == self.weight.dtype == torch.float32 and self.weight.is_contiguous()
                and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and _autocast_keeps(torch.float32)
                and (residual is None or residual.shape == self._output_shape(x))):
            return 0
        return winograd.tile_size(x.shape, self.in_channels, self.out_channels)

    def _packed_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel laid out for ``x``'s shape, packed at the first call and again whenever the weight is
        another tensor or was written in place (its version counter moved)."""
        weight = self.weight.detach()
        if self._packed is not None:
            kernel, source, version = self._packed
            if source.data_ptr() == weight.data_ptr() and version == self.weight._version:
                return kernel
            self._packed = None
        kernel = onednn.pack_conv_kernel(weight, self.compute[0], self._args, x.shape)
        self._packed = (kernel, weight, self.weight._version)  # the source stays referenced: its address is unique
        if self._on_packed is not None:
            self._on_packed(weight)
        return kernel


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
    return gate.run("linear", x.dtype, lambda: onednn.linear_add(tokens, sum_in, weight, conv.bias)
                    .permute(0, 3, 1, 2), public)


def _fused_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused linear ops apply: CPU inference without autograd, input and weight of one dtype
    that oneDNN computes here, and no autocast to another dtype."""
    return (_cpu_inference(x) and x.dtype == weight.dtype and _autocast_keeps(x.dtype)
            and gate.usable("linear", x.dtype))


def linear_add(linear: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``linear(x) + residual``; on CPU inference one oneDNN matmul with the sum in its epilogue."""
    def public() -> torch.Tensor:
        return linear(x).add_(residual)

    if _fused_linear_ok(x, linear.weight) and residual.dtype == x.dtype and residual.is_contiguous():
        return gate.run("linear", x.dtype, lambda: onednn.linear_add(x, residual, linear.weight, linear.bias), public)
    return public()


def linear_geglu(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """GEGLU on the projection ``proj`` (out = 2 * d): ``h * gelu(gate)`` with ``h, gate = proj(x).chunk(2, -1)``
    (on CPU inference :func:`ldm.backend.onednn.geglu`)."""
    def public() -> torch.Tensor:
        if torch.compiler.is_exporting():  # two matmuls: OpenVINO's split of one output is a slow reference kernel
            d = proj.out_features // 2
            h, gate_ = F.linear(x, proj.weight[:d], proj.bias[:d]), F.linear(x, proj.weight[d:], proj.bias[d:])
        else:
            h, gate_ = proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return h * F.gelu(gate_)
        return F.gelu(gate_).mul_(h)

    if not _fused_linear_ok(x, proj.weight):
        return public()
    return gate.run("linear", x.dtype, lambda: onednn.geglu(x, proj.weight, proj.bias), public)
