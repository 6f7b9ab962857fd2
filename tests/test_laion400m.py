"""The LAION-400M text-to-image model (``--laion400m``): BERT tokenizer, x-transformer text encoder, config.

Golden data in tests/fixtures/laion400m/ (see its REFERENCE.md) was produced by the original CompVis code on a
tiny model with the real model's classes and model-level settings; the key list is the real model's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.errors import InputError, LdmError, TokenizerNotFoundError
from ldm.loading.build import parameters_on_meta
from ldm.util import instantiate_from_config
from tests.conftest import FIXTURES, assert_matches_reference

ROOT = Path(__file__).resolve().parents[1]
LAION = FIXTURES / "laion400m"
TOKENIZER = LAION / "bert-tokenizer"
REAL_CONFIG = ROOT / "configs" / "latent-diffusion" / "txt2img-1p4B-eval.yaml"
PROMPTS = ["a red circle on a blue background", "a painting of a virus monster playing guitar"]
MODULES = "ldm.modules.encoders.modules"


def tiny_config(tokenizer: str | Path = TOKENIZER):
    config = OmegaConf.load(LAION / "v1-laion-tiny.yaml")
    config.model.params.cond_stage_config.params.tokenizer_version = str(tokenizer)
    return config


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(LAION / "weights.safetensors").items()}


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(LAION / "io.safetensors")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("laion") / "model.ckpt"
    torch.save({"state_dict": tiny_state_dict(), "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("laion_config") / "v1-laion-tiny.yaml"
    OmegaConf.save(tiny_config(), path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    from ldm.loading.build import load_model_from_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference ran on one thread; the tiny model gains nothing from more
    yield load_model_from_config(tiny_config(), ckpt)
    torch.set_num_threads(threads)


def build_on_meta(config):
    with parameters_on_meta():
        return instantiate_from_config(config.model)


def real_config():
    """The real config with the tiny vocabulary standing in for bert-base-uncased (the tokenizer has no weights)."""
    config = OmegaConf.load(REAL_CONFIG)
    config.model.params.cond_stage_config.params.tokenizer_version = str(TOKENIZER)
    return config


# ---------------------------------------------------------------------------------------------- parity
def test_tokens_match_reference(model, io):
    tokens = model.cond_stage_model.tknz_fn(PROMPTS + [""])
    assert tokens.dtype == torch.int64 and torch.equal(tokens, io["tokens"])
    assert torch.equal(model.cond_stage_model.tokenize(PROMPTS + [""]), io["tokens"])


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_conditioning(model, io, name):
    prompts = PROMPTS if name == "cond" else ["", ""]
    with torch.no_grad():
        assert_matches_reference(model.get_learned_conditioning(prompts), io[name], name)


def test_unet_and_decoder(model, io):
    with torch.no_grad():
        assert_matches_reference(model.apply_model(io["unet_x"], io["unet_t"], io["cond"]), io["unet_eps"], "unet")
        assert_matches_reference(model.decode_first_stage(io["z"]), io["decoded"], "decoded")


@pytest.mark.parametrize("name, module, cls", [("ddim_s10_eta0", "ldm.models.diffusion.ddim", "DDIMSampler"),
                                               ("plms_s10", "ldm.models.diffusion.plms", "PLMSSampler")])
def test_samplers(model, io, name, module, cls):
    import importlib

    sampler = getattr(importlib.import_module(module), cls)(model)
    with torch.no_grad():
        out, _ = sampler.sample(S=10, conditioning=io["cond"], batch_size=2, shape=[4, 8, 8], verbose=False,
                                unconditional_guidance_scale=5.0, unconditional_conditioning=io["uncond"], eta=0.0,
                                x_T=io["x_T"])
    assert_matches_reference(out, io[name], name)


def test_layers_are_pre_norm_with_padding_attended(model):
    """[PAD] positions are embedded and attended (no mask): a longer prompt changes the padded positions too."""
    with torch.no_grad():
        a, b = model.get_learned_conditioning(["a red circle", "a red circle on a blue background"])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_text_encoder_uses_exact_gelu_and_layer_norm_eps_1e_5(model):
    """Details the tiny model's tolerance cannot see (tanh GELU moves ``cond`` by half the tolerance there)."""
    modules = list(model.cond_stage_model.modules())
    gelus = [m for m in modules if isinstance(m, torch.nn.GELU)]
    norms = [m for m in modules if isinstance(m, torch.nn.LayerNorm)]
    assert len(gelus) == 2 and all(m.approximate == "none" for m in gelus)
    assert len(norms) == 2 * 2 + 1 and all(m.eps == 1e-5 and m.elementwise_affine for m in norms)


