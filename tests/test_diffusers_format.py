"""The diffusers folder layout, both ways (scripts/convert_ckpt.py --to diffusers, --ckpt <folder>).

The peer is diffusers itself (a test-only dependency): its own single-file converters must give the tensors our
key table gives, its ``StableDiffusionPipeline`` must load our exported folders offline and make our DDIM images
(within 3 of 255 levels, fp32), and folders written by diffusers must load into our model with the outputs of
the original single file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.app import cli
from ldm.errors import CheckpointError, LdmError, OutputError
from ldm.inference.pipeline import Settings, load_pipeline
from ldm.loading import diffusers_format as df
from ldm.loading.build import load_model_from_config
from ldm.loading.checkpoint import read_checkpoint
from tests.conftest import FIXTURES, tiny_config, tiny_state_dict

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = ROOT / "models" / "ldm" / "toy-shapes" / "config.yaml"
TOY_CKPT = ROOT / "models" / "ldm" / "toy-shapes" / "model.ckpt"
PROMPT = "a red circle on a white background"


def converter():
    spec = importlib.util.spec_from_file_location("convert_ckpt", ROOT / "scripts" / "convert_ckpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp-" in name]


def model_outputs(model, tiny_io) -> list[torch.Tensor]:
    """UNet output, text conditioning and a decode: every part of the model."""
    with torch.no_grad():
        return [model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"]),
                model.get_learned_conditioning(["a red circle", ""]),
                model.decode_first_stage(tiny_io["unet_x"][:1])]


def ours_image(pipe, prompt: str, seed: int, steps: int, scale: float, eta: float, size: int) -> np.ndarray:
    settings = Settings(steps=steps, sampler="ddim", scale=scale, eta=eta, height=size, width=size)
    images, _ = pipe.generate([prompt], [seed], settings)
    return images[0]


def diffusers_image(sd_pipe, x_T: torch.Tensor, prompt: str, seed: int, steps: int, scale: float, eta: float,
                    size: int) -> np.ndarray:
    """diffusers' DDIM image from the start latents ``x_T``; the generator gives the noise of eta > 0 (ours draws
    it from the image's generator after its start code: the same numbers)."""
    generator = torch.Generator().manual_seed(seed)
    torch.randn(tuple(x_T.shape[1:]), generator=generator)  # the start code, drawn first
    out = sd_pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=scale, eta=eta,
                  latents=x_T.clone(), generator=generator, output_type="np").images
    return (out[0] * 255).round().astype(np.uint8)  # as diffusers makes its PIL images


