"""The Stable Diffusion safety checker: CLIP image embedding vs. 17 concept (+3 special-care) embeddings.

Same weights layout and decisions as ``CompVis/stable-diffusion-safety-checker`` run through diffusers'
``StableDiffusionSafetyChecker``: an image is flagged when, for some concept, the cosine similarity of its
projected CLIP embedding minus the concept's threshold, rounded to 3 decimals, is positive; a special-care hit
first lowers every concept threshold by 0.01. Weights come from a local folder in the Hugging Face layout
(``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, ``preprocessor_config.json``) or from the
local Hugging Face cache. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldm.errors import CheckpointError, ModelNotFoundError
from ldm.loading.build import parameters_on_meta
from ldm.loading.checkpoint import load_weights_into, read_state_dict
from ldm.loading.local_files import hf_cache_folder

SAFETY_MODEL_ID = "CompVis/stable-diffusion-safety-checker"
LOCAL_FOLDER = Path("models/safety-checker")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SPECIAL_CARE_ADJUSTMENT = 0.01
# transformers < 5 nested CLIPVisionModel's modules under ``vision_model``; its old files also hold position ids
LEGACY_PREFIX = ("vision_model.vision_model.", "vision_model.")
IGNORED_KEYS = ("vision_model.vision_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# CLIP's preprocessing, as in the checker's preprocessor_config.json (used when that file is absent)
DEFAULT_PREPROCESSOR = {"do_resize": True, "size": 224, "resample": 3, "do_center_crop": True, "crop_size": 224,
                        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)


def find_safety_checker(spec: str) -> Path | None:
    """Resolve ``--safety_checker``: ``off`` -> None; ``auto`` -> a local copy or None; a path -> that folder."""
    if spec == "off":
        return None
    if spec == "auto":
        if _has_weights(LOCAL_FOLDER):
            return LOCAL_FOLDER
        return hf_cache_folder(SAFETY_MODEL_ID, _has_weights)
    folder = Path(os.path.expanduser(spec))
    if not folder.is_dir():
        raise ModelNotFoundError(f"safety checker folder not found: {folder}; give the folder of {SAFETY_MODEL_ID} "
                                 f"(config.json and weights), or --safety_checker auto|off")
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"safety checker folder {folder} has no config.json; it must hold the files of "
                                 f"{SAFETY_MODEL_ID}")
    if not _has_weights(folder):
        raise ModelNotFoundError(f"safety checker folder {folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    return folder


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


class SafetyChecker(nn.Module):
    """CLIP vision tower + projection, with the concept embeddings and thresholds as buffers.

    ``vision_config``: a ``transformers.CLIPVisionConfig``; ``projection_dim``: the embedding size compared
    with the concepts.
    """

    def __init__(self, vision_config, projection_dim: int, n_concepts: int = 17, n_special: int = 3):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_model = CLIPVisionModel(vision_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
        self.register_buffer("concept_embeds", torch.ones(n_concepts, projection_dim))
        self.register_buffer("special_care_embeds", torch.ones(n_special, projection_dim))
        self.register_buffer("concept_embeds_weights", torch.ones(n_concepts))
        self.register_buffer("special_care_embeds_weights", torch.ones(n_special))
        self.processor = None

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu") -> SafetyChecker:
        """Load a checker saved in the Hugging Face layout of :data:`SAFETY_MODEL_ID` (strictly, no network)."""
        from transformers import CLIPVisionConfig
        from transformers.models.clip import CLIPImageProcessorPil

        folder = Path(folder)
        config = _read_json(folder / "config.json")
        vision = dict(config.get("vision_config") or {})
        vision.update(config.get("vision_config_dict") or {})  # older files repeat the overrides here
        for key in ("architectures", "model_type", "transformers_version", "_name_or_path"):
            vision.pop(key, None)
        weights = next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())
        state_dict = read_state_dict(weights)
        state_dict = {LEGACY_PREFIX[1] + k[len(LEGACY_PREFIX[0]):] if k.startswith(LEGACY_PREFIX[0]) else k: v
                      for k, v in state_dict.items() if k not in IGNORED_KEYS}
        try:
            vision_config = CLIPVisionConfig(**vision)
            n_concepts = state_dict["concept_embeds"].shape[0] if "concept_embeds" in state_dict else 17
            n_special = state_dict["special_care_embeds"].shape[0] if "special_care_embeds" in state_dict else 3
            with parameters_on_meta():
                checker = cls(vision_config, int(config.get("projection_dim", 768)), n_concepts, n_special)
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"safety checker config {folder / 'config.json'} is not usable: {err}") from None
        load_weights_into(checker, state_dict, dtype=torch.float32, assign=True, verbose=False, name=str(weights))
        preprocessor_file = folder / "preprocessor_config.json"
        preprocessor = _read_json(preprocessor_file) if preprocessor_file.is_file() else dict(DEFAULT_PREPROCESSOR)
        for key in ("feature_extractor_type", "image_processor_type", "processor_class"):
            preprocessor.pop(key, None)
        checker.processor = CLIPImageProcessorPil.from_dict(preprocessor)
        return checker.requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def image_embeds(self, clip_input: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, 224, 224) -> projected CLIP embeddings (B, projection_dim)."""
        pooled = self.vision_model(clip_input).pooler_output
        return self.visual_projection(pooled)

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor) -> list[bool]:
        """Preprocessed images (B, 3, 224, 224) -> whether each shows one of the concepts."""
        embeds = F.normalize(self.image_embeds(clip_input.to(self.concept_embeds.device)))
        special_cos = (embeds @ F.normalize(self.special_care_embeds).t()).cpu().float().numpy()
        concept_cos = (embeds @ F.normalize(self.concept_embeds).t()).cpu().float().numpy()
        special_thresholds = self.special_care_embeds_weights.cpu().float().numpy()
        concept_thresholds = self.concept_embeds_weights.cpu().float().numpy()
        # scores are float32 and rounded to 3 decimals before the sign test, as the reference does
        special = np.any(np.round(special_cos - special_thresholds, 3) > 0, axis=1)
        adjustment = np.where(special, np.float32(SPECIAL_CARE_ADJUSTMENT), np.float32(0.0))[:, None]
        flagged = np.any(np.round(concept_cos - concept_thresholds + adjustment, 3) > 0, axis=1)
        return [bool(f) for f in flagged]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> CLIP input (B, 3, 224, 224) with the folder's preprocessing."""
        return self.processor(list(images), return_tensors="pt").pixel_values

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        """Whether each RGB image is flagged."""
        if not images:
            return []
        return self(self.preprocess(images))


def load_safety_checker(spec: str, device: str | torch.device = "cpu",
                        warn=print) -> SafetyChecker | None:
    """The checker for ``--safety_checker`` (``auto``/``off``/path); with ``auto`` and no local copy, warn, None."""
    folder = find_safety_checker(spec)
    if folder is None:
        if spec == "auto":
            warn(f"warning: safety checker not found locally (looked in {LOCAL_FOLDER}/ and the Hugging Face cache "
                 f"for {SAFETY_MODEL_ID}); images are not checked")
        return None
    return SafetyChecker.from_folder(folder, device)
