"""The checkpoint loader: original layouts, safetensors, strictness, EMA handling, refusal of code in pickles."""
from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.backend.memory import release_file_pages
from ldm.errors import CheckpointError
from ldm.loading.build import load_model_from_config
from ldm.loading.checkpoint import read_checkpoint
from tests.conftest import tiny_config, tiny_ema_state_dict, tiny_state_dict


def load(path, **config_overrides):
    config = tiny_config()
    for key, value in config_overrides.items():
        config.model.params[key] = value
    return load_model_from_config(config, path)


def unet_output(model, tiny_io):
    with torch.no_grad():
        return model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])


def test_lightning_checkpoint_with_extras_loads(tmp_path, tiny_io):
    """A checkpoint as Lightning 1.x wrote SD v1 (callbacks keyed by the ModelCheckpoint class, numpy scalars)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    path = tmp_path / "lightning.ckpt"
    torch.save({
        "state_dict": tiny_state_dict(),
        "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
        "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": np.float64(0.12),
                                        "dirpath": "/fsx/logs/checkpoints"}},
        "hyper_parameters": {"lr": np.array([1e-4])},
    }, path)
    state_dict, extras = read_checkpoint(path)
    assert extras["global_step"] == 470000
    model = load(path)
    assert not model.training
    weight = model.model.diffusion_model.out[2].weight
    assert torch.equal(weight, tiny_state_dict()["model.diffusion_model.out.2.weight"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state_dict(), "x": payload}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "x": payload}, f)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_safetensors_and_fp16_checkpoints(tmp_path, tiny_io, tiny_model):
    sd = tiny_state_dict()
    path = tmp_path / "model.safetensors"
    save_file({k: v.half() if v.is_floating_point() and "." in k else v for k, v in sd.items()}, path)
    model = load(path)
    assert model.model.diffusion_model.out[2].weight.dtype == torch.float32  # cast to the model's dtype
    # the reference weights are exactly representable in fp16, so the outputs are identical
    assert torch.equal(unet_output(model, tiny_io), unet_output(tiny_model, tiny_io))


def test_bare_state_dict_and_legacy_clip_keys(tmp_path, tiny_io, tiny_model):
    """transformers 4.x layout (``transformer.text_model.*`` and ``position_ids``) as in sd-v1-4.ckpt."""
    sd = {}
    for key, value in tiny_state_dict().items():
        sd[key.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.")] = value
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "legacy.ckpt"
    torch.save(sd, path)
    model = load(path)
    with torch.no_grad():
        assert torch.equal(model.get_learned_conditioning(["a cat"]), tiny_model.get_learned_conditioning(["a cat"]))


def test_missing_keys_are_named(tmp_path):
    sd = tiny_state_dict()
    del sd["model.diffusion_model.out.2.weight"]
    path = tmp_path / "missing.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"1 keys missing: model\.diffusion_model\.out\.2\.weight"):
        load(path)


def test_unexpected_keys_are_named(tmp_path):
    sd = tiny_state_dict()
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / "unexpected.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.diffusion_model\.extra\.weight"):
        load(path)


def test_wrong_shapes_are_named(tmp_path):
    sd = tiny_state_dict()
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    path = tmp_path / "shapes.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.out\.2\.bias \(5,\) vs \(4,\)"):
        load(path)


def test_missing_autoencoder_is_named(tmp_path):
    sd = {k: v for k, v in tiny_state_dict().items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "noae.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        load(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(path)


def test_truncated_checkpoint(tmp_path, tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        read_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="not a file"):
        read_checkpoint(tmp_path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        read_checkpoint(path)


@pytest.fixture
def full_ckpt(tmp_path):
    """A "full" checkpoint: plain weights plus ``model_ema.*`` weights that differ from them."""
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**tiny_state_dict(), **tiny_ema_state_dict()}}, path)
    return path


def test_ema_weights_are_what_ema_scope_switches_to(full_ckpt, tiny_io, tiny_model):
    model = load(full_ckpt, use_ema=True)
    plain = unet_output(model, tiny_io)
    assert torch.equal(plain, unet_output(tiny_model, tiny_io))
    ema = tiny_ema_state_dict()
    with model.ema_scope():
        weight = model.model.diffusion_model.input_blocks[0][0].weight
        assert torch.equal(weight, ema["model_ema.diffusion_modelinput_blocks00weight"])
        assert not torch.allclose(unet_output(model, tiny_io), plain)
    assert torch.equal(unet_output(model, tiny_io), plain)


def test_ema_weights_ignored_with_a_note(full_ckpt, tiny_io, tiny_model, capsys):
    model = load(full_ckpt, use_ema=False)
    assert "EMA weights" in capsys.readouterr().out
    assert torch.equal(unet_output(model, tiny_io), unet_output(tiny_model, tiny_io))


def test_use_ema_without_ema_weights_is_an_error(tiny_ckpt):
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load(tiny_ckpt, use_ema=True)


def test_bf16_loading_keeps_schedule_in_float32(tiny_ckpt):
    model = load_model_from_config(tiny_config(), tiny_ckpt, dtype=torch.bfloat16)
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_checkpoint_zip_written_by_torch_is_memory_mapped(tiny_ckpt):
    """Loading maps the file instead of copying it (the basis of the low peak memory)."""
    assert zipfile.is_zipfile(tiny_ckpt)
    state_dict, _ = read_checkpoint(tiny_ckpt)
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(tiny_ckpt)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    pointers = [t.data_ptr() for t in state_dict.values()]
    assert ranges and all(any(a <= p < b for a, b in ranges) for p in pointers)


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux /proc")
def test_released_weight_pages_fault_back_with_their_values(tiny_ckpt, tiny_io):
    """Setting a part aside drops its clean file pages; a weight changed after loading keeps its change."""
    model = load(tiny_ckpt)
    changed = model.model.diffusion_model.out[2].weight
    with torch.no_grad():
        changed.add_(0.5)  # written after loading: a private copy of those pages, which must survive
    expected_weight = changed.detach().clone()
    before = unet_output(model, tiny_io)  # touches every UNet page
    released = release_file_pages(model.model)
    assert released > 1 << 20, f"only {released} bytes released"
    assert torch.equal(changed, expected_weight)
    assert torch.equal(unet_output(model, tiny_io), before)
    assert release_file_pages(torch.nn.Linear(3, 3)) == 0  # ordinary memory is never touched
