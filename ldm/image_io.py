"""Reading the scripts' inputs: init images of any PIL mode, and prompt files."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import InputError

SIZE_MULTIPLE = 64  # SD v1: 8x autoencoder times 8x UNet downsampling
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024


def _notice(message: str) -> None:
    print(message)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: transparency composited on white, 16/32-bit and float greys rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            top = 65535.0
        elif image.mode == "F":
            top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
        else:  # 32-bit integers: 16-bit PNGs open as "I" on some Pillow versions
            top = 65535.0 if values.size and values.max() > 255 else 255.0
        grey = np.clip(np.nan_to_num(values / top * 255.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path, notice: Callable[[str], None] = _notice) -> Image.Image:
    """Open an image file as 8-bit RGB (first frame of animations, EXIF orientation applied)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"init image not found: {path}; check --init-img")
    if not path.is_file():
        raise InputError(f"init image {path} is not a file; check --init-img")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if getattr(image, "n_frames", 1) > 1:
                    notice(f"{path} has {image.n_frames} frames; using the first")
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image) or image
                rgb = to_rgb(image)
                rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"init image {path} is too large (limit {MAX_IMAGE_PIXELS} pixels); "
                         f"scale it down first") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read init image {path}: not an image format PIL knows") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InputError(f"cannot read init image {path}: the file is truncated or corrupt ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return rgb


def round_to_multiple(value: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``value`` (at least ``multiple``)."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def fit_to_multiple(width: int, height: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(width, height) with each side rounded to the nearest multiple of ``multiple`` (at least ``multiple``)."""
    return round_to_multiple(width, multiple), round_to_multiple(height, multiple)


def load_img(path: str | Path, multiple: int = SIZE_MULTIPLE,
             notice: Callable[[str], None] = _notice) -> torch.Tensor:
    """Init image -> (1, 3, H, W) float32 in [-1, 1], H and W resized to the nearest multiples of ``multiple``."""
    image = open_image(path, notice)
    w, h = image.size
    notice(f"loaded input image of size ({w}, {h}) from {path}")
    new_w, new_h = fit_to_multiple(w, h, multiple)
    if (new_w, new_h) != (w, h):
        notice(f"resizing the input image from {w}x{h} to {new_w}x{new_h} (a multiple of {multiple})")
        image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
    return 2.0 * tensor - 1.0


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file (surrounding whitespace stripped)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"prompt file not found: {path}; check --from-file")
    if not path.is_file():
        raise InputError(f"prompt file {path} is not a file; check --from-file")
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise InputError(f"prompt file {path} is larger than {MAX_PROMPT_FILE_BYTES // 2**20} MiB; split it")
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read prompt file {path}: {err.strerror or err}") from None
    if b"\0" in data:
        raise InputError(f"prompt file {path} is not a text file (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file {path} is not UTF-8 text (bad byte at offset {err.start}); "
                         f"save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (only blank lines)")
    return prompts
