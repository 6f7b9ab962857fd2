"""The safety checker: loading the Hugging Face folder layout offline, and decisions equal to diffusers'
``StableDiffusionSafetyChecker`` (a test-only dependency) on the same small random weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.errors import CheckpointError, ModelNotFoundError
from ldm.inference.safety import DEFAULT_PREPROCESSOR, SafetyChecker, find_safety_checker, load_safety_checker
from ldm.loading.local_files import hf_cache_folder

diffusers_checker = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")


def tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16)


def reference_checker(seed: int = 0):
    """diffusers' checker with random weights and concept embeddings (thresholds set later)."""
    torch.manual_seed(seed)
    model = diffusers_checker.StableDiffusionSafetyChecker(tiny_clip_config()).eval()
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn_like(model.concept_embeds))
        model.special_care_embeds.copy_(torch.randn_like(model.special_care_embeds))
    return model


def cosines(model, clip_input):
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(clip_input)[1])
        special = diffusers_checker.cosine_distance(embeds, model.special_care_embeds)
        concept = diffusers_checker.cosine_distance(embeds, model.concept_embeds)
    return special.numpy(), concept.numpy()


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Varied RGB images of several sizes: flat colours, checkerboards, gradients, noise."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        h, w = [(64, 64), (64, 96), (128, 64), (200, 300)][i % 4]
        y, x = np.mgrid[0:h, 0:w]
        kind = i % 4
        if kind == 0:
            array = np.broadcast_to(rng.integers(0, 256, 3), (h, w, 3))
        elif kind == 1:
            array = ((x // (4 + i) + y // (4 + i)) % 2)[..., None] * rng.integers(0, 256, 3)
        elif kind == 2:
            array = (x / w)[..., None] * rng.integers(0, 256, 3) + (y / h)[..., None] * rng.integers(0, 256, 3)
        else:
            array = rng.integers(0, 256, (h, w, 3))
        images.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    return images


def set_concepts(model, clip_input) -> None:
    """Concepts and thresholds that give a mix of decisions, including the hard cases of the reference logic:
    scores inside the 3-decimal rounding band, and a special-care hit that pushes a concept over by 0.01.
    Concepts 0-3 are the embeddings of images 0-3 (cosine 1 with their own image, < 0.95 with the others)."""
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(clip_input)[1])
        model.concept_embeds[:4] = embeds[:4]
        model.special_care_embeds[0] = embeds[0]
    special, concept = cosines(model, clip_input)
    special_thr = special.max(axis=0) + 0.05          # no special-care hit ...
    special_thr[0] = special[0, 0] - 0.02              # ... except for image 0
    concept_thr = concept.max(axis=0) + 0.05           # nothing flagged, except:
    concept_thr[0] = concept[0, 0] + 0.005             # image 0: -0.005 + 0.01 special adjustment -> flagged
    concept_thr[1] = concept[1, 1] - 0.0004            # image 1: +0.0004 rounds to 0.0 -> not flagged
    concept_thr[2] = concept[2, 2] - 0.0007            # image 2: +0.0007 rounds to 0.001 -> flagged
    concept_thr[3] = concept[3, 3] + 0.005             # image 3: -0.005 and no special-care hit -> not flagged
    concept_thr[5] = np.median(concept[:, 5])          # a random concept: about half of the images
    with torch.no_grad():
        model.special_care_embeds_weights.copy_(torch.from_numpy(special_thr))
        model.concept_embeds_weights.copy_(torch.from_numpy(concept_thr))


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
    """A checker saved by diffusers/transformers 5 (model.safetensors) with CLIP's preprocessor_config.json."""
    from transformers.models.clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("safety") / "checker"
    model = reference_checker()
    processor = CLIPImageProcessorPil.from_dict(DEFAULT_PREPROCESSOR)
    clip_input = processor(random_images(12), return_tensors="pt").pixel_values
    set_concepts(model, clip_input)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        dict(DEFAULT_PREPROCESSOR, feature_extractor_type="CLIPFeatureExtractor")))
    return folder


