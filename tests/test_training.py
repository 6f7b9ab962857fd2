"""Training: main.py runs (checkpoint layout, strict reload, EMA, resume, Ctrl-C, DDP), the autoencoder losses,
learning-rate schedules, caption dropout, and the toy-shapes data spec."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

import main as main_module
from ldm.data.toy_shapes import (
    CAPTIONS,
    ToyShapes,
    ToyShapesLatents,
    ToyShapesTrain,
    ToyShapesValidation,
    flatten,
    spec_for_index,
)
from ldm.errors import CheckpointError
from ldm.loading.build import load_model_from_config
from ldm.loading.checkpoint import read_checkpoint
from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2
from ldm.util import instantiate_from_config
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
LDM_CONFIG = ROOT / "configs" / "toy-shapes" / "ldm.yaml"
AE_CONFIG = ROOT / "configs" / "toy-shapes" / "autoencoder.yaml"

# A tiny model with the toy config's structure: small UNet, f=8 autoencoder, the 2-layer test CLIP.
TINY_LDM = {
    "model": {"params": {
        "unet_config": {"params": {"model_channels": 32, "channel_mult": [1], "num_res_blocks": 1,
                                   "attention_resolutions": [1], "context_dim": 32}},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 1, 1, 1]}}},
        "cond_stage_config": {"params": {"version": str(TINY / "clip")}},
        "scheduler_config": {"params": {"warm_up_steps": [2], "cycle_lengths": [10]}},
    }},
    "data": {"params": {"batch_size": 4, "train": {"params": {"size": 16}},
                        "validation": {"params": {"size": 4}}}},
    "lightning": {
        "trainer": {"max_steps": 3, "val_check_interval": 2, "log_every_n_steps": 1, "precision": "32-true",
                    "accelerator": "cpu", "devices": 1},
        "callbacks": {"image_logger": {"params": {"batch_frequency": 2, "max_images": 2,
                                                  "log_images_kwargs": {"N": 2, "ddim_steps": 2}}}},
    },
}
TINY_AE = {
    "model": {"params": {"ddconfig": {"ch_mult": [1, 1, 1, 1]}}},
    "data": {"params": {"batch_size": 2, "train": {"params": {"size": 8}}, "validation": {"params": {"size": 2}}}},
    "lightning": {"trainer": {"max_steps": 2, "val_check_interval": 2, "precision": "32-true",
                              "accelerator": "cpu", "devices": 1},
                  "callbacks": {"image_logger": {"params": {"batch_frequency": 2, "max_images": 2}}}},
}


def write_config(path: Path, content: dict) -> str:
    OmegaConf.save(OmegaConf.create(content), path)
    return str(path)


def run_dir(logdir: Path) -> Path:
    runs = sorted(p for p in logdir.iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run folder in {logdir}, found {runs}"
    return runs[0]


def merged_model_config(run: Path):
    """The project config main.py saved, with use_ema on (the training checkpoints hold EMA weights)."""
    projects = sorted((run / "configs").glob("*-project.yaml"))
    assert projects, f"no project config saved in {run / 'configs'}"
    return OmegaConf.load(projects[-1])


# -------------------------------------------------------------------------------------------------- main.py
@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory) -> Path:
    """Three training steps of a tiny toy-shapes LDM with main.py (validation and image logging included)."""
    tmp = tmp_path_factory.mktemp("ldm_run")
    tiny = write_config(tmp / "tiny.yaml", TINY_LDM)
    main_module.main(["--base", str(LDM_CONFIG), tiny, "-t", "--no-test", "--logdir", str(tmp / "logs"),
                      "--seed", "3"])
    return run_dir(tmp / "logs")


def test_main_writes_the_original_layout(ldm_run):
    ckpts = ldm_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert list(ckpts.glob("epoch=*.ckpt")), "no epoch checkpoint (ModelCheckpoint on val/loss_simple_ema)"
    names = sorted(p.name for p in (ldm_run / "configs").iterdir())
    assert any(n.endswith("-project.yaml") for n in names) and any(n.endswith("-lightning.yaml") for n in names)
    lightning = OmegaConf.load(next((ldm_run / "configs").glob("*-lightning.yaml")))
    assert lightning.lightning.trainer.max_steps == 3
    images = sorted(p.name for p in (ldm_run / "images" / "train").iterdir())
    assert any(n.startswith("samples_gs-000002") for n in images), images
    assert any(n.startswith("inputs_gs-000002") for n in images), images


def test_checkpoint_loads_back_strictly(ldm_run):
    config = merged_model_config(ldm_run)
    sd, extras = read_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    assert extras["global_step"] == 3
    model = load_model_from_config(config, ldm_run / "checkpoints" / "last.ckpt")
    assert set(sd) == set(model.state_dict())
    assert any(k.startswith("model_ema.") for k in sd) and "model_ema.num_updates" in sd
    assert all(k.startswith(("model.", "model_ema.", "first_stage_model.", "cond_stage_model.")) or "." not in k
               for k in sd)
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key].to(value.dtype)), key
    # scale_by_std measured the latents of the first batch
    assert float(sd["scale_factor"]) != 1.0 and math.isfinite(float(sd["scale_factor"]))


def test_ema_is_updated_after_each_step(ldm_run):
    config = merged_model_config(ldm_run)
    sd, _ = read_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    assert int(sd["model_ema.num_updates"]) == 3
    pl.seed_everything(3)
    initial = instantiate_from_config(config.model).state_dict()
    key = "model.diffusion_model.out.2.weight"
    ema_key = "model_ema." + key[len("model."):].replace(".", "")
    trained, ema, start = sd[key], sd[ema_key], initial[key]
    assert not torch.equal(trained, start), "training did not change the UNet"
    assert not torch.equal(ema, start), "EMA weights were never updated"
    assert not torch.equal(ema, trained), "EMA weights equal the raw weights"
    # the EMA moved from the initial weights towards the trained ones
    assert (ema - trained).norm() < (start - trained).norm()


def test_resume_continues_from_last_checkpoint(ldm_run, tmp_path, caplog):
    caplog.set_level("DEBUG")
    trainer = main_module.main(["--resume", str(ldm_run), "-t", "--no-test", "lightning.trainer.max_steps=4"])
    assert isinstance(trainer.strategy.checkpoint_io, main_module.SafeCheckpointIO)  # what Lightning restored with
    _, extras = read_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    assert extras["global_step"] == 4
    assert extras["optimizer_states"] and extras["loops"], "a full training checkpoint, resumable again"
    assert len(list((ldm_run / "configs").glob("*-project.yaml"))) >= 1
    assert "weights_only" not in caplog.text


class _RunsCode:
    """Unpickling this calls ``os.system``: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile_ckpt(tmp_path) -> tuple[Path, Path]:
    """(a Lightning-like checkpoint in a run folder whose unpickling would run a command, the file it would make)."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 1, "callbacks": {"x": _RunsCode(marker)}}, ckpt)
    return ckpt, marker


def _main_py(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _assert_refused_in_one_line(result: subprocess.CompletedProcess, ckpt: Path, marker: Path) -> None:
    assert result.returncode != 0
    assert not marker.exists(), "the checkpoint's code ran"
    lines = result.stderr.strip().splitlines()  # Lightning's "Seed set to 23" may come before
    assert lines[-1].startswith("main.py: error: refusing to load") and str(ckpt) in lines[-1], result.stderr[-2000:]
    assert not [line for line in lines[:-1] if "error" in line.lower() or str(ckpt) in line], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr


@pytest.mark.parametrize("form", ["file", "folder"])
def test_resume_refuses_a_checkpoint_that_would_run_code(hostile_ckpt, form):
    ckpt, marker = hostile_ckpt
    result = _main_py(["--resume", str(ckpt if form == "file" else ckpt.parent.parent), "-t", "--no-test"])
    _assert_refused_in_one_line(result, ckpt, marker)


def test_ckpt_path_refuses_a_checkpoint_that_would_run_code(hostile_ckpt, tmp_path):
    ckpt, marker = hostile_ckpt
    tiny = write_config(tmp_path / "tiny.yaml", TINY_LDM)
    result = _main_py(["--base", str(LDM_CONFIG), tiny, "-t", "--no-test", "--logdir", str(tmp_path / "logs"),
                       f"model.params.ckpt_path={ckpt}"])
    _assert_refused_in_one_line(result, ckpt, marker)


def test_lightning_reads_checkpoints_through_the_safe_loader(hostile_ckpt, ldm_run):
    """What Lightning itself restores (trainer.fit(ckpt_path=...)) is read by SafeCheckpointIO, not torch.load."""
    ckpt, marker = hostile_ckpt
    with pytest.raises(CheckpointError, match="refusing to load"):
        main_module.SafeCheckpointIO().load_checkpoint(ckpt)
    assert not marker.exists()
    checkpoint = main_module.SafeCheckpointIO().load_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    assert {"state_dict", "optimizer_states", "loops", "global_step"} <= set(checkpoint)
    plugins = main_module.with_safe_checkpoint_io(None)
    assert len(plugins) == 1 and isinstance(plugins[0], main_module.SafeCheckpointIO)


class InterruptAt(pl.Callback):
    """Raises KeyboardInterrupt (as Ctrl-C does) after ``step`` training steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt


