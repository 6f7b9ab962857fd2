"""The token transformer of the LDM text encoders (``BERTEmbedder``, ``TransformerEmbedder``).

The original ships its own copy of an early version of lucidrains' x-transformers. This module keeps its
outside -- class names, constructor arguments, the ``forward(x, return_embeddings=...)`` call and the module
names that make up the checkpoint keys -- and only the part the LDM models use: token and learned absolute
position embeddings, pre-norm (or post-norm) blocks of multi-head self-attention and a feed-forward network,
a final LayerNorm and the logits head. Keys of ``TransformerWrapper(num_tokens, max_seq_len,
attn_layers=Encoder(dim, depth))``::

    token_emb.weight                      (num_tokens, dim)
    pos_emb.emb.weight                    (max_seq_len, dim)
    attn_layers.layers.{2i}.0.*           LayerNorm before the attention of block i
    attn_layers.layers.{2i}.1.to_q/to_k/to_v.weight (heads*dim_head, dim), .to_out.weight/.bias
    attn_layers.layers.{2i+1}.0.*         LayerNorm before the feed-forward of block i
    attn_layers.layers.{2i+1}.1.net.0.0.* (mult*dim, dim), .net.2.* (dim, mult*dim)
    norm.weight/.bias, to_logits.weight/.bias

Options of the original that no LDM config sets (relative position bias, rotary embeddings, memory tokens,
cross-attention layers, talking heads, sparse top-k, ...) are refused by name rather than ignored, and so are
attention masks: the LDM text encoders attend over all positions, padding included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import FeedForward

DEFAULT_DIM_HEAD = 64


def _split_prefixed(prefix: str, kwargs: dict) -> tuple[dict, dict]:
    """(options starting with ``prefix``, without it; the other options) -- x-transformers' ``attn_*``/``ff_*``."""
    mine = {k[len(prefix):]: v for k, v in kwargs.items() if k.startswith(prefix)}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(prefix)}
    return mine, rest


def _refuse(what: str, options: dict) -> None:
    if options:
        raise TypeError(f"{what}: options not supported by this port of the original x_transformer (no LDM "
                        f"model uses them): {', '.join(sorted(options))}")


class AbsolutePositionalEmbedding(nn.Module):
    """A learned embedding per position: (B, N, ...) -> (1, N, dim), added to the token embeddings unscaled."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=self.emb.weight.device)
        return self.emb(positions)[None]


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(dim_head)) v`` (Vaswani et al. 2017, eq. 1), on x (B, N, dim).

    The inner width is ``heads * dim_head`` (512 by default) whatever ``dim`` is; q, k and v have no bias.
    """

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, causal: bool = False,
                 dropout: float = 0.0, **unsupported):
        super().__init__()
        _refuse("Attention", unsupported)
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.causal = causal
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, dim_head)
                   for proj in (self.to_q, self.to_k, self.to_v))
        p = self.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class AttentionLayers(nn.Module):
    """``depth`` blocks of self-attention then feed-forward, each with a residual connection: x (B, N, dim).

    Pre-norm (default): ``x = x + f(LayerNorm(x))``; post-norm: ``x = LayerNorm(x + f(x))``. Block ``i`` is
    ``layers[2i]`` (attention) and ``layers[2i + 1]`` (feed-forward), each ``[LayerNorm, module]``.
    Options for the attention start with ``attn_`` (``attn_dim_head``, ``attn_dropout``), for the feed-forward
    with ``ff_`` (``ff_mult``, ``ff_glu``, ``ff_dropout``), as in x-transformers.
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, causal: bool = False, pre_norm: bool = True,
                 **kwargs):
        super().__init__()
        ff_kwargs, kwargs = _split_prefixed("ff_", kwargs)
        attn_kwargs, kwargs = _split_prefixed("attn_", kwargs)
        _refuse(type(self).__name__, kwargs)
        self.dim = dim
        self.depth = depth
        self.pre_norm = pre_norm
        self.has_pos_emb = False  # no relative or rotary position scheme: the wrapper adds absolute positions
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList()
        for kind in self.layer_types:
            block = (Attention(dim, heads=heads, causal=causal, **attn_kwargs) if kind == "a"
                     else FeedForward(dim, **ff_kwargs))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), block]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("attention masks are not used by the LDM text encoders")
        for norm, block in self.layers:
            if self.pre_norm:
                x = x + block(norm(x))
            else:
                x = norm(x + block(x))
        return x


class Encoder(AttentionLayers):
    """Bidirectional :class:`AttentionLayers` (every position attends to every position)."""

    def __init__(self, **kwargs):
        if "causal" in kwargs:
            raise TypeError("Encoder is never causal; use Decoder")
        super().__init__(causal=False, **kwargs)


class Decoder(AttentionLayers):
    """Causal :class:`AttentionLayers` (a position attends to itself and the ones before it)."""

    def __init__(self, **kwargs):
        if "causal" in kwargs:
            raise TypeError("Decoder is always causal")
        super().__init__(causal=True, **kwargs)


class TransformerWrapper(nn.Module):
    """Token ids (B, N) -> hidden states (B, N, dim) with ``return_embeddings=True``, else logits (B, N, num_tokens).

    ``x = token_emb(ids) + pos_emb(positions)``, dropout, ``attn_layers``, then the final LayerNorm ``norm``
    (and ``to_logits``).
    """

    def __init__(self, *, num_tokens: int, max_seq_len: int, attn_layers: AttentionLayers,
                 emb_dim: int | None = None, emb_dropout: float = 0.0, tie_embedding: bool = False,
                 use_pos_emb: bool = True, **unsupported):
        super().__init__()
        unsupported = {k: v for k, v in unsupported.items() if not (k in ("max_mem_len", "num_memory_tokens")
                                                                    and not v)}
        _refuse("TransformerWrapper", unsupported)
        dim = attn_layers.dim
        emb_dim = emb_dim if emb_dim is not None else dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = (AbsolutePositionalEmbedding(emb_dim, max_seq_len)
                        if use_pos_emb and not attn_layers.has_pos_emb else None)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.tie_embedding = tie_embedding
        self.to_logits = None if tie_embedding else nn.Linear(dim, num_tokens)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False, mask: torch.Tensor | None = None,
                **unsupported) -> torch.Tensor:
        _refuse("TransformerWrapper.forward", {k: v for k, v in unsupported.items() if v})
        if x.shape[1] > self.max_seq_len:
            raise ValueError(f"{x.shape[1]} tokens, more than the {self.max_seq_len} positions of this transformer")
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(h)
        h = self.project_emb(self.emb_dropout(h))
        h = self.norm(self.attn_layers(h, mask=mask))
        if return_embeddings:
            return h
        return h @ self.token_emb.weight.t() if self.tie_embedding else self.to_logits(h)
