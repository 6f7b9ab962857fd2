"""Full-size SD v1 (v1-inference.yaml) on the reference's deterministic weights, loaded from a real-layout
``.ckpt`` through the library loader, against the original's outputs (tests/fixtures/full/io.safetensors).

Needs about 5 GB of RAM and a minute or two; marked ``slow``.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.backend import winograd
from ldm.inference.residency import PartWeights
from ldm.loading.build import load_model_from_config
from ldm.testing.deterministic_weights import write_deterministic_checkpoint
from tests.conftest import FIXTURES, assert_matches_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    config = OmegaConf.load("configs/stable-diffusion/v1-inference.yaml")
    path = tmp_path_factory.mktemp("full") / "sd-v1-det.ckpt"
    write_deterministic_checkpoint(config, path, seed=0)
    model = load_model_from_config(config, path)
    yield model
    path.unlink()


@pytest.fixture(scope="module")
def full_io():
    return load_file(FIXTURES / "full" / "io.safetensors")


def test_full_text_encoder(full_model, full_io):
    with torch.no_grad():
        cond = full_model.get_learned_conditioning(["a photograph of an astronaut riding a horse", ""])
    assert_matches_reference(cond, full_io["cond"], "cond")


def test_full_unet(full_model, full_io):
    with torch.no_grad():
        eps = full_model.apply_model(full_io["unet_x"], full_io["unet_t"], full_io["cond"][:1].expand(2, -1, -1))
    assert_matches_reference(eps, full_io["unet_eps"], "unet_eps")


def test_full_autoencoder(full_model, full_io):
    posterior = full_model.encode_first_stage(full_io["img"])
    assert_matches_reference(posterior.mean, full_io["post_mean"], "post_mean")
    assert_matches_reference(posterior.logvar, full_io["post_logvar"], "post_logvar")
    assert_matches_reference(full_model.decode_first_stage(full_io["z"]), full_io["decoded"], "decoded")


def test_full_model_with_winograd(full_model, full_io, monkeypatch):
    """The float32 CPU inference path with the Winograd thresholds lowered to the fixture's small sizes: F(4x4)
    and F(2x2) through the whole depth of the UNet and the autoencoder stay within the reference tolerance."""
    monkeypatch.setattr(winograd, "MIN_PIXELS", {4: 64, 2: 4})
    tiles: list[int] = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, *args: tiles.append(args[2]) or conv3x3(x, *args))
    parts = [PartWeights(p, torch.float32, torch.contiguous_format)
             for p in (full_model.model, full_model.first_stage_model)]
    for part in parts:
        part.use()
    try:
        with torch.no_grad():
            eps = full_model.apply_model(full_io["unet_x"], full_io["unet_t"], full_io["cond"][:1].expand(2, -1, -1))
            decoded = full_model.decode_first_stage(full_io["z"])
            mean = full_model.encode_first_stage(full_io["img"]).mean
    finally:
        for part in parts:
            part.set_aside()
    assert tiles.count(4) > 20 and tiles.count(2) > 20
    assert_matches_reference(eps, full_io["unet_eps"], "unet_eps")
    assert_matches_reference(decoded, full_io["decoded"], "decoded")
    assert_matches_reference(mean, full_io["post_mean"], "post_mean")