def test_ctrl_c_saves_last_checkpoint(tmp_path):
    interrupt = {"lightning": {"trainer": {"max_steps": 50}, "callbacks": {
        "interrupt": {"target": "tests.test_training.InterruptAt", "params": {"step": 2}},
        "image_logger": {"params": {"disabled": True}}}}}
    paths = [write_config(tmp_path / "tiny.yaml", TINY_LDM), write_config(tmp_path / "stop.yaml", interrupt)]
    with pytest.raises(SystemExit):
        main_module.main(["--base", str(LDM_CONFIG), *paths, "-t", "--no-test", "--logdir", str(tmp_path / "logs")])
    _, extras = read_checkpoint(run_dir(tmp_path / "logs") / "checkpoints" / "last.ckpt")
    assert extras["global_step"] == 2


def test_scale_lr_multiplies_by_batch_and_accumulation(tmp_path, capsys):
    tiny = write_config(tmp_path / "tiny.yaml", TINY_LDM)
    trainer = main_module.main(["--base", str(LDM_CONFIG), tiny, "--no-test", "--logdir", str(tmp_path / "logs"),
                                "lightning.trainer.accumulate_grad_batches=3"])
    expected = 3 * 1 * 4 * OmegaConf.load(LDM_CONFIG).model.base_learning_rate
    assert trainer.lightning_module is None  # not trained: -t was not given
    out = capsys.readouterr().out
    assert f"Setting learning rate to {expected:.2e} = 3 (accumulate_grad_batches) * 1 (num_gpus) * 4 (batchsize)" \
        in out


