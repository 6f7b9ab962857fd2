"""Convert a checkpoint (.ckpt, read safely: nothing in it is executed) to .safetensors, optionally in bf16/fp16,
or to a diffusers folder; a diffusers folder converts back to one file.

    python scripts/convert_ckpt.py models/ldm/stable-diffusion-v1/model.ckpt              # -> model.safetensors
    python scripts/convert_ckpt.py sd-v1-4.ckpt sd-v1-4-fp16.safetensors --dtype fp16
    python scripts/convert_ckpt.py sd-v1-4.ckpt sd-v1-4-diffusers --to diffusers [--config CONFIG]
    python scripts/convert_ckpt.py sd-v1-4-diffusers sd-v1-4.safetensors                 # and back

To .safetensors, every tensor of the state dict is kept under its name (EMA weights included); Lightning's extra
entries are dropped. ``--dtype`` casts floating-point module weights; the noise-schedule buffers (keys without a
dot, such as ``alphas_cumprod``) stay float32, as the loader keeps them. The output is written tensor by tensor to
a temporary file beside it, read back and compared, then published under its name in one step; an existing file
is never overwritten.

``--to diffusers`` writes the folder ``StableDiffusionPipeline.from_pretrained`` loads (no network needed):
``unet/``, ``vae/``, ``text_encoder/`` (weights mapped by :mod:`ldm.loading.diffusers_format`, checked strictly against
``--config`` first), ``tokenizer/`` (the config's CLIP tokenizer, ``model_max_length`` its ``max_length``),
``scheduler/`` (DDIM with the config's schedule), ``model_index.json``, and the safety checker with its
``feature_extractor/`` when ``--safety_checker`` finds one. The folder is written beside its name, read back and
compared, then renamed into place; an existing path is never overwritten. With ``use_ema: True`` in the config
the EMA weights are exported.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ldm.app import cli  # noqa: E402
from ldm.errors import InputError, OutputError  # noqa: E402

DTYPES = ("keep", "fp32", "bf16", "fp16")
FORMATS = ("safetensors", "diffusers")
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="convert_ckpt.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="the checkpoint to convert (.ckpt/.pt/.pth, .safetensors to change dtype, or "
                                     "a diffusers folder)")
    parser.add_argument("output", nargs="?", help="the .safetensors file or (--to diffusers) the folder to write "
                                                  "(default: the checkpoint's name with .safetensors, or without "
                                                  "its suffix); must not exist")
    parser.add_argument("--to", choices=FORMATS, default="safetensors",
                        help="safetensors: one file (default); diffusers: a StableDiffusionPipeline folder")
    parser.add_argument("--config", default=None,
                        help=f"--to diffusers: the model config the checkpoint belongs to (default: "
                             f"{DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--safety_checker", default="auto",
                        help="--to diffusers: auto (include CompVis/stable-diffusion-safety-checker if found in "
                             "models/safety-checker/ or the Hugging Face cache), off, or the path of its folder")
    parser.add_argument("--dtype", choices=DTYPES, default="keep",
                        help="cast floating-point weights (schedule buffers stay float32); default: keep")
    return parser


def target_dtypes(state_dict: Mapping, dtype: str) -> dict:
    """key -> dtype to store: floating module weights cast to ``dtype``, schedule buffers (no dot) float32."""
    import torch

    cast = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    out = {}
    for key, tensor in state_dict.items():
        if cast is None or not tensor.is_floating_point():
            out[key] = tensor.dtype
        else:
            out[key] = cast if "." in key else torch.float32
    return out


def write_safetensors(path: Path, state_dict: Mapping, dtypes: Mapping, metadata: Mapping[str, str],
                      written: Callable[[Any], None] | None = None) -> None:
    """Write ``state_dict`` (each tensor cast to ``dtypes[key]`` as it is written) in the safetensors format:
    an 8-byte little-endian header length, a JSON header of dtype/shape/data_offsets, then the raw data.
    ``written(tensor)`` is called after each tensor is written."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if sys.byteorder != "little":
        raise OutputError("writing safetensors needs a little-endian machine")
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for key, tensor in state_dict.items():
        dtype = dtypes[key]
        if dtype not in names:
            raise InputError(f"tensor {key} has dtype {dtype}, which this converter does not write")
        size = tensor.numel() * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": names[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, tensor in state_dict.items():
            data = tensor.detach().to("cpu", dtypes[key]).contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().data if data.numel() else b"")
            if written is not None:
                written(tensor)
        f.flush()
        os.fsync(f.fileno())


