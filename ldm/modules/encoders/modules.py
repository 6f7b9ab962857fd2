"""Conditioning encoders: the frozen CLIP text encoder of SD v1, and the small LDM class/spatial encoders.

Nothing here touches the network. The CLIP text transformer is built from a configuration (the ViT-L/14 one
below by default, or a local folder's), its tokenizer files ship with the package, and its weights come from
the Stable Diffusion checkpoint (``cond_stage_model.transformer.*``).
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

DEFAULT_CLIP_VERSION = "openai/clip-vit-large-patch14"
TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"

# The text half of openai/clip-vit-large-patch14, the encoder SD v1 was trained with.
CLIP_VIT_L14_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class ClassEmbedder(nn.Module):
    """Class label -> (B, 1, embed_dim) embedding (class-conditional LDMs)."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: dict, key: str | None = None) -> torch.Tensor:
        c = batch[key or self.key][:, None]
        return self.embedding(c)


class SpatialRescaler(nn.Module):
    """Resize a spatial conditioning map ``n_stages`` times by ``multiplier``, optionally remapping channels."""

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5,
                 in_channels: int = 3, out_channels: int | None = None, bias: bool = False):
        super().__init__()
        self.n_stages = n_stages
        assert self.n_stages >= 0
        assert method in ["nearest", "linear", "bilinear", "trilinear", "bicubic", "area"]
        self.multiplier = multiplier
        self.interpolator = partial(torch.nn.functional.interpolate, mode=method)
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = self.interpolator(x, scale_factor=self.multiplier)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


PROJECT_ROOT = Path(__file__).resolve().parents[3]


def _local_folder(version: str) -> Path | None:
    """``version`` as a folder: as given, or (a relative path, as in the configs shipped under ``models/``)
    relative to the project root, so the scripts work from any working directory."""
    path = Path(os.path.expanduser(version))
    if not path.is_dir() and not path.is_absolute() and (PROJECT_ROOT / path).is_dir():
        path = PROJECT_ROOT / path
    return path if path.is_dir() else None


def _text_config(folder: Path | None):
    from transformers import CLIPTextConfig

    if folder is None:
        return CLIPTextConfig(**CLIP_VIT_L14_TEXT_CONFIG)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"CLIP folder {folder} has no config.json; add the text model's config.json "
                                f"or use version: {DEFAULT_CLIP_VERSION}")
    return CLIPTextConfig.from_pretrained(folder, local_files_only=True)  # also reads a full CLIPConfig


def _tokenizer(folder: Path | None):
    from transformers import CLIPTokenizer

    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


class FrozenCLIPEmbedder(AbstractEncoder):
    """Prompts -> CLIP text hidden states (B, max_length, hidden), the cross-attention context of the UNet.

    ``version``: the default ``openai/clip-vit-large-patch14`` builds ViT-L/14's text transformer from
    :data:`CLIP_VIT_L14_TEXT_CONFIG` with the tokenizer shipped in the package; a local folder supplies its own
    ``config.json`` and tokenizer files (and weights, optionally). Any other name is an error: nothing is
    downloaded. ``device`` is accepted for compatibility; tokens follow the transformer's own device.
    """

    def __init__(self, version: str = DEFAULT_CLIP_VERSION, device: str = "cuda", max_length: int = 77):
        super().__init__()
        from transformers import CLIPTextModel

        folder = _local_folder(str(version))
        if folder is None and version != DEFAULT_CLIP_VERSION:
            raise FileNotFoundError(
                f"CLIP text encoder '{version}' is not a local folder and models are never downloaded; "
                f"use version: {DEFAULT_CLIP_VERSION} (built in) or the path of a folder with config.json "
                f"and the tokenizer files")
        self.tokenizer = _tokenizer(folder)
        if folder is not None and any((folder / name).is_file() for name in WEIGHT_FILES):
            self.transformer = CLIPTextModel.from_pretrained(folder, local_files_only=True)
        else:
            self.transformer = CLIPTextModel(_text_config(folder))
        self.device = device
        self.max_length = max_length
        self.freeze()

    def freeze(self) -> None:
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """Token ids (B, max_length): start token, BPE ids, end token, padded with the end token, truncated."""
        batch_encoding = self.tokenizer(list(text), truncation=True, max_length=self.max_length,
                                        padding="max_length", return_tensors="pt")
        return batch_encoding["input_ids"]

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` including start and end tokens, before truncation."""
        return len(self.tokenizer(text, truncation=False).input_ids)

    def forward(self, text: list[str]) -> torch.Tensor:
        embeddings = self.transformer.embeddings.token_embedding.weight
        tokens = self.tokenize(text).to(embeddings.device)
        return self.transformer(input_ids=tokens).last_hidden_state

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)
