"""The CUDA path, on a machine with a CUDA GPU (skipped elsewhere; `scripts/gpu_check.sh` runs it).

* fp16 autocast sampling of the tiny reference model with every sampler, and img2img, against CPU float32:
  latents within 6 % (relative L2) and decoded images above 35 dB PSNR (the bounds of bf16 on the CPU,
  tests/test_precision.py; fp16 has three more mantissa bits than bf16, so it has margin);
* tiled decoding on the GPU; the safety checker on the GPU decides as on the CPU; a script run on the GPU writes
  watermarked, numbered images;
* none of the CPU-only machinery runs (allocator tuning, page release, oneDNN kernels).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.app.output import read_watermark
from ldm.inference.pipeline import Settings, load_pipeline
from ldm.inference.tiling import tiled_decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
LATENT_BOUND, PSNR_BOUND = 0.06, 35.0
SAMPLERS = ("ddim", "plms", "dpm_solver")
PROMPTS = ["a red circle on a blue background", "a photograph of an astronaut riding a horse"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def pipes(tiny_ckpt, tiny_config_path):
    """The tiny model on the GPU (fp16 autocast, the default there) and on the CPU (float32)."""
    gpu = load_pipeline(tiny_config_path, tiny_ckpt, device="cuda", precision="autocast", say=lambda m: None)
    cpu = load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full", say=lambda m: None)
    assert gpu.precision.autocast_dtype == torch.float16 and gpu.device.type == "cuda"
    return gpu, cpu


def _latents(pipe, sampler: str, steps: int = 20) -> torch.Tensor:
    settings = Settings(steps=steps, sampler=sampler, height=64, width=64)
    with torch.no_grad(), pipe.precision.context(pipe.device):
        return pipe.txt2img_latents(PROMPTS, [3, 4], settings)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fp16_autocast_sampling_is_close_to_cpu_float32(pipes, sampler):
    gpu, cpu = pipes
    ours, ref = _latents(gpu, sampler), _latents(cpu, sampler)
    assert ours.device.type == "cuda"
    assert relative(ours, ref) < LATENT_BOUND
    settings = Settings(steps=20, sampler=sampler, height=64, width=64)
    images, _ = gpu.generate(PROMPTS, [3, 4], settings)
    ref_images, _ = cpu.generate(PROMPTS, [3, 4], settings)
    assert psnr(images, ref_images) > PSNR_BOUND


def test_the_bounds_separate_different_samples(pipes):
    _, cpu = pipes
    a = _latents(cpu, "ddim")
    settings = Settings(steps=20, height=64, width=64)
    with torch.no_grad():
        b = cpu.txt2img_latents(PROMPTS, [5, 6], settings)
    assert relative(b, a) > 10 * LATENT_BOUND


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_on_the_gpu_is_close_to_cpu_float32(pipes, sampler):
    gpu, cpu = pipes
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = Settings(steps=20, sampler=sampler, height=64, width=64, strength=0.75)
    results = []
    for pipe in (gpu, cpu):
        with torch.no_grad(), pipe.precision.context(pipe.device):
            posterior = pipe.encode_init(image)
        results.append(pipe.generate(PROMPTS, [7, 8], settings, posterior)[0])
    assert psnr(*results) > PSNR_BOUND


def test_tiled_decode_on_the_gpu(pipes):
    gpu, _ = pipes
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(1)).cuda()
    model = gpu.model
    with torch.no_grad(), gpu.precision.context(gpu.device):
        whole = model.decode_first_stage(z).float()
        one_tile = tiled_decode(model, z, tile=24, overlap=8).float()
        tiles = tiled_decode(model, z, tile=16, overlap=8).float()
    assert torch.equal(one_tile, whole)
    assert tiles.shape == whole.shape and (tiles - whole).abs().mean() < 0.1 * whole.abs().mean()


def test_safety_checker_on_the_gpu_decides_as_on_the_cpu(tmp_path):
    from ldm.inference.safety import load_safety_checker
    from tests.test_safety import random_images, reference_checker

    folder = tmp_path / "checker"
    reference_checker().save_pretrained(folder)
    on_gpu, on_cpu = load_safety_checker(str(folder), "cuda"), load_safety_checker(str(folder), "cpu")
    assert next(on_gpu.parameters()).device.type == "cuda"
    images = random_images(8)
    assert on_gpu.check(images) == on_cpu.check(images)


def test_a_script_run_on_the_gpu_writes_watermarked_images(tiny_ckpt, tiny_config_path, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/txt2img.py"), "--prompt", "a red circle",
                           "--config", str(tiny_config_path), "--ckpt", str(tiny_ckpt), "--device", "cuda",
                           "--H", "256", "--W", "256", "--ddim_steps", "4", "--n_iter", "1", "--n_samples", "2",
                           "--outdir", str(out), "--safety_checker", "off"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
    for path in samples:
        assert read_watermark(Image.open(path)) == b"StableDiffusionV1"
        assert "Precision: fp16" in Image.open(path).info["parameters"]


def test_no_cpu_machinery_on_the_gpu(tiny_ckpt, tiny_config_path, tmp_path, monkeypatch):
    from ldm.app.run import RunOptions, run
    from tests.test_devices import record_cpu_machinery

    called = record_cpu_machinery(monkeypatch)
    run(RunOptions(prompts=PROMPTS, outdir=str(tmp_path), config=str(tiny_config_path), ckpt=str(tiny_ckpt),
                   steps=3, height=64, width=64, n_samples=2, device="cuda", safety_checker="off"), say=lambda m: None)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    assert called == []
