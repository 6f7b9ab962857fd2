"""Parity of the ldm core with the original CompVis implementation (golden data in tests/fixtures)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.loading.build import parameters_on_meta
from ldm.util import instantiate_from_config
from tests.conftest import FIXTURES, PROMPTS, assert_matches_reference

V1_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


def build_on_meta(config):
    with parameters_on_meta():
        return instantiate_from_config(config.model)


def test_tokenizer_matches_reference(tiny_model, tiny_io):
    tokens = tiny_model.cond_stage_model.tokenize(PROMPTS + [""])
    assert torch.equal(tokens, tiny_io["tokens"])


def test_default_tokenizer_is_clip_vit_l14():
    """The tokenizer shipped in the package (default version) gives the reference token ids."""
    from ldm.modules.encoders.modules import TOKENIZER_DIR, _tokenizer

    tokenizer = _tokenizer(None)
    assert (TOKENIZER_DIR / "vocab.json").is_file()
    ids = tokenizer(["a photograph of an astronaut riding a horse"]).input_ids[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(tokenizer) == 49408


TEXTS = ["", "a photograph of an astronaut riding a horse", "  many   spaces\tand\nnewlines  ", "UPPER lower MiXeD",
         "na\u00efve caf\u00e9 \u2014 \u201cquotes\u201d \U0001f600 \u65e5\u672c\u8a9e",
         "<|startoftext|> special <|endoftext|> tokens", "don't they'll I'M", "numbers 1234567 3.14", "a,b;c!d?e...",
         "word " * 100, "x" * 300]


def test_token_ids_without_transformers_are_the_embedders(tiny_model, tiny_io):
    """``CLIPTokenIds`` (the ``tokenizers`` pipeline alone, for the OpenVINO backend's runs from the cache): the
    original's ids for the reference prompts, and the embedder's ids and counts for awkward text, long text
    included, with the tiny model's tokenizer and the shipped ViT-L/14 one."""
    from types import SimpleNamespace

    from ldm.modules.encoders.modules import CLIPTokenIds, FrozenCLIPEmbedder, _tokenizer

    ids = CLIPTokenIds(**CLIPTokenIds.state(tiny_model.cond_stage_model))
    assert torch.equal(ids.tokenize(PROMPTS + [""]), tiny_io["tokens"])
    default = SimpleNamespace(tokenizer=_tokenizer(None), max_length=77)
    for embedder in (tiny_model.cond_stage_model, default):
        ids = CLIPTokenIds(**CLIPTokenIds.state(embedder))
        assert torch.equal(ids.tokenize(TEXTS), FrozenCLIPEmbedder.tokenize(embedder, TEXTS))
        assert [ids.count_tokens(t) for t in TEXTS] == [FrozenCLIPEmbedder.count_tokens(embedder, t) for t in TEXTS]
    assert ids.count_tokens("word " * 100) == 102 and ids.tokenize(["word " * 100]).shape == (1, 77)


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_conditioning(tiny_model, tiny_io, name):
    prompts = PROMPTS if name == "cond" else ["", ""]
    with torch.no_grad():
        assert_matches_reference(tiny_model.get_learned_conditioning(prompts), tiny_io[name], name)


def test_unet(tiny_model, tiny_io):
    with torch.no_grad():
        eps = tiny_model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
    assert_matches_reference(eps, tiny_io["unet_eps"], "unet_eps")


def test_first_stage(tiny_model, tiny_io):
    posterior = tiny_model.encode_first_stage(tiny_io["img"])
    assert_matches_reference(posterior.mean, tiny_io["post_mean"], "post_mean")
    assert_matches_reference(posterior.logvar, tiny_io["post_logvar"], "post_logvar")
    assert_matches_reference(posterior.mode() * tiny_model.scale_factor, tiny_io["z_scaled"], "z_scaled")
    assert_matches_reference(tiny_model.decode_first_stage(tiny_io["z_scaled"]), tiny_io["decoded"], "decoded")


def test_get_first_stage_encoding_samples_the_posterior(tiny_model, tiny_io):
    posterior = tiny_model.encode_first_stage(tiny_io["img"])
    torch.manual_seed(0)
    z = tiny_model.get_first_stage_encoding(posterior)
    torch.manual_seed(0)
    expected = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape)) * tiny_model.scale_factor
    assert torch.allclose(z, expected)
    assert not torch.allclose(z, posterior.mode() * tiny_model.scale_factor)


