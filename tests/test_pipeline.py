"""The generation pipeline in-process: wiring checked against the original's golden outputs, seeds, per-image
reproducibility, precision and device choice, and the input readers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.app.image_io import fit_to_multiple, load_img, open_image, read_prompt_file, to_rgb
from ldm.app.run import RunOptions, plan_jobs, prompts_from, validate
from ldm.errors import DeviceError, InputError
from ldm.inference.pipeline import Pipeline, Settings, to_uint8
from ldm.inference.precision import Precision, resolve_device, resolve_precision
from tests.conftest import PROMPTS, assert_matches_reference

FULL = Precision("full", torch.float32, None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline(tiny_model, torch.device("cpu"), FULL)


def with_noise(pipe, monkeypatch, *batches):
    """Make the pipeline's seeded noise return the given tensors (the golden data's x_T / noise)."""
    monkeypatch.setattr(pipe, "noise", lambda seeds, shape, draws=1: list(batches[:draws]))


# ---------------------------------------------------------------------------------------------- golden wiring
@pytest.mark.parametrize("sampler, key", [("ddim", "ddim_s10_eta0"), ("plms", "plms_s10")])
def test_txt2img_latents_match_the_original(pipe, tiny_io, monkeypatch, sampler, key):
    """cond/uncond (""), shape [C, H/f, W/f], guidance scale and eta reach the sampler as the original passes them."""
    with_noise(pipe, monkeypatch, tiny_io["x_T"])
    settings = Settings(steps=10, sampler=sampler, scale=7.5, height=64, width=64)
    with torch.no_grad():
        latents = pipe.txt2img_latents(PROMPTS, [0, 1], settings)
    assert_matches_reference(latents, tiny_io[key], key)


def test_img2img_latents_match_the_original(pipe, tiny_io, monkeypatch):
    """t_enc = int(0.75 * 10), stochastic_encode with the noise, decode from t_enc with guidance."""
    with_noise(pipe, monkeypatch, tiny_io["img2img_noise"], torch.zeros_like(tiny_io["img2img_noise"]))
    settings = Settings(steps=10, scale=7.5, strength=0.75, height=64, width=64)
    with torch.no_grad():
        posterior = pipe.encode_init(tiny_io["img"])  # with eps = 0 the init latent is the mode, as the golden run
        latents = pipe.img2img_latents(PROMPTS, [0, 1], posterior, settings)
    assert_matches_reference(latents, tiny_io["img2img_s10_strength075"], "img2img")


def test_scale_one_skips_the_unconditional_pass(pipe):
    c, uc = pipe.conditioning(["a", "b"], "", 1.0)
    assert uc is None and c.shape[0] == 2
    _, uc = pipe.conditioning(["a", "b"], "blurry", 7.5)
    torch.testing.assert_close(uc, pipe.model.get_learned_conditioning(["blurry", "blurry"]))


def test_to_uint8_is_the_originals_truncation():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


# ---------------------------------------------------------------------------------------------- seeds
def test_noise_is_drawn_per_seed_on_the_cpu(pipe):
    (noise,) = pipe.noise([3, 9], (4, 8, 8))
    expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(9))
    torch.testing.assert_close(noise[1], expected, rtol=0, atol=0)
    first, second = pipe.noise([3], (4, 8, 8), draws=2)
    generator = torch.Generator("cpu").manual_seed(3)
    torch.testing.assert_close(first[0], torch.randn((4, 8, 8), generator=generator), rtol=0, atol=0)
    torch.testing.assert_close(second[0], torch.randn((4, 8, 8), generator=generator), rtol=0, atol=0)


def test_plan_jobs_seeds_and_partial_batch():
    jobs = plan_jobs(["a", "b", "c", "d", "e"], batch_size=2, n_iter=2, seed=10)
    assert [j.prompts for j in jobs] == [("a", "b"), ("c", "d"), ("e",)] * 2
    assert [j.seeds for j in jobs] == [(10, 11), (12, 13), (14,), (15, 16), (17, 18), (19,)]
    assert [j.iteration for j in jobs] == [0, 0, 0, 1, 1, 1] and [j.index for j in jobs] == list(range(6))
    fixed = plan_jobs(["a", "b", "c"], batch_size=2, n_iter=2, seed=10, fixed_code=True)
    assert [j.seeds for j in fixed] == [(10, 11), (10,), (10, 11), (10,)]


def _max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("per_image", [True, None])
@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.5), ("plms", 0.0), ("dpm_solver", 0.0)])
def test_an_image_does_not_depend_on_its_batch(pipe, sampler, eta, per_image):
    """The recorded seed regenerates an image alone: pixel for pixel when the batch was computed one image at a
    time, within 2 levels (float32 rounding of the batched kernels) when it ran at once; noise drawn while
    sampling (eta > 0) is the image's own too."""
    settings = Settings(steps=3, sampler=sampler, eta=eta, height=64, width=64, negative_prompt="dark")
    batch, _ = pipe.generate(["a cat", "a dog", "a cow"], [5, 6, 7], settings, per_image=per_image)
    alone, _ = pipe.generate(["a dog"], [6], settings, per_image=True)
    if per_image:
        np.testing.assert_array_equal(batch[1], alone[0])
    else:
        assert _max_difference(batch[1], alone[0]) <= 2
    assert _max_difference(batch[0], batch[1]) > 20


