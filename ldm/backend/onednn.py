"""oneDNN's fused CPU kernels, behind one gate.

torch's private oneDNN ops (``torch.ops.mkldnn.*``, ``mkldnn_reorder_conv2d_weight``) fuse a sum or an
activation into a matmul or a convolution and keep convolution kernels prepacked; each has a public op that
computes the same (``F.conv2d``, ``F.linear``, ...). :data:`gate` decides whether a path may be taken: only where
oneDNN computes its dtype on this CPU (float32 wherever torch has oneDNN; bfloat16 where
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which honours ``ONEDNN_MAX_CPU_ISA``), and a call that raises
switches that path (op and dtype) to the public op for the rest of the process, with one notice on stderr.

The kernels below are plain functions of tensors; :mod:`ldm.modules.ops` decides when to call them. Nothing
here touches the operating system.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import torch

from ldm.errors import first_line

# ONEDNN_MAX_CPU_ISA values below the first ISA with bfloat16 arithmetic (AVX512_CORE_BF16); oneDNN emulates
# bf16 on AVX512_CORE and only converts on AVX2_VNNI_2
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
ConvArgs = tuple[list[int], list[int], list[int], int]  # padding, stride, dilation, groups


class Gate:
    """Which fused paths (``"convolution"``, ``"linear"``) may run in which dtype in this process."""

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
        """Whether the fused path ``op`` may run in ``dtype`` now."""
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
        why = first_line(err)
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


gate = Gate()


def computes_bf16_natively() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX) and oneDNN may use it: not capped
    below that by ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``). Elsewhere bf16 is emulated or converted, and
    float32 is faster."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    hardware = any(_ask(getattr(torch.cpu, name, lambda: False))
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return hardware and cap not in _ISAS_WITHOUT_BF16 and gate.computes(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- kernels
def pack_conv_kernel(weight: torch.Tensor, dtype: torch.dtype, args: ConvArgs,
                     input_shape: torch.Size) -> torch.Tensor:
    """``weight`` laid out in oneDNN's blocked format for inputs of ``input_shape``, in ``dtype``. The cast is
    torch's: oneDNN is never asked to convert between two reduced types (fp16 -> bf16 needs AVX512-FP16)."""
    padding, stride, dilation, groups = args
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to(dtype).contiguous().to_mkldnn(), padding, stride,
                                                     dilation, groups, list(input_shape))


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, args: ConvArgs,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight) + bias (+ residual)``, the sum in the convolution's epilogue. ``weight``: as stored or
    packed (:func:`pack_conv_kernel`); ``residual``: the output's shape, dtype and layout (channels_last)."""
    if residual is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args,
                                                              "add", None, None, [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "none", [], "")


def linear_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias) + residual``, the sum in the matmul's epilogue."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GEGLU ``h * gelu(gate)`` of the projection ``(weight, bias)`` (out = 2 * d; h first): two matmuls, the
    exact (erf) GELU in the gate's epilogue, and in bf16 the product in the second one's epilogue (rounded
    once); no (tokens x 2d) buffer and no separate GELU pass."""
    d = weight.shape[0] // 2
    b_h, b_gate = (None, None) if bias is None else (bias[:d], bias[d:])
    linear = torch.ops.mkldnn._linear_pointwise
    gate_ = linear(x, weight[d:], b_gate, "gelu", [], "none")
    if x.dtype == torch.bfloat16:
        return linear.binary(x, gate_, weight[:d], b_h, "mul")
    return gate_.mul_(linear(x, weight[:d], b_h, "none", [], ""))
