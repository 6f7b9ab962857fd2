"""A run of txt2img / img2img: the options the scripts collect, the batches and seeds they make, and the loop
that generates, watermarks and saves every image and the grid (see :mod:`ldm.inference.pipeline` for one batch)."""
from __future__ import annotations

import dataclasses
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.app import distributed
from ldm.app.image_io import (
    MAX_PROMPT_CHARS,
    SIZE_MULTIPLE,
    fit_to_multiple,
    load_img,
    open_image,
    read_prompt_file,
    round_to_multiple,
)
from ldm.app.output import (
    GRID_PATTERN,
    SAMPLE_PATTERN,
    NumberedWriter,
    Watermarker,
    can_watermark,
    format_parameters,
    make_grid,
)
from ldm.backend.memory import release_library_pages, total_memory_bytes, tuned_allocator
from ldm.errors import CheckpointError, InputError
from ldm.inference.pipeline import (
    DEFAULT_CKPT,
    DEFAULT_CONFIG,
    SAMPLERS,
    Pipeline,
    Settings,
    check_model_files,
    img2img_steps,
    load_config,
    load_pipeline,
    resolve_backend,
)
from ldm.inference.precision import resolve_device
from ldm.loading.checkpoint import SAFETENSORS_SUFFIXES
from ldm.loading.diffusers_format import is_diffusers_folder

MAX_IMAGES = 100_000  # per run; numbering continues across runs, so more runs make more


def _say(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True)
class Job:
    """One batch of a run: its prompts and their seeds (``index``: position in the run's job list; ``first``:
    number of its first image in the run, counted in generation order)."""

    index: int
    iteration: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    first: int = 0


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
            jobs.append(Job(len(jobs), n, batch, tuple(first + j for j in range(len(batch))), k))
            k += len(batch)
    return jobs


def shard_jobs(jobs: Sequence[Job], images: range) -> list[Job]:
    """The parts of ``jobs`` whose images (numbered in generation order) lie in ``images``: the same prompts and
    seeds, so each image is the one a single process makes (see :func:`ldm.app.distributed.share`)."""
    parts = []
    for job in jobs:
        lo, hi = max(images.start, job.first), min(images.stop, job.first + len(job.prompts))
        if lo < hi:
            a, b = lo - job.first, hi - job.first
            parts.append(dataclasses.replace(job, prompts=job.prompts[a:b], seeds=job.seeds[a:b], first=lo))
    return parts


@dataclass
class RunOptions:
    """Everything :func:`run` needs; the scripts build it from their flags."""

    prompts: list[str]
    outdir: str
    init_img: str | None = None
    negative_prompt: str = ""
    config: str = DEFAULT_CONFIG
    ckpt: str = DEFAULT_CKPT
    sampler: str = Settings.sampler  # the sampling defaults are the pipeline's
    steps: int = Settings.steps
    eta: float = Settings.eta
    scale: float = Settings.scale
    strength: float = 0.75
    n_iter: int = 1
    n_samples: int = 1
    n_rows: int = 0
    height: int = Settings.height
    width: int = Settings.width
    channels: int = Settings.channels
    factor: int = Settings.factor
    seed: int = 42
    fixed_code: bool = False
    skip_save: bool = False
    skip_grid: bool = False
    device: str = "auto"
    precision: str = "autocast"
    safety_checker: str = "auto"
    watermark: bool = True
    per_image: bool = False  # compute a batch's images one at a time (bit-exact single-image reproduction)
    backend: str = "auto"  # what runs the networks: torch or openvino (ldm.inference.pipeline.resolve_backend)


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
    if not (math.isfinite(opt.eta) and 0 <= opt.eta <= 1):
        raise InputError(f"--ddim_eta must be a finite number >= 0 and at most 1 (got {opt.eta}): 0 is "
                         f"deterministic DDIM, 1 adds as much noise as DDPM, more gives NaN (black) images")
    if opt.sampler == "plms" and opt.eta != 0:
        raise InputError(f"PLMS is deterministic: --ddim_eta must be 0 with --plms (got {opt.eta})")
    if opt.init_img is not None and not 0.0 <= opt.strength <= 1.0:
        raise InputError(f"--strength must be between 0.0 and 1.0 (got {opt.strength}): 0 keeps the init image, "
                         f"1 replaces it with noise")
    if not 0 <= opt.seed < 2**32:
        raise InputError(f"--seed must be between 0 and {2**32 - 1} (got {opt.seed})")
    if not opt.prompts:
        raise InputError("no prompt given; use --prompt or --from-file")
    total = opt.n_iter * len(opt.prompts)
    if total > MAX_IMAGES:
        raise InputError(f"this run would make {total} images (--n_iter {opt.n_iter} x {len(opt.prompts)} "
                         f"prompts); at most {MAX_IMAGES} per run: start several runs")
    for what, text in [("--prompt", p) for p in dict.fromkeys(opt.prompts)] + [
            ("--negative_prompt", opt.negative_prompt)]:
        if len(text) > MAX_PROMPT_CHARS:
            raise InputError(f"{what} has {len(text)} characters, more than the {MAX_PROMPT_CHARS} allowed (a "
                             f"prompt uses 77 tokens); shorten it")