@pytest.mark.parametrize("per_image", [True, None])
def test_img2img_image_does_not_depend_on_its_batch(pipe, tiny_io, per_image):
    settings = Settings(steps=4, height=64, width=64, strength=0.5, eta=0.3)
    with torch.no_grad():
        posterior = pipe.encode_init(tiny_io["img"][:1])
    batch, _ = pipe.generate(["a", "a"], [1, 2], settings, posterior, per_image=per_image)
    alone, _ = pipe.generate(["a"], [2], settings, posterior, per_image=True)
    if per_image:
        np.testing.assert_array_equal(batch[1], alone[0])
    else:
        assert _max_difference(batch[1], alone[0]) <= 2
    assert _max_difference(batch[0], batch[1]) > 20


# ---------------------------------------------------------------------------------------------- device, precision
def test_precision_choices(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert resolve_precision("full", cpu) == FULL
    assert resolve_precision("autocast", cuda).autocast_dtype == torch.float16
    assert resolve_precision("autocast", mps).autocast_dtype is None
    monkeypatch.setattr("ldm.inference.precision.computes_bf16_natively", lambda: True)
    assert resolve_precision("autocast", cpu) == Precision("autocast", torch.bfloat16, torch.bfloat16)
    monkeypatch.setattr("ldm.inference.precision.computes_bf16_natively", lambda: False)
    assert resolve_precision("autocast", cpu).autocast_dtype is None
    assert resolve_precision("bf16", cpu) == Precision("bf16", torch.bfloat16, torch.bfloat16)
    assert resolve_precision("fp16", cpu).weight_dtype == torch.float16
    with pytest.raises(InputError):
        resolve_precision("fp8", cpu)


def test_devices(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("precision", ["bf16", "fp16", "autocast"])
def test_reduced_precisions_run(tiny_ckpt, tiny_config_path, precision):
    from ldm.inference.pipeline import load_pipeline

    pipe = load_pipeline(tiny_config_path, tiny_ckpt, "cpu", precision, "off", say=lambda m: None)
    images, flags = pipe.generate(["a red circle"], [1], Settings(steps=2, height=64, width=64))
    assert images.shape == (1, 64, 64, 3) and flags == [False] and images.std() > 10


# ---------------------------------------------------------------------------------------------- validation
def options(**overrides) -> RunOptions:
    return RunOptions(**{"prompts": ["a"], "outdir": "unused", **overrides})


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "--ddim_steps must be at least 1"),
    (dict(n_samples=0), "--n_samples"),
    (dict(n_iter=-1), "--n_iter"),
    (dict(height=0), "--H"),
    (dict(n_rows=-1), "--n_rows"),
    (dict(scale=float("nan")), "--scale must be a finite"),
    (dict(eta=-0.1), "--ddim_eta"),
    (dict(sampler="plms", eta=0.5), "PLMS is deterministic"),
    (dict(init_img="x.png", strength=1.5), "--strength must be between 0.0 and 1.0"),
    (dict(init_img="x.png", strength=-0.1), "--strength"),
    (dict(seed=-1), "--seed"),
    (dict(prompts=[]), "no prompt"),
])
def test_bad_options(overrides, message):
    with pytest.raises(InputError, match=message):
        validate(options(**overrides))


def test_strength_bounds_are_allowed():
    validate(options(init_img="x.png", strength=0.0))
    validate(options(init_img="x.png", strength=1.0))


