"""Off the CPU (CUDA, MPS), none of the CPU-only machinery runs: no allocator tuning, no page release, no
oneDNN kernel, no part held only while in use. Checked here on the CPU, with the ``meta`` device standing in for
a GPU where a tensor must live on one (tests/test_cuda.py checks the same on a real GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.app import run as app_run
from ldm.backend import onednn
from ldm.inference import pipeline as inference_pipeline
from ldm.inference import residency
from ldm.inference.pipeline import Settings, load_pipeline
from ldm.modules import ops


def record_cpu_machinery(monkeypatch) -> list[str]:
    """Make every CPU-only function record its name where it is called from; returns the record."""
    called: list[str] = []

    def recorder(name: str, result=None):
        def record(*args, **kwargs):
            called.append(name)
            return result
        return record

    class Recorded:
        def __enter__(self):
            called.append("tuned_allocator")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(app_run, "tuned_allocator", Recorded)
    monkeypatch.setattr(app_run, "release_library_pages", recorder("release_library_pages", 0))
    monkeypatch.setattr(inference_pipeline, "release_file_pages", recorder("release_file_pages", 0))
    monkeypatch.setattr(residency, "PartWeights", recorder("PartWeights"))
    gate = onednn.Gate()  # the recorders return no tensor: the failures they cause stay on this gate
    monkeypatch.setattr(onednn, "gate", gate)
    monkeypatch.setattr(ops, "gate", gate)
    for name in ("conv2d", "linear_add", "geglu", "pack_conv_kernel"):
        monkeypatch.setattr(onednn, name, recorder(f"onednn.{name}"))
    return called


class _StubPipe:
    """What the application needs of a pipeline, on ``device``."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.precision = inference_pipeline.resolve_precision("full", torch.device("cpu"))
        self.latent_channels, self.downsampling_factor, self.size_multiple = 4, 8, 64
        self.model, self.model_name, self.prompt_tokenizer = None, "stub", None
        self.model_hash = inference_pipeline.ModelHash(None)

    def generate(self, prompts, seeds, settings, posterior=None, per_image=None):
        return np.zeros((len(prompts), settings.height, settings.width, 3), np.uint8), [False] * len(prompts)


@pytest.mark.parametrize("device, expected", [("cuda", []), ("mps", []),
                                              ("cpu", ["tuned_allocator", "release_library_pages"])])
def test_the_application_tunes_the_process_only_for_a_cpu_run(device, expected, tmp_path, monkeypatch,
                                                              tiny_ckpt, tiny_config_path):
    called = record_cpu_machinery(monkeypatch)
    monkeypatch.setattr(app_run, "check_before_loading", lambda opt: None)
    monkeypatch.setattr(app_run, "load_pipeline", lambda *args, **kwargs: _StubPipe(device))
    app_run.run(app_run.RunOptions(prompts=["a"], outdir=str(tmp_path), config=str(tiny_config_path),
                                   ckpt=str(tiny_ckpt), height=64, width=64, device="cpu", watermark=False),
                say=lambda m: None)
    assert called == expected  # the CPU case shows the recorder sees the calls


def test_a_model_loaded_off_the_cpu_has_no_part_weights_and_releases_no_pages(tiny_ckpt, tiny_config_path,
                                                                              monkeypatch):
    called = record_cpu_machinery(monkeypatch)
    monkeypatch.setattr(inference_pipeline, "resolve_device", lambda name: torch.device("meta"))
    pipe = load_pipeline(tiny_config_path, tiny_ckpt, device="cuda", precision="full", say=lambda m: None)
    assert pipe.device.type == "meta" and pipe.part_weights == []
    pipe.set_aside(pipe.model.model)
    assert called == []


def test_the_fast_ops_off_the_cpu_call_no_onednn_kernel(monkeypatch):
    """Each fast op on a non-CPU tensor (meta standing in) takes torch's op; the same calls on the CPU do reach
    oneDNN (where it computes float32), so the recorder is live."""
    called = record_cpu_machinery(monkeypatch)
    with torch.no_grad():
        for device in ("meta", "cpu"):
            conv, pointwise = ops.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
            linear, proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)
            for module in (conv, pointwise, linear, proj):
                module.to(device)
            conv.prepack(torch.float32, torch.channels_last)
            x = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
            tokens = torch.randn(2, 5, 8, device=device)
            conv(x, residual=torch.randn_like(x))
            ops.pointwise_conv(pointwise, x, residual=torch.randn_like(x))
            ops.linear_add(linear, tokens, torch.randn_like(tokens))
            ops.linear_geglu(proj, tokens)
            if device == "meta":
                assert called == []
    assert called or not onednn.gate.usable("convolution", torch.float32)


def test_settings_defaults_are_the_runs():
    opt = app_run.RunOptions(prompts=["a"], outdir="x")
    settings = Settings()
    assert (opt.steps, opt.scale, opt.eta, opt.sampler, opt.height, opt.width) == (
        settings.steps, settings.scale, settings.eta, settings.sampler, settings.height, settings.width)