def convert(ckpt: str | Path, output: str | Path | None = None, dtype: str = "keep") -> Path:
    """Convert ``ckpt`` to the safetensors file ``output``; returns its path. Never overwrites."""
    import torch

    from ldm.app.output import interrupts_deferred
    from ldm.app.run import check_checkpoint_file
    from ldm.loading.checkpoint import read_checkpoint

    ckpt = Path(ckpt)
    output = Path(output) if output else ckpt.with_suffix(".safetensors")
    if output.suffix.lower() != ".safetensors":
        raise InputError(f"the output {output} must end in .safetensors (or use --to diffusers for a folder)")
    if output.exists() or output.is_symlink():
        raise OutputError(f"{output} already exists; not overwriting it: remove it or name another output")
    if not output.parent.is_dir():
        raise OutputError(f"output folder {output.parent} does not exist; create it first")
    if ckpt.exists():
        check_checkpoint_file(ckpt, fix="check the path")
    state_dict, _ = read_checkpoint(ckpt)
    dtypes = target_dtypes(state_dict, dtype)
    temp = output.parent / f".{output.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
    try:
        try:
            write_safetensors(temp, state_dict, dtypes, {"format": "pt"})
        except OSError as err:
            raise OutputError(f"cannot write {temp}: {err.strerror or err}; free some space or choose another "
                              f"output") from None
        written, _ = read_checkpoint(temp)
        for key, tensor in state_dict.items():
            if not torch.equal(written[key], tensor.to(dtypes[key])):
                raise OutputError(f"{temp} did not read back equal at {key}; nothing was written")
        del written
        with interrupts_deferred():
            try:
                os.link(temp, output)  # atomic, and fails if the name was taken meanwhile
            except FileExistsError:
                raise OutputError(f"{output} already exists; not overwriting it") from None
            except OSError as err:
                if err.errno not in NO_HARD_LINKS:
                    raise OutputError(f"cannot write {output}: {err.strerror or err}") from None
                if output.exists():  # no hard links here (FAT, some shares): check, then rename
                    raise OutputError(f"{output} already exists; not overwriting it") from None
                os.replace(temp, output)
    finally:
        if temp.exists():
            temp.unlink()
    return output


# ------------------------------------------------------------------------------------------------ diffusers
def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename the folder ``source`` to ``target`` in one step, failing if ``target`` exists (even as an empty
    folder, which a plain rename would replace): ``renameat2(RENAME_NOREPLACE)`` where the system has it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise OutputError(f"{target} already exists; not overwriting it")
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OutputError(f"cannot write {target}: {os.strerror(err)}")
    if target.exists() or target.is_symlink():  # no renameat2 here: check, then rename
        raise OutputError(f"{target} already exists; not overwriting it")
    os.rename(source, target)


def _text_encoder_files(cond_stage_model) -> tuple[dict, Path, int]:
    """(CLIPTextModel config, tokenizer folder with vocab.json and merges.txt, prompt length) of the text
    encoder, which must be SD v1's FrozenCLIPEmbedder."""
    transformer = getattr(cond_stage_model, "transformer", None)
    tokenizer = getattr(cond_stage_model, "tokenizer", None)
    if type(transformer).__name__ != "CLIPTextModel" or tokenizer is None:
        raise InputError(f"the config's text encoder {type(cond_stage_model).__name__} is not SD v1's CLIP text "
                         f"encoder (FrozenCLIPEmbedder); only that has a diffusers layout here")
    text_config = dict(transformer.config.to_diff_dict(), architectures=["CLIPTextModel"])
    for key in ("dtype", "torch_dtype", "_name_or_path"):
        text_config.pop(key, None)
    folder = Path(str(tokenizer.name_or_path))
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise InputError(f"the text encoder's tokenizer folder {folder} has no vocab.json and merges.txt to export")
    return text_config, folder, int(cond_stage_model.max_length)


def _write_tokenizer(source: Path, target: Path, max_length: int) -> None:
    """The CLIP BPE files and a tokenizer config that transformers 4 and 5 both read, padding to ``max_length``."""
    target.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, target / name)
    config = {}
    if (source / "tokenizer_config.json").is_file():
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    special.update({k: config[k] for k in special if isinstance(config.get(k), str)})
    _write_json(target / "special_tokens_map.json", special)
    _write_json(target / "tokenizer_config.json", dict(
        special, tokenizer_class="CLIPTokenizer", model_max_length=max_length, do_lower_case=True, errors="replace",
        add_prefix_space=False))


def _write_safety_checker(source: Path, folder: Path) -> None:
    """The checker's folder as it is (config and weights) and its preprocessing as the feature extractor."""
    from ldm.inference.safety import DEFAULT_PREPROCESSOR, WEIGHT_FILES

    (folder / "safety_checker").mkdir()
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config.setdefault("architectures", ["StableDiffusionSafetyChecker"])
    _write_json(folder / "safety_checker" / "config.json", config)
    weights = next(source / name for name in WEIGHT_FILES if (source / name).is_file())
    shutil.copyfile(weights, folder / "safety_checker" / weights.name)
    preprocessor = dict(DEFAULT_PREPROCESSOR)
    if (source / "preprocessor_config.json").is_file():
        preprocessor = json.loads((source / "preprocessor_config.json").read_text(encoding="utf-8"))
    preprocessor.pop("feature_extractor_type", None)
    preprocessor["image_processor_type"] = "CLIPImageProcessor"
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", preprocessor)