def test_override_in_braces_is_a_format_string_not_a_mapping():
    overrides = main_module.parse_overrides(["lightning.modelcheckpoint.params.filename={step:06}",
                                             "lightning.callbacks.a.params.filename={epoch}-{step}",
                                             "model.params.extra={a: 1}"])
    assert overrides.lightning.modelcheckpoint.params.filename == "{step:06}"
    assert overrides.lightning.callbacks.a.params.filename == "{epoch}-{step}"  # not YAML at all
    assert overrides.model.params.extra == {"a": 1}  # a YAML mapping with values stays a mapping
    with pytest.raises(SystemExit, match="not valid YAML"):
        main_module.parse_overrides(["model.params.channel_mult=[1,"])


def test_unknown_argument_is_one_clear_error():
    with pytest.raises(SystemExit, match="key=value"):
        main_module.main(["--base", str(LDM_CONFIG), "--max_steps", "3"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_cpu_processes(tmp_path):
    """lightning.trainer.strategy=ddp with 2 CPU processes (gloo): both ranks train, rank 0 writes one run."""
    tiny = write_config(tmp_path / "tiny.yaml", TINY_LDM)
    cmd = [sys.executable, str(ROOT / "main.py"), "--base", str(LDM_CONFIG), tiny, "-t", "--no-test",
           "--logdir", str(tmp_path / "logs"), "lightning.trainer.strategy=ddp", "lightning.trainer.devices=2",
           "lightning.trainer.accelerator=cpu", "lightning.trainer.max_steps=2",
           "lightning.callbacks.image_logger.params.disabled=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir(tmp_path / "logs")
    sd, extras = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert extras["global_step"] == 2
    assert "2 (num_gpus)" in result.stdout
    load_model_from_config(merged_model_config(run), run / "checkpoints" / "last.ckpt")


# -------------------------------------------------------------------------------------------------- toy model recipe
TINY_AE_ARGS = ["model.params.ddconfig.ch_mult=[1,1,1,1]", "data.params.batch_size=2",
                "data.params.train.params.size=8", "data.params.validation.params.size=2",
                "lightning.trainer.max_steps=2", "lightning.trainer.val_check_interval=2",
                "lightning.callbacks.image_logger.params.disabled=true"]
TINY_LDM_ARGS = ["model.params.unet_config.params.model_channels=32",
                 "model.params.unet_config.params.channel_mult=[1]",
                 "model.params.unet_config.params.attention_resolutions=[1]",
                 "model.params.first_stage_config.params.ddconfig.ch_mult=[1,1,1,1]",
                 f"model.params.cond_stage_config.params.version={TINY / 'clip'}",
                 "model.params.scheduler_config.params.warm_up_steps=[1]",
                 "model.params.scheduler_config.params.cycle_lengths=[3]", "data.params.batch_size=4",
                 "data.params.train.params.size=8", "data.params.validation.params.size=4",
                 "lightning.trainer.max_steps=3", "lightning.trainer.val_check_interval=3"]


def test_toy_latents_are_the_autoencoder_posterior_and_cached(tmp_path):
    tiny = write_config(tmp_path / "tiny.yaml", TINY_AE)
    main_module.main(["--base", str(AE_CONFIG), tiny, "-t", "--no-test", "--logdir", str(tmp_path / "logs")])
    ckpt = run_dir(tmp_path / "logs") / "checkpoints" / "last.ckpt"
    ae_config = OmegaConf.merge(OmegaConf.load(AE_CONFIG), TINY_AE).model
    ae_config.params.ckpt_path = str(ckpt)
    latents = ToyShapesLatents(ae_config, size=6, seed=4)
    cache = Path(f"{ckpt}.latents-seed4-size6.pt")
    assert cache.is_file()
    model = instantiate_from_config(ae_config).eval()
    images = torch.from_numpy(np.stack([ToyShapes(6, seed=4)[i]["image"] for i in range(6)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = model.encode(images)
    torch.testing.assert_close(latents.mean, posterior.mean.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    item = latents[5]
    assert item["image"].shape == (8, 8, 4) and item["txt"] == ToyShapes(6, seed=4)[5]["txt"]
    assert not torch.equal(latents[5]["image"], item["image"]), "a fresh posterior sample per access"
    # a second dataset reads the cache; a cache cut short or of a changed checkpoint is made again
    cache.write_bytes(cache.read_bytes()[:100])
    torch.testing.assert_close(ToyShapesLatents(ae_config, size=6, seed=4).mean, latents.mean)
    stamp = cache.stat().st_mtime_ns
    ToyShapesLatents(ae_config, size=6, seed=4)
    assert cache.stat().st_mtime_ns == stamp, "the cache was rebuilt although nothing changed"
    os.utime(ckpt, ns=(stamp + 10**9, stamp + 10**9))
    ToyShapesLatents(ae_config, size=6, seed=4)
    assert cache.stat().st_mtime_ns != stamp, "a cache of another checkpoint was reused"


def test_train_toy_model_runs_the_recipe_and_exports(tmp_path):
    """scripts/train_toy_model.py on tiny models: the five main.py stages, then an export that loads strictly, with
    the fine-tuned autoencoder as its first stage (its decoder fine-tuned once more by stage 6) and the EMA weights
    of the last LDM run (constant learning rate); --start_from splits an export into what stages 1 and 2 leave,
    --from_stage 5 runs only the last LDM stage and --from_stage 6 only the decoder's."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_toy_model

    logdir, out = tmp_path / "logs", tmp_path / "export"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    stages = ["--ae", *TINY_AE_ARGS, "--ae_ft", *TINY_AE_ARGS, "--ldm", *TINY_LDM_ARGS, "--ldm_ft", *TINY_LDM_ARGS,
              "--ldm_const", *TINY_LDM_ARGS]
    cmd = [sys.executable, str(ROOT / "scripts" / "train_toy_model.py"), "--logdir", str(logdir), "--out", str(out),
           "--ldm_ft_rounds", "1", "--decoder_steps", "2", "--decoder_seeds", "1"]
    result = subprocess.run([*cmd, *stages], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {p.name.split("_", 1)[1]: p for p in logdir.iterdir() if "_toy-shapes" in p.name}
    assert sorted(runs) == ["toy-shapes-autoencoder", "toy-shapes-autoencoder-ft", "toy-shapes-ldm",
                            "toy-shapes-ldm-const1", "toy-shapes-ldm-const2", "toy-shapes-ldm-ft1"]
    config = OmegaConf.load(out / "config.yaml")
    assert config.model.params.first_stage_config.target == "ldm.models.autoencoder.AutoencoderKL"
    assert "ckpt_path" not in OmegaConf.to_yaml(config) and config.model.params.use_ema is False
    model = load_model_from_config(config, out / "model.ckpt")  # strict
    autoencoder, _ = read_checkpoint(runs["toy-shapes-autoencoder-ft"] / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(model.first_stage_model.encoder.conv_out.weight,
                               autoencoder["encoder.conv_out.weight"].half().float())
    assert "decoder: step 2 loss" in result.stdout  # stage 6 ran, on the exported model
    assert not torch.equal(model.first_stage_model.decoder.conv_out.weight,
                           autoencoder["decoder.conv_out.weight"].half().float())
    trained, extras = read_checkpoint(runs["toy-shapes-ldm-const2"] / "checkpoints" / "last.ckpt")
    assert extras["global_step"] == 3
    torch.testing.assert_close(model.model.diffusion_model.out[2].weight,
                               trained["model_ema.diffusion_modelout2weight"].half().float())
    # each continued LDM started from the EMA weights of the one before
    for before in ("toy-shapes-ldm", "toy-shapes-ldm-ft1", "toy-shapes-ldm-const1"):
        first, _ = read_checkpoint(runs[before] / "checkpoints" / "last.ckpt")
        init, _ = read_checkpoint(runs[before] / "checkpoints" / "ldm-init.ckpt")
        assert torch.equal(init["model.diffusion_model.out.2.weight"], first["model_ema.diffusion_modelout2weight"])
        assert int(init["model_ema.num_updates"]) == 0
    const = OmegaConf.load(sorted((runs["toy-shapes-ldm-const1"] / "configs").glob("*-project.yaml"))[-1])
    schedule = const.model.params.scheduler_config.params
    assert schedule.f_start == schedule.f_max == schedule.f_min == [4.0]  # a constant 4x the fine-tune's peak
    # stages 3 and 4 from an export: its autoencoder and LDM
    ae_ckpt, ldm_init = train_toy_model.split_export(out / "model.ckpt", str(tmp_path / "split"))
    exported, _ = read_checkpoint(out / "model.ckpt")
    split, _ = read_checkpoint(ae_ckpt)
    assert torch.equal(split["decoder.conv_out.weight"], exported["first_stage_model.decoder.conv_out.weight"].float())
    sd, _ = read_checkpoint(ldm_init)
    unet_out = exported["model.diffusion_model.out.2.weight"].float()
    assert torch.equal(sd["model_ema.diffusion_modelout2weight"], unet_out)
    assert float(sd["scale_factor"]) == config.model.params.scale_factor
    # --from_stage 5: only the constant-rate run, on the export's autoencoder and LDM
    again = tmp_path / "again"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toy_model.py"), "--logdir", str(again),
                             "--out", str(tmp_path / "export2"), "--start_from", str(out / "model.ckpt"),
                             "--from_stage", "5", "--ldm_const_rounds", "1", "--decoder_steps", "0",
                             "--ldm_const", *TINY_LDM_ARGS],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name.split("_", 1)[1] for p in again.iterdir() if "_toy-shapes" in p.name] == ["toy-shapes-ldm-const1"]
    load_model_from_config(OmegaConf.load(tmp_path / "export2" / "config.yaml"), tmp_path / "export2" / "model.ckpt")
    # --from_stage 6: a copy of the export with only the decoder changed; the export itself is left as it was
    before = out.joinpath("model.ckpt").read_bytes()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toy_model.py"), "--out",
                             str(tmp_path / "export3"), "--start_from", str(out / "model.ckpt"), "--from_stage", "6",
                             "--decoder_steps", "1", "--decoder_seeds", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.joinpath("model.ckpt").read_bytes() == before
    changed, _ = read_checkpoint(tmp_path / "export3" / "model.ckpt")
    assert sorted(changed) == sorted(exported)
    differ = {k.split(".")[1] for k in exported if not torch.equal(changed[k], exported[k])}
    assert "decoder" in differ and differ <= {"decoder", "post_quant_conv"}, differ  # the encoder, UNet stay


# -------------------------------------------------------------------------------------------------- LDM pieces
def test_caption_dropout_for_classifier_free_guidance():
    config = OmegaConf.merge(OmegaConf.load(LDM_CONFIG), TINY_LDM).model
    model = instantiate_from_config(config)
    batch = {"txt": list(CAPTIONS), "image": torch.zeros(24, 64, 64, 3)}
    torch.manual_seed(0)
    dropped = model.drop_conditioning(batch)
    assert batch["txt"] == list(CAPTIONS), "the input batch must not be modified"
    n_empty = sum(t == "" for t in dropped["txt"])
    assert all(t in ("", c) for t, c in zip(dropped["txt"], CAPTIONS))
    model.ucg_training = {"txt": {"p": 1.0, "val": ""}}
    assert model.drop_conditioning(batch)["txt"] == [""] * 24
    model.ucg_training = {"txt": {"p": 0.0}}
    assert model.drop_conditioning(batch)["txt"] == list(CAPTIONS)
    # p = 0.1 over many captions drops about 10 %
    model.ucg_training = {"txt": {"p": 0.1}}
    torch.manual_seed(1)
    many = model.drop_conditioning({"txt": ["x"] * 5000})["txt"]
    assert 0.08 < many.count("") / 5000 < 0.12
    assert n_empty < 24


class TinyTextEncoder(nn.Module):
    """A trainable text encoder for tests: bytes of the prompt -> embeddings (B, 8, dim)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(256, dim)

    def forward(self, text: list[str]) -> torch.Tensor:
        ids = torch.tensor([list(t.encode()[:8].ljust(8, b"\0")) for t in text], device=self.embedding.weight.device)
        return self.embedding(ids)

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)


def test_cond_stage_trainable_trains_the_text_encoder(tmp_path):
    config = OmegaConf.merge(OmegaConf.load(LDM_CONFIG), TINY_LDM, {
        "model": {"params": {"cond_stage_trainable": True, "use_ema": False, "scale_by_std": False,
                             "monitor": "val/loss_simple"}},
        "lightning": {"trainer": {"max_steps": 2}, "callbacks": {"image_logger": {"params": {"disabled": True}}}}})
    config.model.params.cond_stage_config = {"target": "tests.test_training.TinyTextEncoder", "params": {"dim": 32}}
    OmegaConf.save(config, tmp_path / "trainable.yaml")
    main_module.main(["--base", str(tmp_path / "trainable.yaml"), "-t", "--no-test", "--logdir", str(tmp_path / "logs"),
                      "--seed", "5"])
    run = run_dir(tmp_path / "logs")
    sd, _ = read_checkpoint(run / "checkpoints" / "last.ckpt")
    pl.seed_everything(5)
    initial = instantiate_from_config(merged_model_config(run).model).state_dict()
    key = "cond_stage_model.embedding.weight"
    assert not torch.equal(sd[key], initial[key]), "the trainable cond stage did not change"
    assert not any(k.startswith("model_ema.") for k in sd)


# -------------------------------------------------------------------------------------------------- autoencoder
def test_autoencoder_trains_with_main_and_reloads(tmp_path):
    tiny = write_config(tmp_path / "tiny.yaml", TINY_AE)
    main_module.main(["--base", str(AE_CONFIG), tiny, "-t", "--no-test", "--logdir", str(tmp_path / "logs")])
    run = run_dir(tmp_path / "logs")
    sd, extras = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert extras["global_step"] == 2
    assert "loss.logvar" in sd and "encoder.conv_in.weight" in sd
    model = load_model_from_config(merged_model_config(run), run / "checkpoints" / "last.ckpt")
    assert set(model.state_dict()) == set(sd)
    assert (run / "images" / "train").is_dir()
    # the LDM loads it as its first stage (the loss weights are skipped)
    from ldm.models.autoencoder import AutoencoderKL

    ae_config = OmegaConf.load(LDM_CONFIG).model.params.first_stage_config
    ae_config.params.ddconfig.ch_mult = [1, 1, 1, 1]
    ae_config.params.ckpt_path = str(run / "checkpoints" / "last.ckpt")
    first_stage = instantiate_from_config(ae_config)
    assert isinstance(first_stage, AutoencoderKL)
    assert torch.equal(first_stage.encoder.conv_in.weight, sd["encoder.conv_in.weight"])


def _tiny_autoencoder(lossconfig: dict):
    config = OmegaConf.load(AE_CONFIG).model
    config.params.ddconfig.ch_mult = [1, 1, 1, 1]
    config.params.lossconfig = lossconfig
    model = instantiate_from_config(config)
    model.learning_rate = 1e-3
    return model


def test_lpips_without_local_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded.*perceptual_weight: 0"):
        _tiny_autoencoder({"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                           "params": {"disc_start": 0, "lpips_weights_dir": str(tmp_path / "nope")}})


def test_autoencoder_with_discriminator_uses_manual_optimization(tmp_path):
    model = _tiny_autoencoder({"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                               "params": {"disc_start": 0, "perceptual_weight": 0.0, "kl_weight": 1e-6,
                                          "disc_num_layers": 2}})
    assert not model.automatic_optimization
    disc_before = [p.detach().clone() for p in model.loss.discriminator.parameters()]
    enc_before = model.encoder.conv_in.weight.detach().clone()
    data = torch.utils.data.DataLoader(ToyShapes(4), batch_size=2)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=data)
    assert trainer.global_step == 4  # Lightning 2 counts both optimizers' steps: 2 batches
    assert not torch.equal(model.encoder.conv_in.weight, enc_before)
    assert any(not torch.equal(p, q) for p, q in zip(model.loss.discriminator.parameters(), disc_before))


def test_reconstruction_kl_loss_terms():
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
    from ldm.modules.losses import ReconstructionKLLoss

    loss_fn = ReconstructionKLLoss(kl_weight=0.5, l2_weight=2.0)
    x = torch.zeros(2, 3, 4, 4)
    xrec = torch.full_like(x, 0.5)
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 2, 2))  # mean 0, logvar 0: KL = 0
    loss, log = loss_fn(x, xrec, posterior, split="val")
    per_image = 3 * 4 * 4 * (0.5 + 2.0 * 0.25)
    assert loss.item() == pytest.approx(per_image)
    assert log["val/kl_loss"].item() == pytest.approx(0.0)
    posterior = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)], 1))
    loss, log = loss_fn(x, xrec, posterior)
    assert log["train/kl_loss"].item() == pytest.approx(0.5 * 16)  # 0.5 * mean^2 summed over 16 latents
    assert loss.item() == pytest.approx(per_image + 0.5 * 8)


