"""Train the toy-shapes text-to-image model from scratch and export it as models/ldm/toy-shapes/.

    python scripts/train_toy_model.py            # run from the repository root

Runs ``main.py`` twice (the autoencoder of configs/toy-shapes/autoencoder.yaml, then the latent diffusion model
of configs/toy-shapes/ldm.yaml on top of it), then exports the last LDM checkpoint: EMA weights baked into the
UNet, ``model_ema.*`` dropped, module weights stored as float16, in the original ``{"state_dict": ...}`` layout,
with the matching inference config (``use_ema: False``, the measured ``scale_factor``). Extra ``key=value``
arguments after ``--ae``/``--ldm`` are passed to that main.py run.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AE_CONFIG = "configs/toy-shapes/autoencoder.yaml"
LDM_CONFIG = "configs/toy-shapes/ldm.yaml"
OUT_DIR = "models/ldm/toy-shapes"


def train(config: str, name: str, logdir: str, seed: int, overrides: list[str]) -> Path:
    """Run ``main.py --base config -t`` and return its run folder."""
    before = set(glob.glob(os.path.join(logdir, f"*_{name}")))
    cmd = [sys.executable, "main.py", "--base", config, "-t", "--no-test", "--logdir", logdir, "--name", name,
           "--seed", str(seed), *overrides]
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"{name}: {time.time() - start:.0f} s", flush=True)
    runs = sorted(set(glob.glob(os.path.join(logdir, f"*_{name}"))) - before)
    if not runs:
        raise SystemExit(f"train_toy_model.py: main.py wrote no run folder {logdir}/*_{name}")
    return Path(runs[-1])


def bake_ema(state_dict: dict) -> dict:
    """Copy the EMA weights (``model_ema.<name without dots>``) over the UNet's and drop ``model_ema.*``."""
    ema = {k[len("model_ema."):]: v for k, v in state_dict.items() if k.startswith("model_ema.")}
    if not ema:
        raise SystemExit("train_toy_model.py: the LDM checkpoint has no model_ema.* weights (use_ema was off)")
    out = {}
    for key, value in state_dict.items():
        if key.startswith("model_ema."):
            continue
        if key.startswith("model."):
            value = ema[key[len("model."):].replace(".", "")]
        out[key] = value
    return out


def export(ldm_run: Path, out_dir: Path) -> None:
    """Write ``model.ckpt`` (EMA baked in, fp16 weights) and ``config.yaml`` for inference into ``out_dir``."""
    import torch
    from omegaconf import OmegaConf

    from ldm.loading.build import load_model_from_config
    from ldm.loading.checkpoint import read_checkpoint

    state_dict, extras = read_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    state_dict = bake_ema(state_dict)
    scale_factor = float(state_dict.pop("scale_factor"))
    half = {k: v.detach().clone().half() if v.is_floating_point() and "." in k else v.detach().clone()
            for k, v in state_dict.items()}  # schedule buffers (no dot in the key) stay float32

    project = OmegaConf.load(sorted((ldm_run / "configs").glob("*-project.yaml"))[-1])
    model = project.model
    params = model.params
    params.use_ema = False
    params.scale_by_std = False
    params.scale_factor = scale_factor
    params.first_stage_config.params.pop("ckpt_path", None)
    for training_only in ("ucg_training", "scheduler_config"):
        params.pop(training_only, None)
    config = OmegaConf.create({"model": model})

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, config_path = out_dir / "model.ckpt", out_dir / "config.yaml"
    torch.save({"state_dict": half, "global_step": int(extras.get("global_step", 0))}, ckpt_path)
    header = ("# Inference config of the toy-shapes model (made by scripts/train_toy_model.py).\n"
              "# The CLIP text config folder below is relative to the project root.\n")
    config_path.write_text(header + OmegaConf.to_yaml(config))
    load_model_from_config(config, ckpt_path)  # strict: fails loudly if the export does not fit its config
    print(f"exported {ckpt_path} ({ckpt_path.stat().st_size / 2 ** 20:.1f} MiB, "
          f"step {extras.get('global_step')}, scale_factor {scale_factor:.4f}) and {config_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="logs", help="where main.py writes its run folders")
    parser.add_argument("--out", default=OUT_DIR, help="export folder for model.ckpt and config.yaml")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--ae", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the autoencoder run")
    parser.add_argument("--ldm", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the LDM run")
    parser.add_argument("--autoencoder_run", help="skip the autoencoder training: use this run folder")
    parser.add_argument("--export_only", metavar="LDM_RUN", help="only export this LDM run folder")
    opt = parser.parse_args(argv)
    os.chdir(ROOT)
    start = time.time()
    if opt.export_only:
        export(Path(opt.export_only), Path(opt.out))
        return
    ae_run = Path(opt.autoencoder_run) if opt.autoencoder_run else \
        train(AE_CONFIG, "toy-shapes-autoencoder", opt.logdir, opt.seed, opt.ae)
    ae_ckpt = ae_run / "checkpoints" / "last.ckpt"
    ldm_run = train(LDM_CONFIG, "toy-shapes-ldm", opt.logdir, opt.seed,
                    [f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}", *opt.ldm])
    export(ldm_run, Path(opt.out))
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