def model_weights(config, state_dict: dict, source: str) -> tuple[dict, object]:
    """The module weights (no schedule, no EMA copies) that inference with ``config`` uses, checked strictly
    against the model of ``config`` (built without memory); -> (weights, model on meta)."""
    from ldm.loading.build import parameters_on_meta
    from ldm.loading.checkpoint import match_state_dict
    from ldm.util import instantiate_from_config

    try:
        with parameters_on_meta():
            model = instantiate_from_config(config.model)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError, FileNotFoundError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot build the model of the config: {first}") from None
    sd, notes = match_state_dict(model.state_dict(), state_dict, source)
    for note in notes:
        print(note)
    if getattr(model, "use_ema", False):  # inference uses the EMA weights: export those
        for name, ema_name in model.model_ema.m_name2s_name.items():
            sd["model." + name] = sd.pop("model_ema." + ema_name)
    return {k: v for k, v in sd.items() if "." in k and not k.startswith("model_ema.")}, model


def convert_to_diffusers(ckpt: str | Path, output: str | Path | None = None, config: str | Path | None = None,
                         dtype: str = "keep", safety_checker: str = "auto") -> Path:
    """Write ``ckpt`` as a diffusers ``StableDiffusionPipeline`` folder ``output``; returns its path. Never
    overwrites; nothing is left behind on failure."""
    import torch

    from ldm.app.output import interrupts_deferred
    from ldm.app.run import check_checkpoint_file
    from ldm.backend.memory import FilePages
    from ldm.inference.pipeline import load_config
    from ldm.inference.safety import find_safety_checker
    from ldm.loading import diffusers_format as df
    from ldm.loading.checkpoint import read_checkpoint, read_state_dict

    ckpt = Path(ckpt)
    output = Path(output) if output else ckpt.with_suffix("")
    if output.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise InputError(f"the output {output} of --to diffusers is a folder; name it without a file suffix")
    if output.exists() or output.is_symlink():
        raise OutputError(f"{output} already exists; not overwriting it: remove it or name another output")
    if not output.parent.is_dir():
        raise OutputError(f"output folder {output.parent} does not exist; create it first")
    config_path = Path(config) if config else DEFAULT_CONFIG
    if not config_path.is_file():
        raise InputError(f"config not found: {config_path}; check --config")
    model_config = load_config(config_path)
    params = model_config.model.get("params") or {}
    configs = {"unet": df.unet_config(params), "vae": df.vae_config(params)}
    scheduler = df.scheduler_config(params)
    checker = find_safety_checker(safety_checker)
    if ckpt.exists():
        check_checkpoint_file(ckpt, fix="check the path")
    state_dict, _ = read_checkpoint(ckpt)
    # the checkpoint is memory-mapped: each tensor's file pages are handed back once it is written and checked,
    # so converting holds about one tensor, not the whole model twice
    source_pages = FilePages.of(ckpt)
    weights, model = model_weights(model_config, state_dict, str(ckpt))
    del state_dict
    configs["text_encoder"], tokenizer, max_length = _text_encoder_files(model.cond_stage_model)
    del model
    dtypes = target_dtypes(weights, dtype)
    layout = df.layout_from_ldm(params)
    components = df.to_diffusers(weights, layout)
    keys = df.KeyMap(layout)
    component_dtypes: dict[str, dict] = {name: {} for name in components}
    for key in weights:
        name, theirs = keys.diffusers_key(key).split("/", 1)
        component_dtypes[name][theirs] = dtypes[key]

    temp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        temp.mkdir()
        try:
            for name, tensors in components.items():
                _write_json(temp / name / "config.json", configs[name])
                write_safetensors(temp / name / f"{df.PARTS[name][1]}.safetensors", tensors, component_dtypes[name],
                                  {"format": "pt"}, source_pages.release)
            _write_tokenizer(tokenizer, temp / "tokenizer", max_length)
            _write_json(temp / "scheduler" / "scheduler_config.json", scheduler)
            if checker is not None:
                _write_safety_checker(checker, temp)
            _write_json(temp / "model_index.json", df.model_index(checker is not None))
        except OSError as err:
            raise OutputError(f"cannot write {temp}: {err.strerror or err}; free some space or choose another "
                              f"output") from None
        written, written_pages = df.read_folder(temp, read_state_dict), FilePages.of(temp)
        for key, tensor in weights.items():
            if not torch.equal(written[key], tensor.to(dtypes[key])):
                raise OutputError(f"{temp} did not read back equal at {key}; nothing was written")
            source_pages.release(tensor)
            written_pages.release(written[key])
        del written
        with interrupts_deferred():
            _rename_no_replace(temp, output)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return output


def _size(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    opt = build_parser().parse_args(argv)
    if opt.to == "diffusers":
        output = convert_to_diffusers(opt.ckpt, opt.output, opt.config, opt.dtype, opt.safety_checker)
    else:
        if opt.config is not None or opt.safety_checker != "auto":
            raise InputError("--config and --safety_checker are only used with --to diffusers (a .safetensors file "
                             "keeps every tensor of the checkpoint)")
        output = convert(opt.ckpt, opt.output, opt.dtype)
    print(f"wrote {output} ({_size(output):.1f} MiB{'' if opt.dtype == 'keep' else ', ' + opt.dtype})")


if __name__ == "__main__":
    cli.exit_with(main)
