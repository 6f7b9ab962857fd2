"""A run of txt2img / img2img: the options the scripts collect, the batches and seeds they make, and the loop
that generates, watermarks and saves every image and the grid (see :mod:`ldm.pipeline` for one batch)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.errors import InputError
from ldm.image_io import SIZE_MULTIPLE, load_img, open_image, read_prompt_file, round_to_multiple
from ldm.output import (
    GRID_PATTERN,
    SAMPLE_PATTERN,
    NumberedWriter,
    Watermarker,
    can_watermark,
    format_parameters,
    make_grid,
)
from ldm.pipeline import (
    DEFAULT_CKPT,
    DEFAULT_CONFIG,
    SAMPLERS,
    Pipeline,
    Settings,
    check_model_files,
    img2img_steps,
    load_pipeline,
    resolve_device,
    resolve_precision,
)


def _say(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Job:
    """One batch of a run: its prompts and their seeds (``index``: position in the run's job list)."""

    index: int
    iteration: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]


def chunk(items: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """``items`` in consecutive batches of ``size`` (the last one may be shorter)."""
    return [tuple(items[i:i + size]) for i in range(0, len(items), size)]


def plan_jobs(prompts: Sequence[str], batch_size: int, n_iter: int, seed: int, fixed_code: bool = False) -> list[Job]:
    """The batches of a run: ``n_iter`` passes over ``prompts`` in batches of ``batch_size``, with their seeds."""
    jobs, k = [], 0
    batches = chunk(prompts, batch_size)
    for n in range(n_iter):
        for batch in batches:
            first = seed if fixed_code else seed + k
            jobs.append(Job(len(jobs), n, batch, tuple(first + j for j in range(len(batch)))))
            k += len(batch)
    return jobs


@dataclass
class RunOptions:
    """Everything :func:`run` needs; the scripts build it from their flags."""

    prompts: list[str]
    outdir: str
    init_img: str | None = None
    negative_prompt: str = ""
    config: str = DEFAULT_CONFIG
    ckpt: str = DEFAULT_CKPT
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    scale: float = 7.5
    strength: float = 0.75
    n_iter: int = 1
    n_samples: int = 1
    n_rows: int = 0
    height: int = 512
    width: int = 512
    channels: int = 4
    factor: int = 8
    seed: int = 42
    fixed_code: bool = False
    skip_save: bool = False
    skip_grid: bool = False
    device: str = "auto"
    precision: str = "autocast"
    safety_checker: str = "auto"
    watermark: bool = True


def validate(opt: RunOptions) -> None:
    """Reject option values that cannot work, before anything is loaded."""
    def positive(name: str, value: int) -> None:
        if value < 1:
            raise InputError(f"{name} must be at least 1 (got {value})")

    positive("--ddim_steps", opt.steps)
    positive("--n_iter", opt.n_iter)
    positive("--n_samples", opt.n_samples)
    positive("--C", opt.channels)
    positive("--f", opt.factor)
    if opt.init_img is None:
        positive("--H", opt.height)
        positive("--W", opt.width)
    if opt.n_rows < 0:
        raise InputError(f"--n_rows must be 0 (= n_samples) or more (got {opt.n_rows})")
    if not math.isfinite(opt.scale):
        raise InputError(f"--scale must be a finite number (got {opt.scale})")
    if not math.isfinite(opt.eta) or opt.eta < 0:
        raise InputError(f"--ddim_eta must be a finite number >= 0 (got {opt.eta})")
    if opt.sampler == "plms" and opt.eta != 0:
        raise InputError(f"PLMS is deterministic: --ddim_eta must be 0 with --plms (got {opt.eta})")
    if opt.init_img is not None and not 0.0 <= opt.strength <= 1.0:
        raise InputError(f"--strength must be between 0.0 and 1.0 (got {opt.strength}): 0 keeps the init image, "
                         f"1 replaces it with noise")
    if not 0 <= opt.seed < 2**32:
        raise InputError(f"--seed must be between 0 and {2**32 - 1} (got {opt.seed})")
    if not opt.prompts:
        raise InputError("no prompt given; use --prompt or --from-file")


def check_before_loading(opt: RunOptions) -> None:
    """Everything that can fail without the model fails here, before minutes of loading."""
    from ldm.safety import find_safety_checker

    validate(opt)
    if opt.init_img is not None:
        open_image(opt.init_img, notice=lambda message: None)
    resolve_precision(opt.precision, resolve_device(opt.device))
    check_model_files(opt.config, opt.ckpt)
    find_safety_checker(opt.safety_checker)


def prepare(pipe: Pipeline, opt: RunOptions, say: Callable[[str], None] = _say):
    """-> (Settings, init posterior or None): ``opt`` checked against the model, sizes fixed, init image encoded."""
    if opt.channels != pipe.latent_channels:
        raise InputError(f"--C {opt.channels} does not match the model's {pipe.latent_channels} latent channels; "
                         f"use --C {pipe.latent_channels}")
    if opt.factor != pipe.downsampling_factor:
        raise InputError(f"--f {opt.factor} does not match the model's downsampling factor "
                         f"{pipe.downsampling_factor}; use --f {pipe.downsampling_factor}")
    multiple = pipe.size_multiple
    settings = Settings(steps=opt.steps, sampler=opt.sampler, scale=opt.scale, eta=opt.eta,
                        negative_prompt=opt.negative_prompt, channels=opt.channels, factor=opt.factor)
    if opt.init_img is None:
        settings.height, settings.width = (round_to_multiple(opt.height, multiple),
                                           round_to_multiple(opt.width, multiple))
        for flag, asked, used in (("--H", opt.height, settings.height), ("--W", opt.width, settings.width)):
            if asked != used:
                say(f"{flag} {asked} is not a multiple of {multiple}, which this model needs; using {used}")
        return settings, None
    init_image = load_img(opt.init_img, math.lcm(SIZE_MULTIPLE, multiple), say)
    settings.height, settings.width = init_image.shape[2:]
    settings.strength = opt.strength
    say(f"target t_enc is {img2img_steps(opt.strength, opt.steps)} steps")
    with torch.no_grad(), pipe.precision.context(pipe.device):
        return settings, pipe.encode_init(init_image)


def run(opt: RunOptions, say: Callable[[str], None] = _say) -> list[Path]:
    """Generate, check, watermark and save everything ``opt`` asks for; returns the paths written.

    Samples go to ``outdir/samples/NNNNN.png``, the grid to ``outdir/grid-NNNN.png``, numbered after the
    highest existing ones.
    """
    from pytorch_lightning import seed_everything
    from tqdm import tqdm

    check_before_loading(opt)
    outdir = Path(opt.outdir)
    sample_writer = NumberedWriter(outdir / "samples", SAMPLE_PATTERN)
    grid_writer = NumberedWriter(outdir, GRID_PATTERN)
    seed_everything(opt.seed, verbose=False)  # as the original; each image's noise has its own seed (see plan_jobs)
    pipe = load_pipeline(opt.config, opt.ckpt, opt.device, opt.precision, opt.safety_checker, say)
    settings, posterior = prepare(pipe, opt, say)
    _warn_long_prompts(pipe, opt.prompts, opt.negative_prompt, say)
    watermark = Watermarker() if opt.watermark else None
    if watermark is not None and not can_watermark(settings.width, settings.height):
        say(f"notice: {settings.width}x{settings.height} images are below the 256x256 pixels the invisible "
            f"watermark needs; samples are saved without it")

    jobs = plan_jobs(opt.prompts, opt.n_samples, opt.n_iter, opt.seed, opt.fixed_code)
    saved: list[Path] = []
    grid_images: list[np.ndarray] = []
    for job in tqdm(jobs, desc="Sampling", disable=len(jobs) < 2):
        images, flagged = pipe.generate(job.prompts, job.seeds, settings, posterior)
        for image, prompt, seed, bad in zip(images, job.prompts, job.seeds, flagged):
            path = None
            if not opt.skip_save:
                path = sample_writer.save(_finish(image, watermark), _parameters(pipe, settings, prompt, seed, bad))
                saved.append(path)
            if bad:
                say(f"safety checker: {path or 'the image'} (seed {seed}) was flagged and replaced by a black image")
            if not opt.skip_grid:
                grid_images.append(image)
    if grid_images:
        grid = Image.fromarray(make_grid(grid_images, opt.n_rows if opt.n_rows > 0 else opt.n_samples))
        parameters = _parameters(pipe, settings, jobs[0].prompts[0], jobs[0].seeds[0], False)
        saved.append(grid_writer.save(_finish(grid, watermark), parameters))
    say(f"Your samples are ready and waiting for you here: \n{outdir} \n \nEnjoy.")
    return saved


def _warn_long_prompts(pipe: Pipeline, prompts: Sequence[str], negative: str, say: Callable[[str], None]) -> None:
    encoder = getattr(pipe.model, "cond_stage_model", None)
    if not hasattr(encoder, "count_tokens"):
        return
    limit = getattr(encoder, "max_length", 77)
    for text, what in [(p, "prompt") for p in dict.fromkeys(prompts)] + [(negative, "negative prompt")]:
        if text and (n := encoder.count_tokens(text)) > limit:
            short = text if len(text) <= 40 else text[:37] + "..."
            say(f"warning: {what} '{short}' has {n} tokens; only the first {limit} are used")


def _finish(image: np.ndarray | Image.Image, watermark: Watermarker | None) -> Image.Image:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if watermark is not None and can_watermark(*picture.size):
        picture = watermark(picture)
    return picture


def _parameters(pipe: Pipeline, settings: Settings, prompt: str, seed: int, flagged: bool) -> str:
    """The AUTOMATIC1111 ``parameters`` text of one image."""
    values: dict[str, object] = {
        "Steps": settings.steps, "Sampler": SAMPLERS[settings.sampler][2], "CFG scale": settings.scale,
        "Seed": seed, "Size": f"{settings.width}x{settings.height}", "Model hash": pipe.model_hash.result(),
        "Model": pipe.model_name or None,
    }
    if settings.strength is not None:
        values["Denoising strength"] = settings.strength
    if settings.eta:
        values["Eta"] = settings.eta
    values["Precision"] = pipe.precision.label
    if flagged:
        values["NSFW"] = "flagged by the safety checker; image replaced by black"
    return format_parameters(prompt, settings.negative_prompt, values)


def prompts_from(prompt: str | None, from_file: str | None, n_samples: int) -> list[str]:
    """The run's prompt list: the file's non-blank lines, else ``n_samples`` copies of ``prompt``."""
    if from_file:
        return read_prompt_file(from_file)
    if prompt is None or not prompt.strip():
        raise InputError("the prompt is empty; give --prompt \"...\" or --from-file")
    return n_samples * [prompt]