def load_diffusers(folder: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd_pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    sd_pipe.set_progress_bar_config(disable=True)
    return sd_pipe


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def tiny_folder(tiny_ckpt, tiny_config_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-diffusers"
    return converter().convert_to_diffusers(tiny_ckpt, out, tiny_config_path, safety_checker="off")


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "toy-diffusers"
    return converter().convert_to_diffusers(TOY_CKPT, out, TOY_CONFIG, safety_checker="off")


@pytest.fixture
def offline(monkeypatch):
    """No hub access for diffusers/transformers (their offline switch; nothing here may need the network)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def diffusers_made_folder(state_dict: dict, config, folder: Path) -> Path:
    """The original-layout ``state_dict`` converted by diffusers' own single-file converters and saved by
    ``StableDiffusionPipeline.save_pretrained`` (transformers 5 writes the text encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.modules.encoders.modules import TOKENIZER_DIR

    original = OmegaConf.to_container(config)
    unet_config = create_unet_diffusers_config_from_ldm(original, state_dict)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state_dict, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(original, state_dict)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state_dict, vae_config), strict=True)
    model = load_model_from_config(config, None)
    text_encoder = CLIPTextModel(model.cond_stage_model.transformer.config)
    prefix = "cond_stage_model.transformer."
    text_encoder.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                                   tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peer_folder(tmp_path_factory) -> Path:
    return diffusers_made_folder(tiny_state_dict(), tiny_config(), tmp_path_factory.mktemp("peer") / "tiny")


# ---------------------------------------------------------------------------------------------- key table
def ldm_params(config) -> dict:
    return OmegaConf.to_container(config)["model"]["params"]


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_key_table_gives_what_diffusers_converters_give(which):
    """Our table against diffusers' own single-file converters: every UNet and autoencoder tensor lands under
    the same name, with the same shape (the tiny model's values, the full-size model's key list)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    if which == "tiny":
        config, sd = tiny_config(), tiny_state_dict()
    else:  # shapes only (zero-stride views, no memory), but values for the attention kernels that are reshaped
        config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
        keys = json.loads((FIXTURES / "sd-v1-keys.json").read_text())
        sd = {k: torch.arange(float(np.prod(shape))).reshape(shape) if ".attn_1." in k else
              torch.zeros(1).expand(shape) for k, (shape, _) in keys.items()}
    params = ldm_params(config)
    ours = df.to_diffusers({k: v for k, v in sd.items() if "." in k}, df.layout_from_ldm(params))
    original = OmegaConf.to_container(config)
    unet_config = create_unet_diffusers_config_from_ldm(original, sd)
    vae_config = create_vae_diffusers_config_from_ldm(original, sd)
    for name, theirs in (("unet", convert_ldm_unet_checkpoint(sd, unet_config)),
                         ("vae", convert_ldm_vae_checkpoint(sd, vae_config))):
        assert sorted(ours[name]) == sorted(theirs), name
        for key, tensor in theirs.items():
            assert ours[name][key].shape == tensor.shape, key
            if which == "tiny" or ".attentions." in key and name == "vae":
                assert torch.equal(ours[name][key], tensor), key
    # the configs agree on what shapes do not show
    ours_unet, ours_vae = df.unet_config(params), df.vae_config(params)
    for key in ("attention_head_dim", "block_out_channels", "cross_attention_dim", "down_block_types",
                "up_block_types", "layers_per_block", "use_linear_projection"):
        assert ours_unet[key] == unet_config[key], key
    for key in ("block_out_channels", "latent_channels", "layers_per_block", "scaling_factor"):
        assert ours_vae[key] == vae_config[key], key


@pytest.mark.parametrize("config_path", [FIXTURES / "tiny" / "v1-tiny.yaml", TOY_CONFIG,
                                         ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"],
                         ids=["tiny", "toy", "full"])
def test_table_is_one_to_one_and_the_schedule_is_the_original(config_path):
    """Every weight of the model has one place in the diffusers layout and comes back from it; the schedule
    computed from the scheduler config is the model's, bit for bit (as ``DDPM.register_schedule`` computes it)."""
    from ldm.loading.build import parameters_on_meta
    from ldm.util import instantiate_from_config

    config = tiny_config() if config_path.parent.name == "tiny" else OmegaConf.load(config_path)
    params = ldm_params(config)
    with parameters_on_meta():  # weights without memory; the schedule buffers are real
        model = instantiate_from_config(config.model)
    sd = model.state_dict()
    weights = {k: v for k, v in sd.items() if "." in k}
    layout = df.layout_from_ldm(params)
    theirs = df.to_diffusers(weights, layout)
    assert sum(len(t) for t in theirs.values()) == len(weights)
    back = df.from_diffusers(theirs, layout)
    assert sorted(back) == sorted(weights) and all(back[k].shape == weights[k].shape for k in weights)
    buffers = df.schedule_buffers(df.scheduler_config(params))
    assert sorted(buffers) == sorted(k for k in sd if "." not in k)
    for key, value in buffers.items():
        assert value.dtype == torch.float32 and torch.equal(value, sd[key]), key


# ---------------------------------------------------------------------------------------------- export
def test_exported_folder_layout(tiny_folder, tiny_ckpt):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    scheduler = json.loads((tiny_folder / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                      "steps_offset", "set_alpha_to_one", "clip_sample", "prediction_type")} == {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon"}
    text = load_file(tiny_folder / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in text)  # the nesting transformers 4 and 5 both read
    # read back through the loader: every tensor of the source, the schedule included
    source, _ = read_checkpoint(tiny_ckpt)
    back, _ = read_checkpoint(tiny_folder)
    assert sorted(back) == sorted(source)
    for key, tensor in source.items():
        assert torch.equal(back[key], tensor), key
    assert leftovers(tiny_folder.parent) == []


def test_exported_tokenizer_and_text_encoder_equal_ours(tiny_folder, tiny_model):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == 77
    prompts = ["a photograph of an astronaut riding a horse", "", "word " * 100]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    assert torch.equal(ids, tiny_model.cond_stage_model.tokenize(prompts))
    text_encoder = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(text_encoder(ids).last_hidden_state, tiny_model.get_learned_conditioning(prompts))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_diffusers_ddim_image_equals_ours_tiny(tiny_folder, tiny_ckpt, tiny_config_path, offline, eta):
    ours = load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full", safety_checker="off",
                         verbose=False)
    sd_pipe = load_diffusers(tiny_folder)
    for seed, prompt in ((11, PROMPT), (12, "a photograph of an astronaut riding a horse")):
        (x_T,) = ours.noise([seed], [4, 8, 8])
        a = ours_image(ours, prompt, seed, 10, 7.5, eta, 64)
        b = diffusers_image(sd_pipe, x_T, prompt, seed, 10, 7.5, eta, 64)
        assert a.std() > 5 and max_diff(a, b) <= 3


def test_diffusers_ddim_image_equals_ours_toy(toy_folder, offline):
    """The trained toy-shapes model: 16-token prompts (the exported tokenizer's model_max_length), attention at
    every level with per-level head counts, fp16 weights in the folder."""
    tokenizer = json.loads((toy_folder / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 16
    ours = load_pipeline(TOY_CONFIG, TOY_CKPT, device="cpu", precision="full", safety_checker="off", verbose=False)
    sd_pipe = load_diffusers(toy_folder)
    for seed, prompt in ((1000, PROMPT), (1001, "a blue triangle on a black background")):
        (x_T,) = ours.noise([seed], [4, 8, 8])
        a = ours_image(ours, prompt, seed, 20, 5.0, 0.0, 64)
        b = diffusers_image(sd_pipe, x_T, prompt, seed, 20, 5.0, 0.0, 64)
        assert a.std() > 20 and max_diff(a, b) <= 3


def readme_snippet() -> str:
    """The python block of the README's diffusers section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Diffusers, both ways", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_snippet_runs_offline(tiny_folder, tmp_path):
    """The README's diffusers snippet as a user runs it (on the CPU here), with the hub switched off."""
    code = readme_snippet()
    assert 'from_pretrained("sd-v1-diffusers")' in code and 'pipe.to("cuda", torch.float16)' in code
    code = code.replace('"sd-v1-diffusers"', repr(str(tiny_folder))).replace(
        'pipe.to("cuda", torch.float16)', 'pipe.to("cpu", torch.float32)')
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    assert Image.open(tmp_path / "astronaut_rides_horse.png").size == (64, 64)


def test_safety_checker_is_exported(tiny_ckpt, tiny_config_path, tmp_path, offline):
    from tests.test_scripts import write_checker

    checker = write_checker(tmp_path / "checker", threshold=-1.0)  # flags everything
    out = converter().convert_to_diffusers(tiny_ckpt, tmp_path / "with-checker", tiny_config_path,
                                           safety_checker=str(checker))
    index = json.loads((out / "model_index.json").read_text())
    assert index["requires_safety_checker"] is True
    sd_pipe = load_diffusers(out)
    assert sd_pipe.safety_checker is not None and sd_pipe.feature_extractor is not None
    result = sd_pipe(PROMPT, num_inference_steps=2, output_type="np")
    assert result.nsfw_content_detected == [True] and result.images.max() == 0


def test_ema_weights_are_exported_with_use_ema(tmp_path, tiny_io):
    from tests.conftest import tiny_ema_state_dict

    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**tiny_state_dict(), **tiny_ema_state_dict()}}, ckpt)
    config = tiny_config()
    config.model.params.use_ema = True
    config_path = tmp_path / "ema.yaml"
    OmegaConf.save(config, config_path)
    out = converter().convert_to_diffusers(ckpt, tmp_path / "ema", config_path, safety_checker="off")
    model = load_model_from_config(config, ckpt)
    plain = tiny_config()
    from_folder = load_model_from_config(plain, out)
    with model.ema_scope():
        for x, y in zip(model_outputs(model, tiny_io), model_outputs(from_folder, tiny_io)):
            assert torch.equal(x, y)


