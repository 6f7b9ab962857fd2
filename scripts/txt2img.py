"""Text-to-image sampling with Stable Diffusion v1: the original script's flags, plus the new ones in ldm/app/cli.py.

The work is done by :func:`ldm.app.run.run`; this file only parses flags.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ldm.app import cli  # noqa: E402

LAION_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
LAION_CKPT = "models/ldm/text2img-large/model.ckpt"
LAION_OUTDIR = "outputs/txt2img-samples-laion400m"


def build_parser() -> cli.ArgumentParser:
    """The original txt2img flags (names, defaults, help) and the added ones."""
    parser = cli.ArgumentParser(prog="txt2img.py")
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render")
    parser.add_argument("--outdir", type=str, nargs="?", help="dir to write results to",
                        default="outputs/txt2img-samples")
    parser.add_argument("--skip_grid", action="store_true",
                        help="do not save a grid, only individual samples. Helpful when evaluating lots of samples")
    parser.add_argument("--skip_save", action="store_true",
                        help="do not save individual samples. For speed measurements.")
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of ddim sampling steps")
    parser.add_argument("--plms", action="store_true", help="use plms sampling")
    parser.add_argument("--dpm_solver", action="store_true", help="use dpm_solver sampling")
    parser.add_argument("--laion400m", action="store_true", help="uses the LAION400M model")
    parser.add_argument("--fixed_code", action="store_true",
                        help="if enabled, uses the same starting code across samples ")
    parser.add_argument("--ddim_eta", type=float, default=0.0,
                        help="ddim eta (eta=0.0 corresponds to deterministic sampling")
    parser.add_argument("--n_iter", type=int, default=2, help="sample this often")
    parser.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    parser.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    parser.add_argument("--C", type=int, default=4, help="latent channels")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor")
    parser.add_argument("--n_samples", type=int, default=3,
                        help="how many samples to produce for each given prompt. A.k.a. batch size")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=7.5,
                        help="unconditional guidance scale: "
                             "eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    parser.add_argument("--from-file", type=str, help="if specified, load prompts from this file")
    parser.add_argument("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml",
                        help="path to config which constructs model")
    parser.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                        help="path to checkpoint of model")
    parser.add_argument("--seed", type=int, default=42,
                        help="the seed (for reproducible sampling); image i of a run uses seed + i")
    cli.add_precision_flag(parser)
    cli.add_new_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    opt = parser.parse_args(argv)
    from ldm.app.run import RunOptions, prompts_from, run  # imports torch: after the flags are checked

    if opt.laion400m:
        print("Falling back to LAION 400M model...")
        cli.use_laion400m(opt, parser, config=LAION_CONFIG, ckpt=LAION_CKPT, outdir=LAION_OUTDIR)
    if opt.from_file:
        print(f"reading prompts from {opt.from_file}")
    run(RunOptions(
        prompts=prompts_from(opt.prompt, opt.from_file, opt.n_samples), outdir=opt.outdir,
        negative_prompt=opt.negative_prompt, config=opt.config, ckpt=opt.ckpt,
        sampler=cli.sampler_name(opt.plms, opt.dpm_solver), steps=opt.ddim_steps, eta=opt.ddim_eta, scale=opt.scale,
        n_iter=opt.n_iter, n_samples=opt.n_samples, n_rows=opt.n_rows, height=opt.H, width=opt.W, channels=opt.C,
        factor=opt.f, seed=opt.seed, fixed_code=opt.fixed_code, skip_save=opt.skip_save, skip_grid=opt.skip_grid,
        device=opt.device, precision=opt.precision, safety_checker=opt.safety_checker,
        watermark=not opt.no_watermark, per_image=opt.per_image, backend=opt.backend))


if __name__ == "__main__":
    cli.exit_with(main)