# ---------------------------------------------------------------------------------------------- real model layout
def test_state_dict_layout_is_the_real_checkpoint():
    """Keys, shapes and dtypes of txt2img-1p4B-eval.yaml equal the real LAION-400M checkpoint's (1,368 keys)."""
    expected = json.loads((LAION / "ldm-txt2img-1p4B-keys.json").read_text())
    state_dict = build_on_meta(real_config()).state_dict()
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state_dict.items()}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_parameter_counts_of_the_real_model():
    model = build_on_meta(real_config())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.model) == 872_300_484
    assert count(model.first_stage_model) == 83_653_863
    assert count(model.cond_stage_model) == 581_994_042
    assert model.scale_factor == 0.18215 and not model.use_ema and model.cond_stage_trainable


def test_real_config_settings():
    """Every setting of the original txt2img-1p4B-eval.yaml (tests/fixtures/laion400m/REFERENCE.md, table)."""
    config = OmegaConf.to_container(OmegaConf.load(REAL_CONFIG))
    model = config["model"]
    assert (model["target"], model["base_learning_rate"]) == ("ldm.models.diffusion.ddpm.LatentDiffusion", 5.0e-05)
    params = dict(model["params"])
    unet, first, cond = (params.pop(k) for k in ("unet_config", "first_stage_config", "cond_stage_config"))
    assert params == dict(linear_start=0.00085, linear_end=0.012, num_timesteps_cond=1, log_every_t=200,
                          timesteps=1000, first_stage_key="image", cond_stage_key="caption", image_size=32,
                          channels=4, cond_stage_trainable=True, conditioning_key="crossattn",
                          monitor="val/loss_simple_ema", scale_factor=0.18215, use_ema=False)
    assert unet == dict(target="ldm.modules.diffusionmodules.openaimodel.UNetModel", params=dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
        context_dim=1280, use_checkpoint=True, legacy=False))
    assert first == dict(target="ldm.models.autoencoder.AutoencoderKL", params=dict(
        embed_dim=4, monitor="val/rec_loss", ddconfig=dict(
            double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
            num_res_blocks=2, attn_resolutions=[], dropout=0.0), lossconfig=dict(target="torch.nn.Identity")))
    assert cond == dict(target=f"{MODULES}.BERTEmbedder", params=dict(n_embed=1280, n_layer=32))


def test_bert_embedder_defaults_are_the_original():
    import inspect

    from ldm.modules.encoders.modules import BERTEmbedder, BERTTokenizer

    defaults = {k: p.default for k, p in inspect.signature(BERTEmbedder).parameters.items()}
    assert defaults == dict(n_embed=inspect.Parameter.empty, n_layer=inspect.Parameter.empty, vocab_size=30522,
                            max_seq_len=77, device="cuda", use_tokenizer=True, embedding_dropout=0.0,
                            tokenizer_version="bert-base-uncased")
    defaults = {k: p.default for k, p in inspect.signature(BERTTokenizer).parameters.items()}
    assert defaults == dict(device="cuda", vq_interface=True, max_length=77, version="bert-base-uncased")


