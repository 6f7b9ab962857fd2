"""The GPU half of the check a CUDA machine runs (``scripts/gpu_check.sh``): speed of this implementation against
diffusers and diffusers + ``torch.compile`` on the same full-size SD v1 weights, written under ``docs/``.

    python scripts/gpu_check.py                         # cuda, 512x512, 50 steps, batch 1 and 4
    python scripts/gpu_check.py --device cpu --model tiny --size 64 --steps 2 --no-compile   # smoke test

Measured, each at batch 1 and 4 (images per prompt), in this process, after a warm-up:

* one UNet step with classifier-free guidance (UNet batch 2 x B, 64x64 latent): ours (fp16 weights, as
  ``--precision fp16`` runs), ours under ``--precision autocast`` (fp32 weights, fp16 compute, as the original),
  diffusers' ``UNet2DConditionModel`` in fp16, and the same compiled with ``torch.compile``;
* txt2img end to end (text encoder, ``--steps`` DDIM steps, VAE decode): ours (``Pipeline.generate``, batched)
  and diffusers' ``StableDiffusionPipeline`` (DDIM, same guidance), plain and with its UNet compiled.

The weights are deterministic (``ldm.testing.deterministic_weights``), never downloaded; the diffusers folder
is made by this project's converter (``scripts/convert_ckpt.py --to diffusers``). Figures go to
``docs/gpu-check.md`` (and ``.json``) with the GPU's name; the targets of issue 17 are printed as met or not,
never asserted.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"full": ROOT / "configs/stable-diffusion/v1-inference.yaml",
           "tiny": ROOT / "tests/fixtures/tiny/v1-tiny.yaml"}
PROMPT = "a photograph of an astronaut riding a horse"


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_config(args):
    from omegaconf import OmegaConf

    config = OmegaConf.load(CONFIGS[args.model])
    if args.model == "tiny":
        config.model.params.cond_stage_config.params.version = str(ROOT / "tests/fixtures/tiny/clip")
    return config


def assets(args) -> tuple[Path, Path, Path]:
    """(config file, original-layout checkpoint, diffusers folder), written to ``--workdir`` where missing."""
    from omegaconf import OmegaConf

    from ldm.testing.deterministic_weights import write_deterministic_checkpoint

    work = args.workdir / args.model
    work.mkdir(parents=True, exist_ok=True)
    config_path, ckpt, folder = work / "config.yaml", work / "model.ckpt", work / "diffusers"
    OmegaConf.save(model_config(args), config_path)
    if not ckpt.exists():
        print(f"writing {ckpt} (deterministic weights)", flush=True)
        write_deterministic_checkpoint(model_config(args), ckpt)
    if not (folder / "model_index.json").exists():
        print(f"converting to {folder}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts/convert_ckpt.py"), str(ckpt), str(folder), "--to",
                        "diffusers", "--config", str(config_path), "--safety_checker", "off"], check=True)
    return config_path, ckpt, folder


def unet_steps(args, config_path, ckpt, folder) -> dict:
    """Seconds per CFG UNet step for each implementation and batch."""
    import torch
    from diffusers import UNet2DConditionModel

    from ldm.inference.pipeline import load_pipeline

    device, latent = torch.device(args.device), args.size // 8
    half = torch.float16 if device.type == "cuda" else torch.float32
    results: dict[str, dict[int, float]] = {}
    theirs = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=half).to(device).eval()
    compiled = torch.compile(theirs) if args.compile else None
    for precision in ("fp16", "autocast") if device.type == "cuda" else ("full",):
        pipe = load_pipeline(config_path, ckpt, device=args.device, precision=precision, say=lambda m: None)
        pipe.use(pipe.model.model)
        for batch in args.batches:
            x = torch.randn(2 * batch, 4, latent, latent, device=device).to(pipe.precision.weight_dtype)
            t = torch.full((2 * batch,), 500, device=device, dtype=torch.long)
            with torch.no_grad(), pipe.precision.context(device):
                c = pipe.model.get_learned_conditioning(batch * [PROMPT, ""])
                step = functools.partial(pipe.model.apply_model, x, t, c)
                results.setdefault(f"ours ({precision})", {})[batch] = timed(step, device, args.repeats)
        pipe = None  # free its GPU memory before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, unet in (("diffusers", theirs), ("diffusers + torch.compile", compiled)):
        if unet is None:
            continue
        for batch in args.batches:
            x = torch.randn(2 * batch, 4, latent, latent, device=device, dtype=half)
            t = torch.full((2 * batch,), 500, device=device, dtype=torch.long)
            context = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, device=device, dtype=half)
            with torch.no_grad():
                results.setdefault(name, {})[batch] = timed(functools.partial(unet, x, t, context), device,
                                                            args.repeats)
    return results


def txt2img(args, config_path, ckpt, folder) -> dict:
    """Seconds per batch of B images, text to decoded pixels, for each implementation."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.inference.pipeline import Settings, load_pipeline

    device = torch.device(args.device)
    results: dict[str, dict[int, float]] = {}
    precision = "fp16" if device.type == "cuda" else "full"
    pipe = load_pipeline(config_path, ckpt, device=args.device, precision=precision, say=lambda m: None)
    settings = Settings(steps=args.steps, height=args.size, width=args.size)
    for batch in args.batches:
        generate = functools.partial(pipe.generate, batch * [PROMPT], list(range(batch)), settings, per_image=False)
        results.setdefault(f"ours ({precision})", {})[batch] = timed(generate, device, 1)
    pipe = generate = None  # free its GPU memory for diffusers
    half = torch.float16 if device.type == "cuda" else torch.float32
    theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=half, safety_checker=None,
                                                     requires_safety_checker=False).to(device)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    for name in ("diffusers", "diffusers + torch.compile"):
        if name.endswith("compile"):
            if not args.compile:
                continue
            theirs.unet = torch.compile(theirs.unet)
        for batch in args.batches:
            generator = [torch.Generator(device).manual_seed(i) for i in range(batch)]
            run = functools.partial(theirs, batch * [PROMPT], height=args.size, width=args.size,
                                    num_inference_steps=args.steps, guidance_scale=7.5, generator=generator,
                                    output_type="np")
            results.setdefault(name, {})[batch] = timed(run, device, 1)
    return results