@pytest.fixture(scope="module")
def legacy_folder(checker_folder, tmp_path_factory):
    """The same weights in the layout of the real repository: transformers 4 key nesting
    (``vision_model.vision_model.*``, with ``position_ids``) in ``pytorch_model.bin``, ``vision_config_dict``."""
    folder = tmp_path_factory.mktemp("safety") / "legacy"
    folder.mkdir()
    shutil.copy(checker_folder / "preprocessor_config.json", folder)
    config = json.loads((checker_folder / "config.json").read_text())
    config["vision_config_dict"] = {k: config["vision_config"][k] for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size")}
    config["architectures"] = ["StableDiffusionSafetyChecker"]
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(checker_folder / "model.safetensors")
    legacy = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in state.items()}
    legacy["vision_model.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    torch.save(legacy, folder / "pytorch_model.bin")
    return folder


def reference_decisions(folder: Path, clip_input: torch.Tensor) -> list[bool]:
    model = diffusers_checker.StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True).eval()
    images = np.zeros((len(clip_input), 8, 8, 3), dtype=np.float32)
    return [bool(f) for f in model(clip_input=clip_input, images=images)[1]]


@pytest.mark.parametrize("layout", ["checker_folder", "legacy_folder"])
def test_decisions_equal_diffusers(layout, request):
    folder = request.getfixturevalue(layout)
    ours = SafetyChecker.from_folder(folder)
    clip_input = ours.preprocess(random_images(12))
    expected = reference_decisions(folder, clip_input)
    assert ours(clip_input) == expected
    # the hand-made cases above are all exercised: flagged and not, rounding band and special-care adjustment
    assert expected[:4] == [True, False, True, False]
    assert 0 < sum(expected) < len(expected)


def test_decisions_on_other_inputs_equal_diffusers(checker_folder):
    ours = SafetyChecker.from_folder(checker_folder)
    torch.manual_seed(1)
    clip_input = torch.randn(16, 3, 224, 224)
    assert ours(clip_input) == reference_decisions(checker_folder, clip_input)


def test_weights_equal_diffusers_embedding(checker_folder):
    ours = SafetyChecker.from_folder(checker_folder)
    reference = diffusers_checker.StableDiffusionSafetyChecker.from_pretrained(checker_folder).eval()
    clip_input = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.visual_projection(reference.vision_model(clip_input)[1])
    torch.testing.assert_close(ours.image_embeds(clip_input), expected, rtol=0, atol=0)


def test_preprocessing_is_the_original_feature_extractor(checker_folder):
    """The original used the PIL CLIP feature extractor of the folder's preprocessor_config.json."""
    from transformers.models.clip import CLIPImageProcessorPil

    images = random_images(3, seed=5)
    expected = CLIPImageProcessorPil.from_pretrained(checker_folder)(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(SafetyChecker.from_folder(checker_folder).preprocess(images), expected)


def test_check_on_pil_images(checker_folder):
    ours = SafetyChecker.from_folder(checker_folder)
    images = random_images(12)
    assert ours.check(images) == reference_decisions(checker_folder, ours.preprocess(images))
    assert ours.check([]) == []


# ---------------------------------------------------------------------------------------------- finding it
def test_off_and_auto_without_local_copy(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_safety_checker("off") is None
    assert find_safety_checker("auto") is None
    warnings = []
    assert load_safety_checker("auto", warn=warnings.append) is None
    assert len(warnings) == 1 and "not found locally" in warnings[0]
    assert load_safety_checker("off", warn=warnings.append) is None and len(warnings) == 1


def test_auto_finds_the_hugging_face_cache(tmp_path, monkeypatch, checker_folder):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--CompVis--stable-diffusion-safety-checker"
    shutil.copytree(checker_folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    has_config = lambda folder: (folder / "config.json").is_file()  # noqa: E731
    assert hf_cache_folder("CompVis/stable-diffusion-safety-checker", has_config) == repo / "snapshots" / "abc123"
    assert find_safety_checker("auto") == repo / "snapshots" / "abc123"
    assert isinstance(load_safety_checker("auto"), SafetyChecker)


def test_auto_finds_the_local_folder(tmp_path, monkeypatch, checker_folder):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checker_folder, tmp_path / "models" / "safety-checker")
    assert find_safety_checker("auto") == Path("models/safety-checker")


def test_bad_paths(tmp_path, checker_folder):
    with pytest.raises(ModelNotFoundError, match="not found"):
        find_safety_checker(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        find_safety_checker(str(tmp_path))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(checker_folder / "config.json", partial)
    with pytest.raises(ModelNotFoundError, match="no weights"):
        find_safety_checker(str(partial))
    (partial / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        SafetyChecker.from_folder(partial)


def test_wrong_weights_are_named(tmp_path, checker_folder):
    folder = tmp_path / "wrong"
    shutil.copytree(checker_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        SafetyChecker.from_folder(folder)