# ---------------------------------------------------------------------------------------------- prompts
def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red circle\n\n  \r\nа синий квадрат  \n\nlast".encode())
    assert read_prompt_file(path) == ["a red circle", "а синий квадрат", "last"]
    assert prompts_from(None, str(path), 3) == ["a red circle", "а синий квадрат", "last"]
    assert prompts_from("x", None, 3) == ["x", "x", "x"]


@pytest.mark.parametrize("content, message", [
    (b"\n \n", "no prompts"),
    (b"caf\xe9\n", "not UTF-8"),
    (b"a\x00b", "NUL"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_prompt_file(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="not a file"):
        read_prompt_file(tmp_path)
    with pytest.raises(InputError, match="empty"):
        prompts_from("  ", None, 1)


# ---------------------------------------------------------------------------------------------- images
def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30])
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    sixteen = Image.fromarray(np.array([[0, 65535], [32896, 257]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert [to_rgb(sixteen).getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 255, 128, 1]
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert wide.mode == "I" and to_rgb(wide).getpixel((1, 0)) == (255, 255, 255)
    grey_float = Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32))
    assert to_rgb(grey_float).getpixel((1, 0)) == (128, 128, 128)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 2), 0)
    image.putpalette([0, 0, 0, 200, 10, 10])
    image.putpixel((1, 1), 1)
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    rgb = open_image(path)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (200, 10, 10)


def test_sixteen_bit_png_file(tmp_path):
    path = tmp_path / "16.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "a.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    notes = []
    assert open_image(path, notes.append).getpixel((0, 0)) == (255, 0, 0)
    assert "2 frames" in notes[0]


def test_load_img_resizes_to_multiple_of_64(tmp_path):
    path = tmp_path / "i.png"
    Image.new("RGB", (130, 100), (255, 255, 255)).save(path)
    notes = []
    tensor = load_img(path, notice=notes.append)
    assert tensor.shape == (1, 3, 128, 128) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.ones_like(tensor))
    assert any("130x100 to 128x128" in n for n in notes)
    assert fit_to_multiple(20, 512) == (64, 512) and fit_to_multiple(95, 97) == (64, 128)


@pytest.mark.parametrize("content, message", [(b"", "cannot read"), (b"\x89PNG\r\n\x1a\n\0\0", "cannot read"),
                                              (b"hello", "cannot read")])
def test_bad_image_files(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        open_image(path)


def test_truncated_image(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="truncated or corrupt"):
        open_image(path)


def test_missing_image(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "nope.png")


# ---------------------------------------------------------------------------------------------- loading, decode
def test_ema_checkpoint_runs_on_its_ema_weights(tmp_path, tiny_io):
    """With use_ema: True the pipeline samples with the EMA weights (swapped in once, training copy dropped)."""
    from omegaconf import OmegaConf

    from ldm.inference.pipeline import load_pipeline
    from tests.conftest import tiny_config, tiny_ema_state_dict, tiny_state_dict

    config = tiny_config()
    config.model.params.use_ema = True
    OmegaConf.save(config, tmp_path / "ema.yaml")
    torch.save({"state_dict": {**tiny_state_dict(), **tiny_ema_state_dict()}}, tmp_path / "full.ckpt")
    loaded = load_pipeline(tmp_path / "ema.yaml", tmp_path / "full.ckpt", device="cpu", precision="full",
                           say=lambda _: None)
    weight = loaded.model.model.diffusion_model.input_blocks[0][0].weight
    assert torch.equal(weight, tiny_ema_state_dict()["model_ema.diffusion_modelinput_blocks00weight"].float())
    assert not hasattr(loaded.model, "model_ema")


def test_decode_tiles_when_memory_is_short(pipe, tiny_io, monkeypatch):
    """The tiled path is taken when an untiled decode would not fit (the tiles themselves: tests/test_tiling.py)."""
    calls = []
    monkeypatch.setattr("ldm.inference.pipeline.decode_needs_tiling", lambda z: True)
    monkeypatch.setattr("ldm.inference.pipeline.tiled_decode",
                        lambda model, z: calls.append(z.shape) or model.decode_first_stage(z))
    with torch.no_grad():
        images = pipe.decode(tiny_io["z_scaled"])
    assert calls == [tiny_io["z_scaled"].shape]
    expected = to_uint8(tiny_io["decoded"])
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
