""".ckpt -> .safetensors conversion (scripts/convert_ckpt.py): same tensors, same model outputs through the same
loader, fp16/bf16 casts that keep the schedule in float32, no overwriting, no partial files, no code run."""
from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldm.app import cli
from ldm.errors import CheckpointError, OutputError
from ldm.loading.build import load_model_from_config
from ldm.loading.checkpoint import read_checkpoint
from tests.conftest import tiny_config, tiny_ema_state_dict, tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]


def converter():
    spec = importlib.util.spec_from_file_location("convert_ckpt", ROOT / "scripts" / "convert_ckpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outputs(model, tiny_io) -> list[torch.Tensor]:
    """UNet output, text conditioning and a decode: every part of the model."""
    with torch.no_grad():
        return [model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"]),
                model.get_learned_conditioning(["a red circle"]),
                model.decode_first_stage(tiny_io["unet_x"][:1])]


def leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp-" in name]


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory) -> Path:
    """An original-style Lightning checkpoint: weights, EMA weights, and bookkeeping entries."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    path = tmp_path_factory.mktemp("lightning") / "model.ckpt"
    torch.save({"state_dict": {**tiny_state_dict(), **tiny_ema_state_dict()}, "global_step": 470000,
                "epoch": 6, "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.1)}}}, path)
    return path


def test_fp32_conversion_is_exact_and_loads_identically(lightning_ckpt, tmp_path, tiny_io):
    out = converter().convert(lightning_ckpt, tmp_path / "model.safetensors")
    source, _ = read_checkpoint(lightning_ckpt)
    converted, extras = read_checkpoint(out)
    assert extras == {} and sorted(converted) == sorted(source)  # EMA kept, Lightning bookkeeping dropped
    for key, tensor in source.items():
        assert converted[key].dtype == tensor.dtype and torch.equal(converted[key], tensor), key
    # the official reader sees the same file
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(source)
        assert torch.equal(f.get_tensor("model.diffusion_model.out.2.weight"),
                           source["model.diffusion_model.out.2.weight"])
    for use_ema in (False, True):
        config = tiny_config()
        config.model.params.use_ema = use_ema
        a, b = load_model_from_config(config, lightning_ckpt), load_model_from_config(config, out)
        with a.ema_scope(), b.ema_scope():
            for x, y in zip(outputs(a, tiny_io), outputs(b, tiny_io)):
                assert torch.equal(x, y)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_keeps_the_schedule_in_float32(tiny_ckpt, tmp_path, dtype, torch_dtype):
    out = converter().convert(tiny_ckpt, tmp_path / f"{dtype}.safetensors", dtype)
    source, _ = read_checkpoint(tiny_ckpt)
    converted, _ = read_checkpoint(out)
    for key, tensor in source.items():
        if not tensor.is_floating_point():
            assert converted[key].dtype == tensor.dtype and torch.equal(converted[key], tensor), key
        elif "." not in key:  # schedule buffers: betas, alphas_cumprod, ...
            assert converted[key].dtype == torch.float32 and torch.equal(converted[key], tensor), key
        else:
            assert converted[key].dtype == torch_dtype and torch.equal(converted[key], tensor.to(torch_dtype)), key
    assert "alphas_cumprod" in converted and out.stat().st_size < 0.6 * tiny_ckpt.stat().st_size


def test_fp16_file_gives_the_same_outputs(tiny_ckpt, tmp_path, tiny_io, tiny_model):
    """The reference weights are exactly representable in fp16, so loading the fp16 file changes nothing."""
    out = converter().convert(tiny_ckpt, tmp_path / "fp16.safetensors", "fp16")
    model = load_model_from_config(tiny_config(), out)
    for x, y in zip(outputs(model, tiny_io), outputs(tiny_model, tiny_io)):
        assert torch.equal(x, y)


def test_never_overwrites(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"precious")
    code = cli.main(converter().main, [str(tiny_ckpt), str(out)], prog="convert_ckpt.py")
    err = capsys.readouterr().err
    assert code == 1 and "already exists; not overwriting" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == []
    link = tmp_path / "dangling.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="already exists"):
        converter().convert(tiny_ckpt, link)
    assert not (tmp_path / "nowhere").exists()


def test_a_name_taken_while_converting_is_not_overwritten(tiny_ckpt, tmp_path, monkeypatch):
    module = converter()
    out = tmp_path / "model.safetensors"
    write = module.write_safetensors

    def write_then_collide(path, *args):
        write(path, *args)
        out.write_bytes(b"another process")

    monkeypatch.setattr(module, "write_safetensors", write_then_collide)
    with pytest.raises(OutputError, match="already exists"):
        module.convert(tiny_ckpt, out)
    assert out.read_bytes() == b"another process" and leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    module = converter()

    def interrupted(path, *args):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module.convert(tiny_ckpt, tmp_path / "model.safetensors")
    assert os.listdir(tmp_path) == []


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_the_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        converter().convert(evil)
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


def test_command_line(tiny_ckpt, tmp_path):
    """The script as users run it: default output name next to the input, one line of output."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.symlink_to(tiny_ckpt)
    env = dict(os.environ)
    env.pop(cli.TRACEBACK_ENV, None)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_ckpt.py"), str(ckpt), "--dtype",
                             "fp16"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'model.safetensors'} (8.1 MiB, fp16)"
    assert read_checkpoint(tmp_path / "model.safetensors")[0]["model.diffusion_model.out.2.weight"].dtype == \
        torch.float16