def test_fp16_export(tiny_ckpt, tiny_config_path, tmp_path, tiny_model, tiny_io):
    out = converter().convert_to_diffusers(tiny_ckpt, tmp_path / "fp16", tiny_config_path, dtype="fp16",
                                           safety_checker="off")
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet.values()} == {torch.float16}
    model = load_model_from_config(tiny_config(), out)  # the reference weights are exact in fp16
    for x, y in zip(model_outputs(model, tiny_io), model_outputs(tiny_model, tiny_io)):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------- writing safely
def test_never_overwrites(tiny_ckpt, tiny_config_path, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()  # even an empty folder, which a plain rename would replace
    code = cli.main(converter().main, [str(tiny_ckpt), str(out), "--to", "diffusers", "--config",
                                       str(tiny_config_path), "--safety_checker", "off"], prog="convert_ckpt.py")
    err = capsys.readouterr().err
    assert code == 1 and "already exists; not overwriting" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out) == [] and leftovers(tmp_path) == []


def test_a_name_taken_while_converting_is_not_overwritten(tiny_ckpt, tiny_config_path, tmp_path, monkeypatch):
    module = converter()
    out = tmp_path / "model"
    write = module._write_tokenizer

    def write_then_collide(*args):
        write(*args)
        out.mkdir()
        (out / "theirs.txt").write_text("another process")

    monkeypatch.setattr(module, "_write_tokenizer", write_then_collide)
    with pytest.raises(OutputError, match="already exists"):
        module.convert_to_diffusers(tiny_ckpt, out, tiny_config_path, safety_checker="off")
    assert os.listdir(out) == ["theirs.txt"] and leftovers(tmp_path) == []