# -------------------------------------------------------------------------------------------------- schedulers
def test_lambda_linear_scheduler_values():
    s = LambdaLinearScheduler(warm_up_steps=[10], f_min=[0.1], f_max=[1.0], f_start=[0.01], cycle_lengths=[110])
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.01 + 0.99 * 5 / 10)
    assert s(10) == pytest.approx(0.1 + 0.9 * 100 / 110)
    assert s(110) == pytest.approx(0.1)
    assert isinstance(s(3), float)
    # SD v1: 10k warm-up then constant
    sd = LambdaLinearScheduler(warm_up_steps=[10000], f_min=[1.0], f_max=[1.0], f_start=[1e-6],
                               cycle_lengths=[10000000000000])
    assert sd(5000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert sd(20000) == pytest.approx(1.0)


def test_cosine_schedulers_values():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s(500) == pytest.approx(0.1)
    s2 = LambdaWarmUpCosineScheduler2(warm_up_steps=[0, 10], f_min=[0.0, 0.5], f_max=[1.0, 1.0],
                                      f_start=[1.0, 0.0], cycle_lengths=[100, 50])
    assert s2(50) == pytest.approx(0.5)  # half-way down the first cosine
    assert s2(105) == pytest.approx(0.5)  # half-way up the second cycle's warm-up (5 of 10 steps)
    assert s2(150) == pytest.approx(0.5)


def test_scheduler_drives_the_optimizer_learning_rate(ldm_run):
    metrics = (ldm_run / "csvlogs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    col = header.index("lr-AdamW")
    lrs = [float(row.split(",")[col]) for row in metrics[1:] if row.split(",")[col]]
    base = OmegaConf.load(LDM_CONFIG).model.base_learning_rate * 4
    # warm-up over 2 steps from f_start, then linear decay over the 10-step cycle
    f_start = OmegaConf.load(LDM_CONFIG).model.params.scheduler_config.params.f_start[0]
    assert lrs[0] == pytest.approx(base * f_start)
    assert lrs[1] == pytest.approx(base * (f_start + (1 - f_start) / 2))


# -------------------------------------------------------------------------------------------------- data
PALETTE = {(220, 20, 20): "red", (20, 180, 20): "green", (20, 20, 220): "blue", (230, 210, 20): "yellow"}
BACKGROUND = {(245, 245, 245): "white", (15, 15, 15): "black"}


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round((image + 1.0) * 127.5).astype(np.uint8)


@pytest.mark.parametrize("index", range(0, 480, 7))
def test_toy_shapes_follow_the_spec(index):
    item = ToyShapesTrain()[index]
    image = item["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    pixels = to_uint8(image)
    colours = {tuple(int(v) for v in c) for c in pixels.reshape(-1, 3)}
    assert len(colours) == 2, "one solid shape on a plain background, no outline or anti-aliasing"
    corners = [tuple(int(v) for v in pixels[y, x]) for y, x in ((0, 0), (0, 63), (63, 0), (63, 63))]
    background = max(set(corners), key=corners.count)
    assert background in BACKGROUND
    (fill,) = colours - {background}
    assert fill in PALETTE
    mask = (pixels != np.array(background)).any(axis=-1)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    width = cols[-1] - cols[0] + 1
    height = rows[-1] - rows[0] + 1
    assert 24 <= width <= 44, f"width {width}"
    assert rows[0] >= 0 and rows[-1] <= 63 and cols[0] >= 0 and cols[-1] <= 63
    widths = mask[rows[0]:rows[-1] + 1].sum(axis=1)
    fill_ratio = mask.sum() / (width * height)
    shape = item["txt"].split()[2]
    if shape == "square":
        assert height == width and fill_ratio == 1.0
    elif shape == "circle":
        assert abs(height - width) <= 1 and abs(fill_ratio - math.pi / 4) < 0.05
        assert widths[len(widths) // 2] == width
    else:  # upright isosceles triangle: apex at the top centre, base at the bottom
        assert widths[-1] == widths.max() and widths[-1] >= width - 1
        assert widths[0] <= 3 and np.all(np.diff(widths) >= 0)
        top = np.nonzero(mask[rows[0]])[0]
        assert abs((top[0] + top[-1]) / 2 - (cols[0] + cols[-1]) / 2) <= 0.5
        assert abs(fill_ratio - 0.5) < 0.08
    expected = f"a {PALETTE[fill]} {shape} on a {BACKGROUND[background]} background"
    assert item["txt"] == item["caption"] == expected


def test_toy_shapes_are_deterministic_and_balanced():
    a, b = ToyShapes(48, seed=0), ToyShapes(48, seed=0)
    for i in (0, 5, 47):
        assert np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["txt"] == b[i]["txt"]
    assert not np.array_equal(ToyShapesTrain()[0]["image"], ToyShapesValidation()[0]["image"])
    assert [a[i]["txt"] for i in range(24)] == list(CAPTIONS)
    assert len(set(CAPTIONS)) == 24
    widths = {spec_for_index(i).width for i in range(2000)}
    assert min(widths) == 24 and max(widths) == 44
    with pytest.raises(IndexError):
        a[48]


def test_flatten_gives_back_the_drawing_a_decoder_spoiled():
    """flatten, stage 6's target: a rendered image comes back as it is; one with a dark stripe inside the shape, a
    soft edge and a tinted background comes back as the rendering, with the stripe counted as off-colour."""
    for index in range(24):
        rendered = to_uint8(ToyShapesTrain()[index]["image"])
        flat, off = flatten(rendered)
        assert np.array_equal(flat, rendered) and off == 0.0
    rendered = to_uint8(ToyShapesTrain()[5]["image"])  # a green square on a white background
    assert ToyShapesTrain()[5]["txt"] == "a green square on a white background"
    mask = (rendered != rendered[0, 0]).any(axis=-1)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    spoiled = rendered.astype(np.int32) + np.array([-8, 4, 9])  # tinted
    spoiled[rows[0]:rows[-1] + 1, cols[0]] = (130, 210, 130)  # a soft left edge
    stripe = (slice(rows[0] + 4, rows[-1] - 3), cols[-1] - 4)
    spoiled[stripe] = (200, 200, 200)  # a pale stripe inside, nearer the background than the shape's green
    spoiled = spoiled.clip(0, 255).astype(np.uint8)
    flat, off = flatten(spoiled)
    assert np.array_equal(flat, rendered)
    height = rows[-1] - rows[0] + 1
    assert off == pytest.approx((height - 8 + height) / mask.sum(), abs=0.5 / mask.sum())  # the stripe, the edge
    assert flatten(np.full((64, 64, 3), 245, dtype=np.uint8)) is None  # no shape
