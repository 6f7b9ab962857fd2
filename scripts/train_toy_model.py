"""Train the toy-shapes text-to-image model and export it as models/ldm/toy-shapes/.

    python scripts/train_toy_model.py                  # from scratch, run from the repository root
    python scripts/train_toy_model.py --start_from models/ldm/toy-shapes/model.ckpt   # stages 3-5 on an export

Five stages of ``main.py`` runs and a sixth in this process (see docs/training.md for the recipe and what each
stage brings):

1. ``autoencoder``: configs/toy-shapes/autoencoder.yaml, constant learning rate;
2. ``ldm``: configs/toy-shapes/ldm.yaml on the latents of 1 (ldm-cached-latents.yaml: encoded once);
3. ``autoencoder-ft``: 1 continued at a tenth of the learning rate (autoencoder-finetune.yaml);
4. ``ldm-ft<N>``: 2 continued on the latents of 3, cosine learning-rate decay (ldm-finetune.yaml), starting from
   the EMA weights of 2; ``--ldm_ft_rounds`` times, each round from the EMA weights of the one before;
5. ``ldm-const<N>``: 4 continued from its EMA weights at a constant learning rate of 4x 4's peak
   (ldm-constant.yaml), in bf16 autocast where the CPU computes bf16 (else float32); ``--ldm_const_rounds`` times,
   each round from the EMA weights of the one before, with the seed one higher;
6. ``decoder``: after the export, the decoder fine-tuned on what the LDM samples (:func:`finetune_decoder`),
   ``--decoder_steps`` steps (0: none).

``--start_from`` takes stages 1 and 2 from an exported model instead (its autoencoder, and its UNet with the EMA
baked in); ``--from_stage`` 4, 5 or 6 skips more (4: the export's autoencoder is taken as stage 3's; 6: only
the decoder stage, on a copy of the export). The last LDM
checkpoint is exported: EMA weights baked into the UNet, ``model_ema.*`` dropped, module
weights stored as float16, in the original ``{"state_dict": ...}`` layout, with the matching inference config
(``use_ema: False``, the measured ``scale_factor``, the autoencoder put back as the first stage). Extra
``key=value`` arguments after ``--ae``/``--ldm``/``--ae_ft``/``--ldm_ft``/``--ldm_const`` are passed to that
stage's main.py run. On a busy machine, ``OMP_NUM_THREADS=1`` is much faster than two threads that wait for each other.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = "configs/toy-shapes"
AE_CONFIG = f"{CONFIGS}/autoencoder.yaml"
AE_FINETUNE = f"{CONFIGS}/autoencoder-finetune.yaml"
LDM_CONFIG = f"{CONFIGS}/ldm.yaml"
LDM_LATENTS = f"{CONFIGS}/ldm-cached-latents.yaml"
LDM_FINETUNE = f"{CONFIGS}/ldm-finetune.yaml"
LDM_CONSTANT = f"{CONFIGS}/ldm-constant.yaml"
OUT_DIR = "models/ldm/toy-shapes"
FIRST_STAGE_CKPT = "model.params.first_stage_config.params.ckpt_path"
LDM_FT_ROUNDS = 1
LDM_CONST_ROUNDS = 2
DECODER_STEPS = 1000
DECODER_SEEDS = 10  # pool images per caption and sampler setting
DECODER_SETTINGS = [(sampler, steps, scale) for sampler, steps in (("ddim", 50), ("plms", 50), ("dpm_solver", 50),
                                                                  ("dpm_solver", 20)) for scale in (7.5, 5.0)]
POOL_FIRST_SEED = 5000  # evaluate_toy_model.py and the tests draw from 1000: the pool never overlaps them
MAX_OFF_COLOUR = 0.1  # pool images further off their flat drawing are the LDM's mistakes, not the decoder's


def train(configs: list[str], name: str, logdir: str, seed: int, overrides: list[str]) -> Path:
    """Run ``main.py --base configs -t`` and return its run folder."""
    before = set(glob.glob(os.path.join(logdir, f"*_{name}")))
    cmd = [sys.executable, "main.py", "--base", *configs, "-t", "--no-test", "--logdir", logdir, "--name", name,
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


def ldm_init_from_run(ldm_run: Path, out: Path) -> Path:
    """A checkpoint to continue the LDM of ``ldm_run`` from: its EMA weights as the UNet and as the EMA's start
    (update count 0), its text encoder and ``scale_factor``; no first stage (trained on cached latents)."""
    from ldm.loading.checkpoint import read_checkpoint

    state_dict, _ = read_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    unet = {k: v for k, v in bake_ema(state_dict).items() if not k.startswith("first_stage_model.")}
    return _save_ldm_init(unet, float(state_dict["scale_factor"]), out)


def _save_ldm_init(state_dict: dict, scale_factor: float, out: Path) -> Path:
    import torch

    sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    for key in [k for k in sd if k.startswith("model.")]:
        sd["model_ema." + key[len("model."):].replace(".", "")] = sd[key].clone()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int)
    sd["scale_factor"] = torch.tensor(scale_factor)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "global_step": 0}, out)
    return out


def split_export(model_ckpt: Path, logdir: str) -> tuple[Path, Path]:
    """An exported model (``model.ckpt`` and its ``config.yaml`` beside it) -> (autoencoder checkpoint, LDM init
    checkpoint) in ``logdir``: what stages 1 and 2 would have left."""
    import torch
    from omegaconf import OmegaConf

    from ldm.loading.checkpoint import read_checkpoint

    state_dict, _ = read_checkpoint(model_ckpt)
    scale_factor = float(OmegaConf.load(model_ckpt.parent / "config.yaml").model.params.scale_factor)
    folder = Path(logdir) / f"from-{model_ckpt.parent.name}"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "first_stage_model."
    autoencoder = {k[len(prefix):]: v.float() for k, v in state_dict.items() if k.startswith(prefix)}
    autoencoder["loss.logvar"] = torch.zeros(())  # the loss's (untrained) log-variance, not part of the export
    ae_ckpt = folder / "autoencoder.ckpt"
    torch.save({"state_dict": autoencoder, "global_step": 0}, ae_ckpt)
    ldm = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    return ae_ckpt, _save_ldm_init(ldm, scale_factor, folder / "ldm-init.ckpt")


def copy_export(model_ckpt: Path, out_dir: Path) -> None:
    """Copy an exported ``model.ckpt`` and the ``config.yaml`` beside it into ``out_dir`` (unless already there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for source, name in ((model_ckpt, "model.ckpt"), (model_ckpt.parent / "config.yaml", "config.yaml")):
        target = out_dir / name
        if not (target.exists() and target.samefile(source)):
            tmp = target.with_name(name + ".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


def export(ldm_run: Path, out_dir: Path) -> None:
    """Write ``model.ckpt`` (EMA baked in, fp16 weights) and ``config.yaml`` for inference into ``out_dir``."""
    import torch
    from omegaconf import OmegaConf

    from ldm.loading.build import load_model_from_config
    from ldm.loading.checkpoint import read_checkpoint

    state_dict, extras = read_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    state_dict = bake_ema(state_dict)
    scale_factor = float(state_dict.pop("scale_factor"))
    project = OmegaConf.load(sorted((ldm_run / "configs").glob("*-project.yaml"))[-1])
    model = project.model
    params = model.params
    first_stage = params.first_stage_config
    if first_stage.target == "ldm.models.autoencoder.IdentityFirstStage":  # trained on cached latents
        first_stage.target = "ldm.models.autoencoder.AutoencoderKL"
        autoencoder, _ = read_checkpoint(first_stage.params.ckpt_path)
        state_dict.update({f"first_stage_model.{k}": v for k, v in autoencoder.items() if not k.startswith("loss.")})
    half = {k: v.detach().clone().half() if v.is_floating_point() and "." in k else v.detach().clone()
            for k, v in state_dict.items()}  # schedule buffers (no dot in the key) stay float32

    params.use_ema = False
    params.scale_by_std = False
    params.scale_factor = scale_factor
    first_stage.params.pop("ckpt_path", None)
    for training_only in ("ucg_training", "scheduler_config", "ckpt_path", "ignore_keys"):
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


def sample_pool(model, seeds: int):
    """Latents (N, C, h, w) the LDM samples for every caption: ``seeds`` noises (from POOL_FIRST_SEED) per caption
    and setting of DECODER_SETTINGS, unscaled (what the first stage decodes)."""
    import torch

    from ldm.data.toy_shapes import CAPTIONS
    from ldm.inference.pipeline import make_sampler

    prompts = [caption for _ in range(seeds) for caption in CAPTIONS]
    shape = [model.channels, model.image_size, model.image_size]
    generator = torch.Generator().manual_seed(POOL_FIRST_SEED)
    pool = []
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning([""] * len(prompts))
        for sampler, steps, scale in DECODER_SETTINGS:
            x_T = torch.randn(len(prompts), *shape, generator=generator)
            z, _ = make_sampler(sampler, model).sample(
                S=steps, conditioning=c, batch_size=len(prompts), shape=shape, verbose=False,
                unconditional_guidance_scale=scale, unconditional_conditioning=uc, eta=0.0, x_T=x_T)
            pool.append(z / model.scale_factor)
    return torch.cat(pool)


def finetune_decoder(out_dir: Path, steps: int, seeds: int, seed: int, batch_size: int = 16) -> None:
    """Stage 6: fine-tune the exported model's decoder (the encoder, the UNet and the latent space stay) on two
    halves of each batch: training images from their posterior samples, and latents the LDM samples from their
    flat drawings (:func:`ldm.data.toy_shapes.flatten`), which the decoder otherwise paints with faint rings and
    stripes. Writes the decoder back into ``out_dir/model.ckpt`` (float16)."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from ldm.data.toy_shapes import ToyShapesTrain, flatten
    from ldm.loading.build import load_model_from_config
    from ldm.loading.checkpoint import read_checkpoint

    start = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ckpt_path, config = out_dir / "model.ckpt", OmegaConf.load(out_dir / "config.yaml")
    model = load_model_from_config(config, ckpt_path).float()
    autoencoder = model.first_stage_model
    latents = sample_pool(model, seeds)
    with torch.no_grad():
        drawn = ((autoencoder.decode(latents) + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    kept, flats = [], []
    for i, image in enumerate(drawn.permute(0, 2, 3, 1).numpy()):
        projected = flatten(image)
        if projected is not None and projected[1] <= MAX_OFF_COLOUR:
            kept.append(i)
            flats.append(projected[0])
    print(f"decoder: {len(kept)} of {len(latents)} sampled latents kept as pairs "
          f"({time.time() - start:.0f} s)", flush=True)
    if not kept:  # an untrained LDM: the training images alone
        print("decoder: the LDM drew no shape; fine-tuning on training images only", flush=True)
    pool = latents[kept]
    flats = torch.from_numpy(np.array(flats, dtype=np.uint8).reshape(len(kept), *drawn.shape[2:], 3))
    flats = flats.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    trained = [*autoencoder.decoder.parameters(), *autoencoder.post_quant_conv.parameters()]
    for param in autoencoder.parameters():
        param.requires_grad_(False)
    for param in trained:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=1e-4)
    images = ToyShapesTrain()
    for step in range(1, steps + 1):
        x = torch.from_numpy(np.stack([images[int(i)]["image"] for i in rng.integers(0, len(images), batch_size)]))
        x = x.permute(0, 3, 1, 2)
        picked = torch.from_numpy(rng.integers(0, len(pool), batch_size if len(pool) else 0))
        with torch.no_grad():
            z = autoencoder.encode(x).sample()
        diff = torch.cat([x, flats[picked]]) - autoencoder.decode(torch.cat([z, pool[picked]]))
        loss = (diff.abs() + diff ** 2).mean()  # ReconstructionKLLoss's terms, no KL: the encoder is frozen
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            print(f"decoder: step {step} loss {loss.item():.4f}", flush=True)
    state_dict, extras = read_checkpoint(ckpt_path)
    for name, value in autoencoder.state_dict().items():
        key = f"first_stage_model.{name}"
        if name.startswith(("decoder.", "post_quant_conv.")):
            state_dict[key] = value.detach().clone().to(state_dict[key].dtype)
    tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
    torch.save({"state_dict": state_dict, **extras}, tmp)
    os.replace(tmp, ckpt_path)
    load_model_from_config(config, ckpt_path)  # strict
    print(f"decoder: {steps} steps, written into {ckpt_path} ({time.time() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="logs", help="where main.py writes its run folders")
    parser.add_argument("--out", default=OUT_DIR, help="export folder for model.ckpt and config.yaml")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--start_from", metavar="MODEL_CKPT",
                        help="skip stages 1-2: take the autoencoder and the LDM of this exported model.ckpt")
    for stage in ("ae", "ldm", "ae_ft", "ldm_ft", "ldm_const"):
        parser.add_argument(f"--{stage}", nargs="*", default=[], metavar="KEY=VALUE",
                            help=f"overrides for the {stage.replace('_', '-')} run")
    parser.add_argument("--ldm_ft_rounds", type=int, default=LDM_FT_ROUNDS,
                        help="how many times stage 4 runs, each from the EMA weights of the one before")
    parser.add_argument("--ldm_const_rounds", type=int, default=LDM_CONST_ROUNDS,
                        help="how many times stage 5 runs, each from the EMA weights of the one before")
    parser.add_argument("--decoder_steps", type=int, default=DECODER_STEPS,
                        help="stage 6's steps (0 skips it)")
    parser.add_argument("--decoder_seeds", type=int, default=DECODER_SEEDS,
                        help="stage 6's sampled latents per caption and sampler setting")
    parser.add_argument("--from_stage", type=int, choices=(3, 4, 5, 6), default=3,
                        help="with --start_from: the first stage to run on the export")
    parser.add_argument("--autoencoder_run", help="skip stage 1: use this autoencoder run folder")
    parser.add_argument("--export_only", metavar="LDM_RUN", help="only export this LDM run folder")
    opt = parser.parse_args(argv)
    from_stage = opt.from_stage if opt.start_from else 3
    ft_rounds = opt.ldm_ft_rounds if from_stage <= 4 else 0
    if opt.start_from and from_stage < 6 and ft_rounds < 1 and opt.ldm_const_rounds < 1:
        parser.error("no LDM stage left to run: give --ldm_ft_rounds or --ldm_const_rounds of 1 or more")
    if from_stage == 6 and opt.decoder_steps < 1:
        parser.error("--from_stage 6 runs only the decoder stage: give --decoder_steps of 1 or more")
    from ldm.backend.onednn import computes_bf16_natively

    os.chdir(ROOT)
    start = time.time()
    if opt.export_only:
        export(Path(opt.export_only), Path(opt.out))
        return
    if from_stage == 6:
        copy_export(Path(opt.start_from).resolve(), Path(opt.out))
        finetune_decoder(Path(opt.out), opt.decoder_steps, opt.decoder_seeds, opt.seed)
        print(f"total {time.time() - start:.0f} s")
        return
    if opt.start_from:
        ae_ckpt, ldm_init = split_export(Path(opt.start_from).resolve(), opt.logdir)
    else:
        ae_run = Path(opt.autoencoder_run) if opt.autoencoder_run else \
            train([AE_CONFIG], "toy-shapes-autoencoder", opt.logdir, opt.seed, opt.ae)
        ae_ckpt = ae_run / "checkpoints" / "last.ckpt"
        ldm_run = train([LDM_CONFIG, LDM_LATENTS], "toy-shapes-ldm", opt.logdir, opt.seed,
                        [f"{FIRST_STAGE_CKPT}={ae_ckpt}", *opt.ldm])
        ldm_init = ldm_init_from_run(ldm_run, ldm_run / "checkpoints" / "ldm-init.ckpt")
    if from_stage <= 3:
        ae_ckpt = train([AE_CONFIG, AE_FINETUNE], "toy-shapes-autoencoder-ft", opt.logdir, opt.seed,
                        [f"model.params.ckpt_path={ae_ckpt}", *opt.ae_ft]) / "checkpoints" / "last.ckpt"
    first_stage = f"{FIRST_STAGE_CKPT}={ae_ckpt}"
    for round_ in range(1, ft_rounds + 1):  # each round restarts from the EMA weights of the one before
        ldm_run = train([LDM_CONFIG, LDM_LATENTS, LDM_FINETUNE], f"toy-shapes-ldm-ft{round_}", opt.logdir,
                        opt.seed, [first_stage, f"model.params.ckpt_path={ldm_init}", *opt.ldm_ft])
        ldm_init = ldm_init_from_run(ldm_run, ldm_run / "checkpoints" / "ldm-init.ckpt")
    precision = [] if computes_bf16_natively() else ["lightning.trainer.precision=32-true"]
    for round_ in range(1, opt.ldm_const_rounds + 1):
        ldm_run = train([LDM_CONFIG, LDM_LATENTS, LDM_FINETUNE, LDM_CONSTANT], f"toy-shapes-ldm-const{round_}",
                        opt.logdir, opt.seed + round_ - 1,
                        [first_stage, f"model.params.ckpt_path={ldm_init}", *precision, *opt.ldm_const])
        ldm_init = ldm_init_from_run(ldm_run, ldm_run / "checkpoints" / "ldm-init.ckpt")
    export(ldm_run, Path(opt.out))
    if opt.decoder_steps > 0:
        finetune_decoder(Path(opt.out), opt.decoder_steps, opt.decoder_seeds, opt.seed)
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