def test_interrupted_export_leaves_nothing(tiny_ckpt, tiny_config_path, tmp_path, monkeypatch):
    module = converter()

    def interrupted(path, *args):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module.convert_to_diffusers(tiny_ckpt, tmp_path / "model", tiny_config_path, safety_checker="off")
    assert os.listdir(tmp_path) == []


def test_checkpoint_that_does_not_fit_the_config_is_refused(tmp_path, tiny_config_path, capsys):
    sd = tiny_state_dict()
    del sd["model.diffusion_model.out.2.weight"]
    ckpt = tmp_path / "broken.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    code = cli.main(converter().main, [str(ckpt), str(tmp_path / "out"), "--to", "diffusers", "--config",
                                       str(tiny_config_path), "--safety_checker", "off"], prog="convert_ckpt.py")
    err = capsys.readouterr().err
    assert code == 1 and "model.diffusion_model.out.2.weight" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["broken.ckpt"]


def test_what_the_layout_cannot_hold_is_refused(tiny_ckpt, tmp_path, capsys):
    config = tiny_config()
    config.model.params.unet_config.params.use_scale_shift_norm = True
    config_path = tmp_path / "other.yaml"
    OmegaConf.save(config, config_path)
    for argv, words in (([str(tmp_path / "out"), "--config", str(config_path)], "use_scale_shift_norm: True"),
                        ([str(tmp_path / "out.safetensors")], "is a folder; name it without a file suffix")):
        code = cli.main(converter().main, [str(tiny_ckpt)] + argv + ["--to", "diffusers", "--safety_checker", "off"],
                        prog="convert_ckpt.py")
        err = capsys.readouterr().err
        assert code != 0 and words in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["other.yaml"]


