"""Transformer blocks of the SD v1 UNet: cross-attention on text, applied to image feature maps.

Module and attribute names follow the original so checkpoint keys match
(``attn1.to_q.weight``, ``ff.net.0.proj.weight``, ``transformer_blocks.0.norm1.weight``, ...).
Attention runs through ``scaled_dot_product_attention``: no (tokens x tokens) matrix is materialised.
Feature maps may be channels_last (see :mod:`ldm.modules.ops`): then the token view of a map is free, and the
result keeps the input's memory format so the convolutions never convert their weights per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.backend.layout import memory_format_of
from ldm.modules.diffusionmodules.util import checkpoint, zero_module
from ldm.modules.ops import linear_add, linear_geglu, pointwise_conv
from ldm.util import default


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): ``x * gelu(gate)`` with x and gate from one projection."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_geglu(self.proj, x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``net(x)``, plus ``residual`` when given (added in the last matmul where possible)."""
        if residual is None:
            return self.net(x)
        if self.training and self.net[1].p > 0:
            return self.net(x) + residual
        return linear_add(self.net[2], self.net[0](x), residual)


def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v.  q: (B, N, H*d), k/v: (B, M, H*d) -> (B, N, H*d)."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, N, query_dim) on ``context`` (B, M, context_dim); self-attention without it."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output, plus ``residual`` when given (added in the output projection where possible)."""
        if mask is not None:
            raise NotImplementedError("attention masks are not used by Stable Diffusion v1")
        context = default(context, x)
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        if residual is None:
            return self.to_out(out)
        if self.training and self.to_out[1].p > 0:
            return self.to_out(out) + residual
        return linear_add(self.to_out[0], out, residual)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the context, gated feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: int | None = None, gated_ff: bool = True, checkpoint: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # each residual is added to a fresh Linear output (in place, or in the matmul's epilogue)
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context=context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """Transformer on a feature map: (B, C, H, W) -> tokens (B, H*W, inner) -> blocks -> (B, C, H, W) + input."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim)
             for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = pointwise_conv(self.proj_in, self.norm(x))
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, H*W, inner): a view when x is channels_last
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(x_in))
        return pointwise_conv(self.proj_out, x, residual=x_in)
