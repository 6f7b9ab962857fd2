"""Conditioning encoders: the frozen CLIP text encoder of SD v1, the BERT-tokenised transformer of the LDM
text-to-image models (LAION-400M), and the small LDM class/spatial encoders.

Nothing here touches the network. The CLIP text transformer is built from a configuration (the ViT-L/14 one
below by default, or a local folder's), its tokenizer files ship with the package, and its weights come from
the Stable Diffusion checkpoint (``cond_stage_model.transformer.*``). The BERT tokenizer's vocabulary is read
from a local folder (``models/bert-base-uncased/`` or the Hugging Face cache, see :func:`find_bert_tokenizer`);
the transformer behind it (:mod:`ldm.modules.x_transformer`) takes its weights from the checkpoint.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ldm.errors import InputError, TokenizerNotFoundError, first_line

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


class CLIPTokenIds:
    """Prompts -> CLIP token ids through the ``tokenizers`` pipeline alone (no transformers import: 1 s less at
    start-up), for an inference engine that runs the text transformer elsewhere (:mod:`ldm.inference.openvino`).
    Built from what :meth:`state` takes of a :class:`FrozenCLIPEmbedder` (its tokenizer's serialized pipeline, the
    length and the padding id), it gives that embedder's ``tokenize`` and ``count_tokens``."""

    def __init__(self, pipeline: str, max_length: int, pad_id: int):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._plain = Tokenizer.from_str(pipeline)
        self._plain.no_truncation()
        self._plain.no_padding()
        self._fixed = Tokenizer.from_str(pipeline)
        self._fixed.enable_truncation(max_length)
        self._fixed.enable_padding(length=max_length, pad_id=pad_id)

    @staticmethod
    def state(embedder: FrozenCLIPEmbedder) -> dict | None:
        """What rebuilds ``embedder``'s tokenization (JSON), or None where its tokenizer has no ``tokenizers``
        pipeline."""
        backend = getattr(embedder.tokenizer, "backend_tokenizer", None)
        if backend is None or embedder.tokenizer.pad_token_id is None:
            return None
        return {"pipeline": backend.to_str(), "max_length": int(embedder.max_length),
                "pad_id": int(embedder.tokenizer.pad_token_id)}

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """Token ids (B, max_length), as :meth:`FrozenCLIPEmbedder.tokenize`."""
        return torch.tensor([e.ids for e in self._fixed.encode_batch(list(text))], dtype=torch.long)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` including start and end tokens, before truncation."""
        return len(self._plain.encode(text).ids)


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


# ---------------------------------------------------------------------------------------------- BERT (LAION-400M)
DEFAULT_BERT_VERSION = "bert-base-uncased"
# hub ids under which a tokenizer may sit in the local Hugging Face cache (the hub renamed bert-base-uncased)
BERT_HUB_IDS = {DEFAULT_BERT_VERSION: (DEFAULT_BERT_VERSION, "google-bert/bert-base-uncased")}
BERT_VOCAB_FILES = ("vocab.txt", "tokenizer.json")
MODELS_DIR = Path("models")  # a named tokenizer is looked up in models/<name>/ (cwd, then the project root)


def _has_bert_vocab(folder: Path) -> bool:
    return any((folder / name).is_file() for name in BERT_VOCAB_FILES)


def _tokenizer_missing(version: str) -> TokenizerNotFoundError:
    local = MODELS_DIR / version
    return TokenizerNotFoundError(
        f"BERT tokenizer '{version}' not found in {local}/ nor in the Hugging Face cache, and tokenizers are never "
        f"downloaded: put its vocab.txt (from https://huggingface.co/{version}) in {local}/ in the project folder, "
        f"or set tokenizer_version in the config to a folder that holds one")


def find_bert_tokenizer(version: str = DEFAULT_BERT_VERSION) -> Path:
    """The folder holding the WordPiece vocabulary of ``version`` (``vocab.txt`` or ``tokenizer.json``).

    ``version`` is a folder (as given, or relative to the project root), or a name such as ``bert-base-uncased``,
    looked up in ``models/<name>/`` (under the working directory, then the project root) and in the local
    Hugging Face cache. Raises :class:`ldm.errors.TokenizerNotFoundError` naming where to put it; nothing is
    downloaded.
    """
    version = str(version)
    folder = _local_folder(version)
    if folder is not None:
        if not _has_bert_vocab(folder):
            raise TokenizerNotFoundError(f"BERT tokenizer folder {folder} has no vocab.txt (nor tokenizer.json); put "
                                         f"the tokenizer's vocab.txt there")
        return folder
    for base in (Path.cwd(), PROJECT_ROOT):
        if _has_bert_vocab(base / MODELS_DIR / version):
            return base / MODELS_DIR / version
    from ldm.loading.local_files import hf_cache_folder

    for repo_id in BERT_HUB_IDS.get(version, (version,)):
        try:
            cached = hf_cache_folder(repo_id, complete=_has_bert_vocab)
        except (OSError, ValueError):  # an unreadable cache, or a name that is no hub id
            cached = None
        if cached is not None:
            return cached
    raise _tokenizer_missing(version)


def load_bert_tokenizer(version: str = DEFAULT_BERT_VERSION):
    """The ``BertTokenizerFast`` of ``version`` (see :func:`find_bert_tokenizer`), checked to hold a real
    vocabulary: offline, transformers can return a tokenizer with only the special tokens, which would turn
    every word into ``[UNK]``."""
    from transformers import BertTokenizerFast

    folder = find_bert_tokenizer(version)
    try:
        # from_pretrained(folder): the constructor's vocab_file= is silently ignored by transformers 5
        tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # corrupt or foreign files: tell which folder, in one line
        first = first_line(err)
        raise TokenizerNotFoundError(f"cannot read the BERT tokenizer in {folder}: {first}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise TokenizerNotFoundError(f"the BERT tokenizer in {folder} holds only its {len(tokenizer)} special tokens; "
                                     f"its vocab.txt must list the whole vocabulary, one token a line")
    return tokenizer


def check_tokenizer(cond_stage_config) -> None:
    """Fail now, before the checkpoint is loaded, when a BERT text encoder's tokenizer is not on this machine
    (``cond_stage_config``: the config's ``cond_stage_config`` entry; anything else passes)."""
    if not hasattr(cond_stage_config, "get"):
        return
    target = str(cond_stage_config.get("target", ""))
    params = cond_stage_config.get("params") or {}
    if target == f"{__name__}.BERTEmbedder" and params.get("use_tokenizer", True):
        find_bert_tokenizer(params.get("tokenizer_version", DEFAULT_BERT_VERSION))
    elif target == f"{__name__}.BERTTokenizer":
        find_bert_tokenizer(params.get("version", DEFAULT_BERT_VERSION))


def _usable_device(device: str | torch.device) -> torch.device:
    """``device``, or the CPU where it is a CUDA device this machine lacks (the original's default is "cuda")."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cuda" and not torch.cuda.is_available() else device


class BERTTokenizer(AbstractEncoder):
    """Prompts -> BERT WordPiece ids (B, max_length): ``[CLS] pieces [SEP] [PAD] ...``, cut to ``max_length``.

    ``version``: the tokenizer's folder or name (see :func:`find_bert_tokenizer`; never downloaded).
    ``vq_interface``: :meth:`encode` returns ``(None, None, [None, None, tokens])`` as the original's.
    """

    def __init__(self, device: str = "cuda", vq_interface: bool = True, max_length: int = 77,
                 version: str = DEFAULT_BERT_VERSION):
        super().__init__()
        self.tokenizer = load_bert_tokenizer(version)
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        """Token ids (B, max_length) on the CPU."""
        batch_encoding = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                                        return_tensors="pt")
        return batch_encoding["input_ids"]

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` including ``[CLS]`` and ``[SEP]``, before truncation."""
        return len(self.tokenizer(text, truncation=False, verbose=False).input_ids)

    def forward(self, text: str | list[str]) -> torch.Tensor:
        return self.tokenize(text).to(_usable_device(self.device))

    @torch.no_grad()
    def encode(self, text: str | list[str]):
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text):
        return text


class BERTEmbedder(AbstractEncoder):
    """Prompts -> (B, max_seq_len, n_embed): BERT WordPiece tokens through a transformer trained with the LDM
    (:class:`ldm.modules.x_transformer.TransformerWrapper`; not a Hugging Face BERT, only the tokenizer is BERT's).

    ``tokenizer_version`` (not in the original, which always loads ``bert-base-uncased`` from the hub): a folder
    or a name, found locally (see :func:`find_bert_tokenizer`). ``device`` is accepted for compatibility: tokens
    go to the device of the transformer's weights. With ``use_tokenizer=False`` the input is token ids (B, N).
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 device: str = "cuda", use_tokenizer: bool = True, embedding_dropout: float = 0.0,
                 tokenizer_version: str = DEFAULT_BERT_VERSION):
        super().__init__()
        from ldm.modules.x_transformer import Encoder, TransformerWrapper

        self.use_tknz_fn = use_tokenizer
        if self.use_tknz_fn:
            self.tknz_fn = BERTTokenizer(device=device, vq_interface=False, max_length=max_seq_len,
                                         version=tokenizer_version)
            if len(self.tknz_fn.tokenizer) > vocab_size:
                raise InputError(f"the BERT tokenizer '{tokenizer_version}' has {len(self.tknz_fn.tokenizer)} "
                                 f"tokens, more than the {vocab_size} (vocab_size) the text encoder embeds; use the "
                                 f"tokenizer the model was trained with")
        self.device = device
        self.max_length = max_seq_len
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """Token ids (B, max_seq_len) on the CPU."""
        return self.tknz_fn.tokenize(text)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` including ``[CLS]`` and ``[SEP]``, before truncation."""
        return self.tknz_fn.count_tokens(text)

    def forward(self, text) -> torch.Tensor:
        tokens = self.tknz_fn.tokenize(text) if self.use_tknz_fn else text
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True)

    def encode(self, text) -> torch.Tensor:
        return self(text)


class TransformerEmbedder(AbstractEncoder):
    """Token ids (B, N) -> (B, N, n_embed) through :class:`ldm.modules.x_transformer.TransformerWrapper`."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device: str = "cuda"):
        super().__init__()
        from ldm.modules.x_transformer import Encoder, TransformerWrapper

        self.device = device
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(self.transformer.token_emb.weight.device), return_embeddings=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