def environment(args) -> dict:
    import diffusers
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": args.device, "gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cpu": platform.processor() or platform.machine(), "model": args.model, "size": args.size,
            "steps": args.steps, "batches": args.batches}


def report(env: dict, unet: dict, e2e: dict, out: Path) -> str:
    lines = [f"# GPU check: {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}; {env['model']} SD v1 weights (deterministic), "
             f"{env['size']}x{env['size']}, DDIM {env['steps']} steps, guidance 7.5. Medians after a warm-up.", "",
             "| one CFG UNet step | " + " | ".join(f"batch {b}" for b in env["batches"]) + " |",
             "|---|" + "---:|" * len(env["batches"])]
    lines += [f"| {name} | " + " | ".join(f"{1 / v[b]:.2f} it/s" for b in env["batches"]) + " |"
              for name, v in unet.items()]
    lines += ["", "| txt2img, text to pixels | " + " | ".join(f"batch {b}" for b in env["batches"]) + " |",
              "|---|" + "---:|" * len(env["batches"])]
    lines += [f"| {name} | " + " | ".join(f"{b / v[b]:.3f} images/s ({v[b]:.2f} s)" for b in env["batches"]) + " |"
              for name, v in e2e.items()]
    ours_unet = unet.get("ours (fp16)") or next(iter(unet.values()))
    peer = unet.get("diffusers + torch.compile") or unet.get("diffusers")
    lines += ["", "Targets (issue 17):"]
    if 1 in env["batches"] and peer:
        met = 1 / ours_unet[1] >= 1 / peer[1]
        lines.append(f"- it/s at batch 1 >= diffusers + torch.compile: {'met' if met else 'NOT met'} "
                     f"({1 / ours_unet[1]:.2f} vs {1 / peer[1]:.2f})")
    ours_e2e = next((v for k, v in e2e.items() if k.startswith("ours")), None)
    if ours_e2e and 1 in ours_e2e and 4 in ours_e2e:
        gain = (4 / ours_e2e[4]) / (1 / ours_e2e[1])
        lines.append(f"- images/s at batch 4 >= 1.5x batch 1: {'met' if gain >= 1.5 else 'NOT met'} ({gain:.2f}x)")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "unet_s": unet, "txt2img_s": e2e}, indent=1))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 4])
    parser.add_argument("--repeats", type=int, default=10, help="timed UNet steps per implementation and batch")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ldm-gpu-check")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/gpu-check.md")
    args = parser.parse_args()
    config_path, ckpt, folder = assets(args)
    env = environment(args)
    unet = unet_steps(args, config_path, ckpt, folder)
    e2e = txt2img(args, config_path, ckpt, folder)
    print(report(env, unet, e2e, args.out))


if __name__ == "__main__":
    main()
