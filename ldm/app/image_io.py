"""Reading the scripts' inputs: init images of any PIL mode, and prompt files.

Both readers take untrusted bytes: every failure is an :class:`~ldm.errors.InputError` with one line naming
the file and the problem, never another exception.

* Init images: PNG, JPEG, WebP, GIF, BMP, TIFF, PPM, TGA or AVIF (formats that need an outside program, such as
  EPS through Ghostscript, are never opened); any mode becomes 8-bit RGB; animations use their first frame
  (with a notice); images over :data:`MAX_IMAGE_PIXELS` pixels (decompression bombs) are refused before
  decoding; EXIF orientation is applied; warnings about damaged metadata are dropped.
* Prompt files: UTF-8 (with or without BOM), or UTF-16/UTF-32 with a BOM; one prompt per line, blank lines
  skipped. Files with NUL or other control characters, other encodings, lines over :data:`MAX_PROMPT_CHARS`
  characters or more than :data:`MAX_PROMPT_FILE_BYTES` bytes are refused, naming the line or byte.
"""
from __future__ import annotations

import codecs
import os
import sys
import tempfile
import unicodedata
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import InputError, first_line

SIZE_MULTIPLE = 64  # SD v1: 8x autoencoder times 8x UNet downsampling
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024
MAX_PROMPT_CHARS = 10_000  # a prompt uses 77 tokens, a few hundred characters; longer lines are not prompts
# raster formats decoded inside Pillow; others (EPS, PDF-like, scientific formats) are refused unread
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "AVIF")
_TEXT_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_ALLOWED_CONTROLS = "\t\n\r\v\f"


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


@contextmanager
def _native_stderr_dropped() -> Iterator[None]:
    """Drop what C libraries (libtiff, libpng) print on file descriptor 2 meanwhile; their complaints about a
    damaged file would break the one-line error, and a readable image needs no remark."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _image_formats() -> list[str]:
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def open_image(path: str | Path, notice: Callable[[str], None] = _notice) -> Image.Image:
    """Open an image file as 8-bit RGB (first frame of animations, EXIF orientation applied).

    Raises :class:`InputError` for anything that is not a readable image of at most :data:`MAX_IMAGE_PIXELS`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"init image not found: {path}; check --init-img")
    if not path.is_file():
        raise InputError(f"init image {path} is not a file; check --init-img")
    if path.stat().st_size == 0:
        raise InputError(f"cannot read init image {path}: the file is empty")
    formats = _image_formats()
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings(), _native_stderr_dropped():
            warnings.simplefilter("ignore")  # damaged EXIF and the like: the pixels are what matters
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=formats) as image:
                frames = getattr(image, "n_frames", 1)
                if frames > 1:
                    notice(f"{path} has {frames} frames; using the first")
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image) or image
                rgb = to_rgb(image)
                rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"init image {path} is too large (limit {MAX_IMAGE_PIXELS} pixels); "
                         f"scale it down first") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read init image {path}: not an image in a supported format "
                         f"({', '.join(formats)})") from None
    except MemoryError:
        raise InputError(f"cannot read init image {path}: not enough memory to decode it; scale it down "
                         f"first") from None
    except Exception as err:  # the decoders parse untrusted bytes: any failure means a damaged file
        detail = first_line(err)[:200]
        raise InputError(f"cannot read init image {path}: the file is truncated or corrupt ({detail})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if min(rgb.size) < 1:
        raise InputError(f"cannot read init image {path}: it has no pixels ({rgb.width}x{rgb.height})")
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


def decode_text(data: bytes, name: str) -> str:
    """Bytes of a text file -> str: UTF-8 (BOM optional) or UTF-16/32 with a BOM; raises :class:`InputError`
    naming the first bad byte, a NUL or another control character."""
    encoding = next((enc for bom, enc in _TEXT_BOMS if data.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\0" in data:
        raise InputError(f"{name} is not a text file (it contains NUL bytes at offset {data.index(0)})")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        where = f"byte 0x{data[err.start]:02X} at offset {err.start}"
        if encoding == "utf-8":  # Latin-1, Windows-1252, ... are not guessed: a wrong guess changes the prompt
            line = data.count(b"\n", 0, err.start) + 1
            where += f", line {line}"
            raise InputError(f"{name} is not UTF-8 text ({where}); save it as UTF-8") from None
        raise InputError(f"{name} starts with a {encoding.upper()} byte order mark but is not valid "
                         f"{encoding.upper()} ({where}); save it as UTF-8") from None
    for number, line in enumerate(text.split("\n"), 1):
        bad = next((ch for ch in line if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc"), None)
        if bad is not None:
            kind = "NUL" if bad == "\0" else f"control character U+{ord(bad):04X}"
            raise InputError(f"{name} is not a text file: line {number} contains {kind}")
    return text


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-blank lines of a text file (surrounding whitespace stripped); see the module notes for encodings."""
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
    text = decode_text(data, f"prompt file {path}")
    prompts = [line.strip() for line in text.splitlines()]
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt file {path}: line {number} has {len(prompt)} characters, more than the "
                             f"{MAX_PROMPT_CHARS} allowed (a prompt uses 77 tokens); shorten it")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (only blank lines)")
    return prompts