def test_q_sample_and_loss(tiny_model, tiny_io):
    with torch.no_grad():
        x_t = tiny_model.q_sample(tiny_io["q_x0"], tiny_io["q_t"], tiny_io["q_noise"])
        loss, loss_dict = tiny_model.p_losses(tiny_io["q_x0"], tiny_io["cond"], tiny_io["loss_t"], tiny_io["q_noise"])
    assert_matches_reference(x_t, tiny_io["q_sample"], "q_sample")
    assert_matches_reference(loss.reshape(1), tiny_io["loss"], "loss")
    assert set(loss_dict) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


def test_x0_parameterization_targets_x0(tiny_model, tiny_io):
    """p_losses compares the model output with x_0 instead of the noise in x0 mode."""
    x0, noise, t = tiny_io["q_x0"], tiny_io["q_noise"], tiny_io["loss_t"]
    with torch.no_grad():
        out = tiny_model.apply_model(tiny_model.q_sample(x0, t, noise), t, tiny_io["cond"])
        tiny_model.parameterization = "x0"
        try:
            loss, _ = tiny_model.p_losses(x0, tiny_io["cond"], t, noise)
        finally:
            tiny_model.parameterization = "eps"
    assert torch.allclose(loss, ((out - x0) ** 2).mean(), rtol=1e-5)


def test_schedule_buffers_match_the_real_checkpoint_names():
    """The schedule buffers are the original's (names, dtype, and the scaled-linear betas of SD v1)."""
    config = OmegaConf.load(V1_CONFIG)
    model = build_on_meta(config)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(model.betas, betas.float())
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert torch.allclose(model.sqrt_one_minus_alphas_cumprod, (1 - alphas_cumprod).sqrt().float())
    assert torch.allclose(model.alphas_cumprod_prev[1:], alphas_cumprod[:-1].float())


@pytest.mark.parametrize("use_ema", [False, True])
def test_state_dict_layout_is_the_real_checkpoint(use_ema):
    """Keys, shapes and dtypes of v1-inference.yaml equal the real SD v1 checkpoint's (and its EMA keys)."""
    expected = json.loads((FIXTURES / "sd-v1-keys.json").read_text())
    if use_ema:
        expected.update(json.loads((FIXTURES / "sd-v1-ema-keys.json").read_text()))
    config = OmegaConf.load(V1_CONFIG)
    config.model.params.use_ema = use_ema
    state_dict = build_on_meta(config).state_dict()
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state_dict.items()}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_parameter_counts_of_sd_v1():
    config = OmegaConf.load(V1_CONFIG)
    model = build_on_meta(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.model) == 859_520_964
    assert count(model.first_stage_model) == 83_653_863
    assert count(model.cond_stage_model) == 123_060_480


def test_instantiate_from_config_semantics():
    from ldm.util import get_obj_from_str

    assert get_obj_from_str("torch.nn.Identity") is torch.nn.Identity
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 3
    assert instantiate_from_config("__is_unconditional__") is None
    with pytest.raises(KeyError, match="target"):
        instantiate_from_config({"params": {}})


def test_ema_naming_and_update():
    from ldm.modules.ema import LitEma

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    ema = LitEma(net)
    assert set(dict(ema.named_buffers())) == {"decay", "num_updates", "0weight", "0bias"}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    before = ema.get_buffer("0weight").clone()
    ema(net)
    decay = min(0.9999, (1 + 1) / (10 + 1))
    assert torch.allclose(ema.get_buffer("0weight"), before - (1 - decay) * (before - net[0].weight))
    assert int(ema.num_updates) == 1
    ema.store(net.parameters())
    ema.copy_to(net)
    assert torch.equal(net[0].weight, ema.get_buffer("0weight"))
    ema.restore(net.parameters())
    assert torch.equal(net[0].weight, before + 1.0)


def test_default_clip_embedder_builds_offline_from_code():
    """The default version builds ViT-L/14's text tower from the in-code config; an unknown hub id is refused."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    with parameters_on_meta():
        embedder = FrozenCLIPEmbedder()
    config = embedder.transformer.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.hidden_act == "quick_gelu" and config.max_position_embeddings == 77
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        FrozenCLIPEmbedder(version="someone/some-clip-model")


def test_clip_folder_of_a_shipped_config_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """models/ldm/toy-shapes/config.yaml names its CLIP folder relative to the project root."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    monkeypatch.chdir(tmp_path)
    embedder = FrozenCLIPEmbedder(version="models/ldm/toy-shapes/clip", max_length=16)
    assert embedder.transformer.config.hidden_size == 32
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        FrozenCLIPEmbedder(version="models/ldm/no-such-model/clip")