def test_x_transformer_refuses_options_it_does_not_implement():
    from ldm.modules.x_transformer import Decoder, Encoder, TransformerWrapper

    with pytest.raises(TypeError, match="rel_pos_bias"):
        Encoder(dim=8, depth=1, rel_pos_bias=True)
    with pytest.raises(TypeError, match="talking_heads"):
        Encoder(dim=8, depth=1, attn_talking_heads=True)
    wrapper = TransformerWrapper(num_tokens=10, max_seq_len=6, attn_layers=Decoder(dim=8, depth=1, heads=2,
                                                                                     ff_glu=True))
    tokens = torch.tensor([[1, 2, 3, 4]])
    logits = wrapper(tokens)
    assert logits.shape == (1, 4, 10)
    # causal: the first positions do not see the later ones
    changed = wrapper(torch.tensor([[1, 2, 3, 9]]))
    assert torch.allclose(logits[:, :3], changed[:, :3], atol=1e-6) and not torch.allclose(logits[:, 3], changed[:, 3])
    with pytest.raises(NotImplementedError):
        wrapper(tokens, mask=torch.ones(1, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- tokenizer, offline
def test_tokenizer_is_the_fixture_vocabulary_and_tokens_stay_on_the_cpu():
    from ldm.modules.encoders.modules import BERTTokenizer

    tokenizer = BERTTokenizer(version=str(TOKENIZER))  # device "cuda", the original's default
    assert len(tokenizer.tokenizer) == 429
    tokens = tokenizer(["Café painting"])
    if not torch.cuda.is_available():
        assert tokens.device.type == "cpu"
    assert tokens[0, :5].tolist() == [2, 312, 213, 367, 3]  # [CLS] cafe paint ##ing [SEP]
    _, _, (_, _, same) = tokenizer.encode(["Café painting"])
    assert torch.equal(same, tokens)
    assert tokenizer.count_tokens(" ".join(["red"] * 100)) == 102


def _hub_cache(monkeypatch, path: Path) -> Path:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    return path


def _no_local_models(monkeypatch, tmp_path):
    import ldm.modules.encoders.modules as modules

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(modules, "PROJECT_ROOT", tmp_path / "project")
    _hub_cache(monkeypatch, tmp_path / "hub")


def test_default_tokenizer_is_found_in_models_and_in_the_hf_cache(monkeypatch, tmp_path):
    import shutil

    from ldm.modules.encoders.modules import find_bert_tokenizer, load_bert_tokenizer

    _no_local_models(monkeypatch, tmp_path)
    with pytest.raises(TokenizerNotFoundError):
        find_bert_tokenizer()
    # the Hugging Face cache, under the hub's current id
    snapshot = tmp_path / "hub" / "models--google-bert--bert-base-uncased" / "snapshots" / "abc"
    shutil.copytree(TOKENIZER, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    assert find_bert_tokenizer() == snapshot
    # models/bert-base-uncased/ (relative to the project root) comes first
    local = tmp_path / "project" / "models" / "bert-base-uncased"
    shutil.copytree(TOKENIZER, local)
    assert find_bert_tokenizer("bert-base-uncased") == local
    assert len(load_bert_tokenizer()) == 429


def test_missing_tokenizer_is_one_clear_error(monkeypatch, tmp_path):
    from ldm.modules.encoders.modules import BERTEmbedder, find_bert_tokenizer

    _no_local_models(monkeypatch, tmp_path)
    with pytest.raises(TokenizerNotFoundError) as err:
        BERTEmbedder(n_embed=8, n_layer=1, device="cpu")
    message = str(err.value)
    assert isinstance(err.value, LdmError) and "\n" not in message
    assert "bert-base-uncased" in message and "models/bert-base-uncased/" in message and "vocab.txt" in message
    assert "never downloaded" in message
    with pytest.raises(TokenizerNotFoundError, match="no vocab.txt"):
        find_bert_tokenizer(str(tmp_path))  # a folder without the vocabulary


def test_a_vocabulary_of_special_tokens_only_is_refused(tmp_path):
    from ldm.modules.encoders.modules import load_bert_tokenizer

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(TokenizerNotFoundError, match="only its 5 special tokens"):
        load_bert_tokenizer(str(tmp_path))


def test_a_tokenizer_larger_than_the_embedding_is_refused():
    from ldm.modules.encoders.modules import BERTEmbedder

    with pytest.raises(InputError, match="429 tokens, more than the 100"):
        BERTEmbedder(n_embed=8, n_layer=1, vocab_size=100, tokenizer_version=str(TOKENIZER))


# ---------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipes(config_path, ckpt):
    from ldm.inference.pipeline import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {p: load_pipeline(config_path, ckpt, "cpu", p, "off", say=lambda m: None) for p in ("full", "bf16")}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpm_solver"])
@pytest.mark.parametrize("precision", ["full", "bf16"])
def test_pipeline_runs_every_sampler_and_precision_on_the_cpu(pipes, sampler, precision):
    from ldm.inference.pipeline import Settings

    pipe = pipes[precision]
    settings = Settings(steps=3, sampler=sampler, scale=5.0, height=64, width=64, negative_prompt="blurry")
    images, flagged = pipe.generate(["a red circle", "a blue square"], [1, 2], settings)
    assert images.shape == (2, 64, 64, 3) and images.dtype.name == "uint8" and flagged == [False, False]
    assert images.std() > 0 and not (images[0] == images[1]).all()
    # the recorded seed makes the image alone: within the batched kernels' rounding, bit for bit one at a time
    alone, _ = pipe.generate(["a blue square"], [2], settings)
    assert np.abs(alone[0].astype(np.int16) - images[1]).max() <= 2
    one_at_a_time, _ = pipe.generate(["a red circle", "a blue square"], [1, 2], settings, per_image=True)
    assert (alone[0] == one_at_a_time[1]).all()


def test_pipeline_img2img(pipes):
    from ldm.inference.pipeline import Settings

    pipe = pipes["full"]
    init = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = pipe.encode_init(init)
    settings = Settings(steps=4, sampler="ddim", scale=5.0, height=64, width=64, strength=0.5)
    images, _ = pipe.generate(["a red circle"], [3], settings, posterior)
    assert images.shape == (1, 64, 64, 3)


def test_long_prompt_warning_counts_bert_tokens(pipes):
    from ldm.app.run import _warn_long_prompts

    said = []
    _warn_long_prompts(pipes["full"], [" ".join(["red"] * 80), "a red circle"], "", said.append)
    assert len(said) == 1 and "has 82 tokens; only the first 77 are used" in said[0]


# ---------------------------------------------------------------------------------------------- script
def _start(argv: list[str], cwd: Path, **env) -> subprocess.Popen:
    environment = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
    environment.pop("LDM_TRACEBACK", None)
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "txt2img.py"), *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)


def test_txt2img_laion400m_end_to_end_and_missing_tokenizer(tmp_path, config_path, ckpt):
    """``--laion400m --config <tiny> --ckpt <tiny>`` writes images to the LAION outdir; a config whose tokenizer is
    not on this machine fails with one line."""
    from ldm.app.output import parse_parameters

    small = ["--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--device", "cpu",
             "--safety_checker", "off", "--seed", "5"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    good = _start(["--laion400m", "--config", str(config_path), "--ckpt", str(ckpt), "--plms",
                   "--prompt", "a red circle on a blue background", *small], run_dir)
    # the real config's default tokenizer, with no models/bert-base-uncased and an empty Hugging Face cache
    missing = OmegaConf.load(config_path)
    del missing.model.params.cond_stage_config.params["tokenizer_version"]
    OmegaConf.save(missing, tmp_path / "no-tokenizer.yaml")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = _start(["--laion400m", "--config", str(tmp_path / "no-tokenizer.yaml"), "--ckpt", str(ckpt), *small],
                 bad_dir, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    out, err = good.communicate(timeout=600)
    bad_out, bad_err = bad.communicate(timeout=600)

    assert good.returncode == 0 and "Traceback" not in err, err
    assert "Falling back to LAION 400M model..." in out
    outdir = run_dir / "outputs" / "txt2img-samples-laion400m"  # --outdir left at its default: switched
    samples = sorted((outdir / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png"] and len(list(outdir.glob("grid-*.png"))) == 1
    from PIL import Image

    with Image.open(samples[1]) as image:
        assert image.size == (64, 64)
        prompt, _, fields = parse_parameters(image.text["parameters"])
    assert prompt == "a red circle on a blue background"
    assert (fields["Sampler"], fields["Seed"], fields["Size"], fields["Steps"]) == ("PLMS", "6", "64x64", "2")

    if (ROOT / "models" / "bert-base-uncased" / "vocab.txt").is_file():
        pytest.skip("this checkout has models/bert-base-uncased/: the missing-tokenizer case cannot happen")
    assert bad.returncode != 0 and "Traceback" not in bad_err
    lines = bad_err.strip().splitlines()
    assert len(lines) == 1 and "BERT tokenizer 'bert-base-uncased' not found" in lines[0], bad_err
    assert "models/bert-base-uncased/" in lines[0]
    assert not (bad_dir / "outputs" / "txt2img-samples-laion400m" / "samples").exists() or not any(
        (bad_dir / "outputs" / "txt2img-samples-laion400m" / "samples").iterdir())


def test_laion400m_without_the_checkpoint_names_the_download(capsys, monkeypatch):
    from ldm.app import cli
    from tests.test_scripts import load_script

    if (ROOT / "models" / "ldm" / "text2img-large" / "model.ckpt").exists():
        pytest.skip("this checkout has the LAION-400M checkpoint")
    monkeypatch.chdir(ROOT)  # the config ships with the project; the checkpoint does not
    code = cli.main(load_script("txt2img").main, ["--laion400m"], prog="txt2img.py")
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "missing: models/ldm/text2img-large/model.ckpt (download the checkpoint from " \
           "https://ommer-lab.com/files/latent-diffusion/nitro/txt2img-f8-large/model.ckpt" in err
