"""Winograd F(2x2, 3x3) and F(4x4, 3x3) (ldm/backend/winograd.py): the float32 CPU convolutions keep the
original's numbers.

The reference is the direct convolution in float64; the tiny model runs with the thresholds lowered so that its
small convolutions take the Winograd path, against the original's golden outputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.backend import winograd
from ldm.inference.residency import PartWeights
from ldm.loading.build import load_model_from_config
from ldm.modules.ops import Conv2d
from tests.conftest import assert_matches_reference, tiny_config

CL = torch.channels_last


def direct(x, weight, bias, residual=None):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    return y if residual is None else y + residual.double()


@pytest.fixture
def everywhere(monkeypatch):
    """Winograd for every eligible convolution, however small; returns the list of tile sizes used."""
    monkeypatch.setattr(winograd, "MIN_PIXELS", {4: 64, 2: 4})
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    used: list[int] = []
    conv3x3 = winograd.conv3x3

    def spy(x, weight, bias, m, residual=None):
        used.append(m)
        return conv3x3(x, weight, bias, m, residual)

    monkeypatch.setattr(winograd, "conv3x3", spy)
    return used


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("chunk", [None, 1])
def test_conv3x3_is_the_convolution(m, layout, chunk, monkeypatch):
    """With bias and residual, in either layout; ``chunk=1``: one tile row and one output channel per pass."""
    if chunk is not None:
        monkeypatch.setattr(winograd, "_MAX_CHUNK_BYTES", chunk)
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 12).contiguous(memory_format=layout)
    weight, bias = torch.randn(5, 6, 3, 3) / 7, torch.randn(5)
    residual = torch.randn(2, 5, 8, 12).contiguous(memory_format=layout)
    for b, r in ((None, None), (bias, None), (bias, residual)):
        y = winograd.conv3x3(x, weight, b, m, r)
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=layout)
        torch.testing.assert_close(y.double(), direct(x, weight, b, r), rtol=0, atol=5e-5)


@pytest.mark.parametrize("channels, size", [(320, 16), (1280, 8), (128, 64)])
def test_conv3x3_error_is_that_of_float32(channels, size):
    """On SD's channel counts the error stays at float32 rounding scale relative to the output: F(2x2) within
    1e-5 of its std (the direct float32 convolution: about 2e-6), F(4x4) within 1e-4 (about 6e-5 measured; the
    reference tolerance of the whole model is 1e-3)."""
    torch.manual_seed(0)
    x, weight = torch.randn(1, channels, size, size), torch.randn(channels, channels, 3, 3) / (9 * channels) ** 0.5
    expected = direct(x, weight, None)
    scale = expected.std().item()
    for m, bound in ((2, 1e-5), (4, 1e-4)):
        error = (winograd.conv3x3(x, weight, None, m).double() - expected).abs().max().item()
        assert error <= bound * scale, (m, error / scale)


def test_tile_size_follows_size_channels_and_divisibility():
    assert winograd.tile_size(torch.Size([2, 320, 64, 64]), 320, 320) == 4
    assert winograd.tile_size(torch.Size([2, 640, 32, 32]), 640, 640) == 2
    assert winograd.tile_size(torch.Size([2, 1280, 16, 16]), 1280, 1280) == 2
    assert winograd.tile_size(torch.Size([2, 1280, 8, 8]), 1280, 1280) == 0
    assert winograd.tile_size(torch.Size([1, 128, 512, 512]), 128, 3) == 0  # too few output channels
    assert winograd.tile_size(torch.Size([2, 320, 66, 66]), 320, 320) == 2  # not a multiple of 4
    assert winograd.tile_size(torch.Size([2, 320, 63, 64]), 320, 320) == 0


def test_prepacked_float32_convolution_takes_winograd(everywhere):
    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, padding=1)
    x, residual = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 8, 8)
    expected = direct(x, conv.weight, conv.bias, residual)
    assert conv.prepack(torch.float32, torch.contiguous_format)
    with torch.no_grad():
        y = conv(x, residual=residual)
    assert everywhere == [4] and conv._packed is None
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=5e-5)
    conv(x)  # autograd on: the plain convolution
    strided = Conv2d(8, 16, 3, padding=1, stride=2)
    strided.prepack(torch.float32, torch.contiguous_format)
    bf16 = Conv2d(8, 16, 3, padding=1)
    bf16.prepack(torch.bfloat16, CL)
    with torch.no_grad():
        strided(x), bf16(x.contiguous(memory_format=CL))
    assert everywhere == [4]


def test_tiny_model_with_winograd_matches_the_original(tiny_ckpt, tiny_io, everywhere):
    """UNet and autoencoder (decoder and encoder), every 3x3 convolution that can through Winograd."""
    model = load_model_from_config(tiny_config(), tiny_ckpt, as_stored=True)
    for part in (model.model, model.first_stage_model):
        PartWeights(part, torch.float32, torch.contiguous_format).use()
    with torch.no_grad():
        eps = model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
        assert set(everywhere) == {2, 4}
        decoded = model.decode_first_stage(tiny_io["z_scaled"])
        posterior = model.encode_first_stage(tiny_io["img"])
    assert_matches_reference(eps, tiny_io["unet_eps"], "unet_eps")
    assert_matches_reference(decoded, tiny_io["decoded"], "decoded")
    assert_matches_reference(posterior.mean, tiny_io["post_mean"], "post_mean")