# ---------------------------------------------------------------------------------------------- pre-flight
_NOT_CHECKPOINTS = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"), (b"version https://git-lfs", "a Git LFS pointer (the weights were never "
                                  "downloaded; run `git lfs pull`)"),
    (b"<!doctype html", "an HTML page (a failed download?)"), (b"<html", "an HTML page (a failed download?)"),
)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    return len(head) >= 9 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def check_checkpoint_file(path: str | Path, fix: str = "check --ckpt") -> None:
    """Refuse, naming what it is, a checkpoint path that is plainly something else: an empty file, an image,
    a web page, a Git LFS pointer, an incomplete diffusers folder, or the other of .ckpt / .safetensors under the
    wrong name. Everything else (a diffusers folder too) is judged by the loader
    (:func:`ldm.loading.checkpoint.read_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        if is_diffusers_folder(path):
            missing = [name for name in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")
                       if not (path / name).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {path} is an incomplete diffusers folder: {', '.join(missing)} "
                                      f"missing; {fix}")
        elif (path / "unet").is_dir():
            raise CheckpointError(f"checkpoint {path} is an incomplete diffusers folder: no model_index.json (nor "
                                  f"unet/config.json and vae/config.json); {fix}")
        return
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish")
    lowered = head.lstrip().lower()
    for signature, what in _NOT_CHECKPOINTS:
        if lowered.startswith(signature.lower()):
            raise CheckpointError(f"checkpoint {path} is {what}, not a model checkpoint; {fix}")
    is_pickle = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # torch zip, or a (legacy) pickle
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        if is_pickle:
            raise CheckpointError(f"checkpoint {path} is a PyTorch pickle checkpoint named .safetensors; rename it "
                                  f"to .ckpt (it is then read safely, without running code)")
    elif _looks_like_safetensors(head, size):
        raise CheckpointError(f"checkpoint {path} is a safetensors file; rename it to "
                              f"{path.with_suffix('.safetensors').name}")


def _model_geometry(config) -> tuple[int, int]:
    """(autoencoder downsampling factor, side multiple) of a model config: SD v1 has (8, 64)."""
    params = config.model.params
    ae = params.first_stage_config.params.get("ddconfig", {})
    unet = params.unet_config.params
    factor = 2 ** (len(ae.get("ch_mult", (1, 2, 4, 4))) - 1)
    return factor, factor * 2 ** (len(unet.get("channel_mult", (1, 2, 4, 4))) - 1)


def sampling_memory_bytes(config, height: int, width: int, element_size: int, batch: int = 2) -> int:
    """A lower bound of the memory one image of ``height`` x ``width`` needs while sampling with the model of
    ``config``: the UNet's skip connections, all alive at once, plus the input and output of one layer at the
    first level, at the latent resolution for ``batch`` rows (2 with classifier-free guidance); and the decoded
    image in float32 with its uint8 copy. Weights, the other activations and allocator slack come on top."""
    unet = config.model.params.unet_config.params
    factor, _ = _model_geometry(config)
    latent = math.ceil(height / factor) * math.ceil(width / factor)
    mults = [int(m) for m in unet.get("channel_mult", (1, 2, 4, 4))]
    res_blocks = int(unet.get("num_res_blocks", 2))
    # level l keeps num_res_blocks outputs of its width and one of the level before (conv_in / downsample)
    skips = sum((res_blocks * m + (mults[level - 1] if level else 1)) / 4 ** level for level, m in enumerate(mults))
    channels = int(unet.model_channels) * (skips + 2 * mults[0])
    return int(batch * latent * channels * element_size + height * width * 3 * (4 + 1))


def check_memory(opt: RunOptions, need: int, height: int, width: int, device: torch.device) -> None:
    """Refuse sizes and image counts that cannot fit in memory (``need``: :func:`sampling_memory_bytes`), with
    the estimate, before anything is allocated."""
    available = total_memory_bytes(device)
    if available is None:
        return
    gib = 2**30
    if need > available:
        raise InputError(f"{width}x{height} images need at least {need / gib:.3g} GiB while sampling (estimate), "
                         f"more than the {available / gib:.3g} GiB of {device.type} memory here; use a smaller "
                         f"--H/--W" + ("" if opt.init_img is None else " (scale the init image down)"))
    ram = available if device.type == "cpu" else total_memory_bytes(torch.device("cpu"))
    if not opt.skip_grid and ram is not None:
        count = opt.n_iter * len(opt.prompts)
        grid = 2 * count * height * width * 3  # the uint8 images kept for the grid, and the grid made of them
        if grid > ram:
            raise InputError(f"the grid of {count} images of {width}x{height} needs at least {grid / gib:.3g} GiB, "
                             f"more than the {ram / gib:.3g} GiB of memory here; use --skip_grid or make fewer "
                             f"images per run")


def check_before_loading(opt: RunOptions) -> None:
    """Everything that can fail without the model fails here, before minutes of loading."""
    from ldm.inference.safety import find_safety_checker
    from ldm.modules.encoders.modules import check_tokenizer

    validate(opt)
    init = None
    if opt.init_img is not None:
        init = open_image(opt.init_img, notice=lambda message: None)
    device = resolve_device(opt.device)
    _, precision = resolve_backend(opt.backend, device, opt.precision)
    check_model_files(opt.config, opt.ckpt)
    check_checkpoint_file(opt.ckpt)
    config = load_config(opt.config)
    check_tokenizer((config.model.get("params") or {}).get("cond_stage_config"))  # a missing vocabulary: now
    timesteps = int((config.model.get("params") or {}).get("timesteps", 1000))
    if opt.steps > timesteps:
        raise InputError(f"--ddim_steps {opt.steps} is more than the model's {timesteps} diffusion steps; "
                         f"use at most {timesteps}")
    element_size = torch.empty(0, dtype=precision.autocast_dtype or precision.weight_dtype).element_size()
    try:
        _, multiple = _model_geometry(config)
        if init is None:
            height, width = round_to_multiple(opt.height, multiple), round_to_multiple(opt.width, multiple)
        else:
            width, height = fit_to_multiple(*init.size, math.lcm(SIZE_MULTIPLE, multiple))
        images = 1 if opt.per_image else min(opt.n_samples, len(opt.prompts))  # sampled at once
        need = sampling_memory_bytes(config, height, width, element_size,
                                     batch=images * (1 if opt.scale == 1.0 else 2))
    except (AttributeError, KeyError, TypeError, ValueError):
        need = None  # not an SD-like config: its model will tell what it needs
    if need is not None:
        check_memory(opt, need, height, width, device)
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
    """Generate, check, watermark and save everything ``opt`` asks for; returns the paths this process wrote.

    Samples go to ``outdir/samples/NNNNN.png``, the grid to ``outdir/grid-NNNN.png``, numbered after the
    highest existing ones. Under torchrun each process makes its share of the images (see
    :mod:`ldm.app.distributed`) and rank 0 writes the grid once all are done; the files are numbered in the order
    they are finished, and each one's metadata (prompt, seed) says which image of the run it is.
    """
    with distributed.join() as group:
        return _run(opt, group, say)


def _run(opt: RunOptions, group: distributed.Group, say: Callable[[str], None]) -> list[Path]:
    from pytorch_lightning import seed_everything

    world = group.world
    say_once = say if world.is_main else _quiet  # what every process would say alike
    opt = dataclasses.replace(opt, device=distributed.rank_device(opt.device, world))
    check_before_loading(opt)
    outdir = Path(opt.outdir)
    writers = (NumberedWriter(outdir / "samples", SAMPLE_PATTERN),
               NumberedWriter(outdir, GRID_PATTERN) if world.is_main else None)
    jobs = plan_jobs(opt.prompts, opt.n_samples, opt.n_iter, opt.seed, opt.fixed_code)
    total = sum(len(job.prompts) for job in jobs)
    mine = distributed.share(total, world)
    my_jobs = shard_jobs(jobs, mine)
    if world.size > 1:
        images = f"images {mine.start + 1}-{mine.stop} of {total}" if mine else f"no images (the run has {total})"
        say(f"process {world.rank} of {world.size} ({opt.device}): {images}")
    seed_everything(opt.seed, verbose=False)  # as the original; each image's noise has its own seed (see plan_jobs)
    if opt.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(opt.device))  # no stray allocations on another process's GPU
    group.check()
    with ExitStack() as process_settings:  # what the run changes process-wide, undone when it ends
        return _generate(opt, group, jobs, my_jobs, writers, say, say_once, process_settings)


def _generate(opt: RunOptions, group: distributed.Group, jobs: list[Job], my_jobs: list[Job],
              writers: tuple[NumberedWriter, NumberedWriter | None], say: Callable[[str], None],
              say_once: Callable[[str], None], process_settings: ExitStack) -> list[Path]:
    """Load the model, make and save this process's images, and (rank 0) the grid of everyone's."""
    from tqdm import tqdm

    world = group.world
    sample_writer, grid_writer = writers
    saved: list[Path] = []
    grid_images: list[tuple[int, np.ndarray]] = []
    pipe = settings = watermark = posterior = None
    if my_jobs:
        pipe = load_pipeline(opt.config, opt.ckpt, opt.device, opt.precision, opt.safety_checker, say_once,
                             verbose=world.is_main, backend=opt.backend)
        if pipe.device.type == "cpu":
            process_settings.enter_context(tuned_allocator())  # the heap keeps and reuses what sampling frees
            release_library_pages()  # what loading touched and a CPU run does not use again
        settings, posterior = prepare(pipe, opt, say_once)
        _warn_long_prompts(pipe, opt.prompts, opt.negative_prompt, say_once)
        watermark = Watermarker() if opt.watermark else None
        if watermark is not None and not can_watermark(settings.width, settings.height):
            say_once(f"notice: {settings.width}x{settings.height} images are below the 256x256 pixels the invisible "
                     f"watermark needs; samples are saved without it")
    for job in tqdm(my_jobs, desc="Sampling", disable=len(my_jobs) < 2 or not world.is_main):
        group.check()
        images, flagged = pipe.generate(job.prompts, job.seeds, settings, posterior,
                                        per_image=True if opt.per_image else None)
        for k, (image, prompt, seed, bad) in enumerate(zip(images, job.prompts, job.seeds, flagged), job.first):
            path = None
            if not opt.skip_save:
                path = sample_writer.save(_finish(image, watermark), _parameters(pipe, settings, prompt, seed, bad))
                saved.append(path)
            if bad:
                say(f"safety checker: {path or 'the image'} (seed {seed}) was flagged and replaced by a black image")
            if not opt.skip_grid:
                grid_images.append((k, image))
    everyone = group.finish(grid_images)  # rank 0: all processes' images, once all are done
    if everyone and grid_writer is not None:
        ordered = [image for _, image in sorted(everyone, key=lambda item: item[0])]
        grid = Image.fromarray(make_grid(ordered, opt.n_rows if opt.n_rows > 0 else opt.n_samples))
        parameters = _parameters(pipe, settings, jobs[0].prompts[0], jobs[0].seeds[0], False)
        saved.append(grid_writer.save(_finish(grid, watermark), parameters))
    say_once(f"Your samples are ready and waiting for you here: \n{Path(opt.outdir)} \n \nEnjoy.")
    return saved


def _warn_long_prompts(pipe: Pipeline, prompts: Sequence[str], negative: str, say: Callable[[str], None]) -> None:
    encoder = pipe.prompt_tokenizer
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
    if n_samples < 1:
        raise InputError(f"--n_samples must be at least 1 (got {n_samples})")
    if n_samples > MAX_IMAGES:
        raise InputError(f"--n_samples must be at most {MAX_IMAGES} (got {n_samples}); start several runs")
    return n_samples * [prompt]