def test_command_line_both_ways(tiny_ckpt, tiny_config_path, tmp_path):
    """CKPT -> folder -> .safetensors: the file holds every tensor of the checkpoint, schedule included."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(cli.TRACEBACK_ENV, None)
    script = [sys.executable, str(ROOT / "scripts" / "convert_ckpt.py")]
    ckpt = tmp_path / "tiny.ckpt"
    ckpt.symlink_to(tiny_ckpt)
    result = subprocess.run(script + [str(ckpt), "--to", "diffusers", "--config", str(tiny_config_path),
                                      "--safety_checker", "off"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"wrote {tmp_path / 'tiny'} (")
    result = subprocess.run(script + [str(tmp_path / "tiny"), str(tmp_path / "back.safetensors")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    source, back = read_checkpoint(tiny_ckpt)[0], read_checkpoint(tmp_path / "back.safetensors")[0]
    assert sorted(back) == sorted(source) and all(torch.equal(back[k], v) for k, v in source.items())


# ---------------------------------------------------------------------------------------------- loading folders
def test_folder_loads_with_the_outputs_of_the_single_file(tiny_folder, tiny_model, tiny_io):
    model = load_model_from_config(tiny_config(), tiny_folder)
    for x, y in zip(model_outputs(model, tiny_io), model_outputs(tiny_model, tiny_io)):
        assert torch.equal(x, y)


def test_folder_gives_the_image_of_the_single_file(toy_folder):
    a = load_pipeline(TOY_CONFIG, TOY_CKPT, device="cpu", precision="full", safety_checker="off", verbose=False)
    b = load_pipeline(TOY_CONFIG, toy_folder, device="cpu", precision="full", safety_checker="off", verbose=False)
    x, y = ours_image(a, PROMPT, 7, 10, 5.0, 0.0, 64), ours_image(b, PROMPT, 7, 10, 5.0, 0.0, 64)
    assert x.std() > 20 and max_diff(x, y) <= 1


def test_folder_written_by_diffusers_loads(peer_folder, tiny_model, tiny_io):
    """A folder diffusers wrote (its converters, transformers 5's text-encoder keys) loads strictly into our
    model, with the outputs of the original file."""
    text = load_file(peer_folder / "text_encoder" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in text)  # transformers 5's layout
    model = load_model_from_config(tiny_config(), peer_folder)
    for x, y in zip(model_outputs(model, tiny_io), model_outputs(tiny_model, tiny_io)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def copy_folder(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def rewrite(path: Path, change) -> None:
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    save_file(change(tensors), path, metadata={"format": "pt"})


def test_transformers_4_text_encoder_keys_and_legacy_vae_names(peer_folder, tmp_path, tiny_model, tiny_io):
    """The key nesting of transformers 4 (``text_model.*`` with ``position_ids``) and the autoencoder attention
    names of diffusers < 0.14 (``query``/``key``/``value``/``proj_attn``), as on older hub snapshots."""
    folder = copy_folder(peer_folder, tmp_path / "legacy")

    def transformers_4(t):
        out = {"text_model." + k: v for k, v in t.items()}
        out["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        return out

    def old_attention(t):
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        out = {}
        for key, value in t.items():
            for new, old in names.items():
                if ".attentions.0." + new + "." in key:
                    key = key.replace(".attentions.0." + new + ".", ".attentions.0." + old + ".")
            out[key] = value
        return out

    rewrite(folder / "text_encoder" / "model.safetensors", transformers_4)
    rewrite(folder / "vae" / "diffusion_pytorch_model.safetensors", old_attention)
    assert "encoder.mid_block.attentions.0.query.weight" in load_file(
        folder / "vae" / "diffusion_pytorch_model.safetensors")
    model = load_model_from_config(tiny_config(), folder)
    for x, y in zip(model_outputs(model, tiny_io), model_outputs(tiny_model, tiny_io)):
        assert torch.equal(x, y)


def test_transformers_4_single_file_exports_the_same_folder(tmp_path, tiny_config_path, tiny_folder):
    """A single file with transformers 4's text-encoder keys exports the same text encoder."""
    sd = tiny_state_dict()
    prefix = "cond_stage_model.transformer."
    legacy = {(prefix + "text_model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    legacy[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ckpt = tmp_path / "t4.ckpt"
    torch.save({"state_dict": legacy}, ckpt)
    out = converter().convert_to_diffusers(ckpt, tmp_path / "t4", tiny_config_path, safety_checker="off")
    a = load_file(out / "text_encoder" / "model.safetensors")
    b = load_file(tiny_folder / "text_encoder" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_unexpected_keys_are_named(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "broken")

    def drop_and_add(t):
        del t["down_blocks.0.resnets.0.norm1.weight"]
        t["add_embedding.linear_1.weight"] = torch.zeros(2, 2)
        return t

    rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", drop_and_add)
    with pytest.raises(CheckpointError, match="model.diffusion_model.input_blocks.1.0.in_layers.0.weight"):
        load_model_from_config(tiny_config(), folder)
    rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", lambda t: dict(
        t, **{"down_blocks.0.resnets.0.norm1.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match="unexpected keys: unet/add_embedding.linear_1.weight"):
        load_model_from_config(tiny_config(), folder)


def test_settings_no_shape_shows_are_checked(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "other")
    for file, key, value, words in (
            ("vae/config.json", "scaling_factor", 0.13025, "scaling_factor 0.13025 differs"),
            ("unet/config.json", "attention_head_dim", 4, "attention heads"),
            ("scheduler/scheduler_config.json", "beta_end", 0.02, "noise schedule")):
        original = (folder / file).read_text()
        (folder / file).write_text(json.dumps(dict(json.loads(original), **{key: value})))
        with pytest.raises(LdmError, match=words):
            load_model_from_config(tiny_config(), folder)
        (folder / file).write_text(original)
    load_model_from_config(tiny_config(), folder)


def test_txt2img_with_a_folder(tiny_folder, tiny_ckpt, tiny_config_path, tmp_path):
    """``--ckpt <diffusers folder>``: the same PNG as from the single file."""
    from tests.test_scripts import Run

    flags = ["--config", str(tiny_config_path), "--device", "cpu", "--H", "64", "--W", "64", "--ddim_steps", "3",
             "--n_samples", "1", "--n_iter", "1", "--safety_checker", "off", "--precision", "full", "--prompt", PROMPT,
             "--skip_grid"]
    a = Run.inline("txt2img", ["--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "a")] + flags, tmp_path / "a")
    b = Run.inline("txt2img", ["--ckpt", str(tiny_folder), "--outdir", str(tmp_path / "b")] + flags, tmp_path / "b")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    from PIL import Image

    x, y = (np.asarray(Image.open(run.outdir / "samples" / "00000.png")) for run in (a, b))
    assert max_diff(x, y) <= 1


def test_incomplete_folder_is_one_line(tiny_folder, tiny_config_path, tmp_path, capsys):
    from tests.test_scripts import run_inline

    folder = copy_folder(tiny_folder, tmp_path / "incomplete")
    shutil.rmtree(folder / "scheduler")
    code, out, err = run_inline("txt2img", ["--ckpt", str(folder), "--config", str(tiny_config_path), "--outdir",
                                            str(tmp_path / "out"), "--safety_checker", "off"], capsys)
    assert code == 1 and "incomplete diffusers folder: scheduler/scheduler_config.json missing" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- full size
V1_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"


@pytest.fixture(scope="module")
def full_assets(tmp_path_factory):
    """The full-size SD v1 on the reference's deterministic weights: the original-layout .ckpt and its
    exported diffusers folder (about 4 GB each on disk)."""
    from ldm.testing.deterministic_weights import write_deterministic_checkpoint

    folder = tmp_path_factory.mktemp("full")
    ckpt = folder / "sd-v1-det.ckpt"
    write_deterministic_checkpoint(OmegaConf.load(V1_CONFIG), ckpt, seed=0)
    out = converter().convert_to_diffusers(ckpt, folder / "diffusers", V1_CONFIG, safety_checker="off")
    yield ckpt, out
    shutil.rmtree(folder)


@pytest.mark.slow
def test_full_size_images(full_assets, offline):
    """Full size, fp32: the folder gives the single file's image, and diffusers' DDIM image is ours."""
    import gc

    ckpt, folder = full_assets
    images, x_T = [], None
    for path in (ckpt, folder):
        pipe = load_pipeline(V1_CONFIG, path, device="cpu", precision="full", safety_checker="off", verbose=False,
                             backend="torch")  # the reference backend, also where auto would pick OpenVINO
        images.append(ours_image(pipe, "a photograph of an astronaut riding a horse", 5, 5, 7.5, 0.0, 64))
        (x_T,) = pipe.noise([5], [4, 8, 8])
        del pipe
        gc.collect()
    assert images[0].std() > 20 and max_diff(images[0], images[1]) <= 1
    sd_pipe = load_diffusers(folder)
    theirs = diffusers_image(sd_pipe, x_T, "a photograph of an astronaut riding a horse", 5, 5, 7.5, 0.0, 64)
    assert max_diff(images[0], theirs) <= 3


PEAK_RSS = """
import sys
from ldm.inference.pipeline import Settings, load_pipeline
pipe = load_pipeline(sys.argv[1], sys.argv[2], device="cpu", precision="full", safety_checker="off", verbose=False,
                     backend="torch")
pipe.generate(["a photograph of an astronaut riding a horse"], [1], Settings(steps=2, height=64, width=64))
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_full_size_folder_needs_no_more_memory(full_assets):
    """Peak RSS of a fresh process that loads the model and makes an image (every weight used): the diffusers
    folder, memory-mapped like the single file, costs no more."""
    peaks = []
    for path in full_assets:
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(V1_CONFIG), str(path)], cwd=ROOT,
                                capture_output=True, text=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert result.returncode == 0, result.stderr[-2000:]
        peaks.append(int(result.stdout.split()[-1]))
    single_file, folder = peaks
    assert folder <= single_file * 1.01, f"peak RSS {folder / 2**30:.2f} GiB vs {single_file / 2**30:.2f} GiB"
