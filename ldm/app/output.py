"""Writing results: invisible watermark, AUTOMATIC1111-style ``parameters`` metadata, grids, and numbered files.

Files are never overwritten and never seen half-written: each PNG is written to a hidden temporary file in
the target folder and then published under the next free number with ``os.link`` (atomic, fails if the name
exists), falling back to an ``O_CREAT | O_EXCL`` reservation plus ``os.replace`` where hard links are not
supported. Several processes can therefore write into one folder at once. SIGINT, SIGTERM and SIGHUP wait while
a file is written and published. A process killed outright (``kill -9``, power loss) can leave only a hidden
temporary file, which numbering ignores and a later writer on the same machine removes once its process is gone
(:data:`STALE_TEMP_SECONDS` after it was last written). Where hard links are not supported (FAT, some network
shares), such a kill in the instant between reserving a name and moving the file onto it leaves an empty PNG.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from ldm.errors import OutputError

WATERMARK_TEXT = "StableDiffusionV1"
WATERMARK_METHOD = "dwtDct"
MIN_WATERMARK_PIXELS = 256 * 256  # invisible-watermark refuses smaller images (by area)
SAMPLE_PATTERN = ("{:05}.png", re.compile(r"^(\d+)\.png$"))
GRID_PATTERN = ("grid-{:04}.png", re.compile(r"^grid-(\d+)\.png$"))
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 600  # a temporary file lives while one PNG is written; older ones of dead processes are left-overs
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)-([0-9a-f]{8})-[0-9a-f]{12}\.png$")  # pid, host, random
_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


# ---------------------------------------------------------------------------------------------- watermark
def can_watermark(width: int, height: int) -> bool:
    """Whether invisible-watermark accepts an image of this size (at least 256 * 256 pixels)."""
    return width * height >= MIN_WATERMARK_PIXELS


class Watermarker:
    """Embeds ``text`` with invisible-watermark's ``dwtDct`` method, as the original scripts do."""

    def __init__(self, text: str = WATERMARK_TEXT):
        from imwatermark import WatermarkEncoder

        self.text = text
        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", text.encode("utf-8"))

    def __call__(self, image: Image.Image) -> Image.Image:
        """RGB image -> watermarked RGB image. Raises ValueError for images under 256 * 256 pixels."""
        if not can_watermark(*image.size):
            raise ValueError(f"image of {image.width}x{image.height} is too small for the watermark")
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # the encoder works on BGR
        marked = self.encoder.encode(bgr, WATERMARK_METHOD)
        return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def read_watermark(image: Image.Image, length_bytes: int = len(WATERMARK_TEXT)) -> bytes:
    """Decode a ``dwtDct`` byte watermark of ``length_bytes`` from an RGB image."""
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return WatermarkDecoder("bytes", 8 * length_bytes).decode(bgr, WATERMARK_METHOD)


# ---------------------------------------------------------------------------------------------- metadata
def _quote(value: object) -> str:
    """A field value as AUTOMATIC1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    if any(ch in text for ch in ",:\n\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """The AUTOMATIC1111 ``parameters`` text: prompt, ``Negative prompt:`` line (when set), ``Key: value, ...``."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([^,:]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of :func:`format_parameters`: ``(prompt, negative_prompt, fields)``."""
    *head, last = text.split("\n")
    fields = {}
    for match in _FIELD.finditer(last):
        key, value = match.group(1).strip(), match.group(2).strip()
        fields[key] = json.loads(value) if value.startswith('"') else value
    negative, prompt_lines = "", []
    for line in head:
        if line.startswith("Negative prompt:"):
            negative = line[len("Negative prompt:"):].strip()
        elif negative:
            negative += "\n" + line
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines), negative, fields


def png_info(parameters: str) -> PngImagePlugin.PngInfo:
    """A PNG text chunk ``parameters`` (iTXt, so any Unicode prompt survives)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters)
    return info


# ---------------------------------------------------------------------------------------------- grid
def make_grid(images: Sequence[np.ndarray], nrow: int, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile (H, W, 3) uint8 images ``nrow`` per row with ``padding`` pixels around each (torchvision's layout)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if len(images) == 1:  # torchvision returns a single image as it is, without padding
        return np.array(images[0], dtype=np.uint8)
    height, width = images[0].shape[:2]
    ncol = min(nrow, len(images))
    nrows = -(-len(images) // ncol)
    cell_h, cell_w = height + padding, width + padding
    grid = np.full((nrows * cell_h + padding, ncol * cell_w + padding, 3), pad_value, dtype=np.uint8)
    for k, image in enumerate(images):
        row, col = divmod(k, ncol)
        top, left = row * cell_h + padding, col * cell_w + padding
        grid[top:top + height, left:left + width] = image
    return grid


# ---------------------------------------------------------------------------------------------- files
@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while a file is being published; a signal received meanwhile is re-raised after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def highest_index(directory: str | Path, pattern: re.Pattern) -> int:
    """The highest number among the file names in ``directory`` that match ``pattern`` (-1 when none)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return -1
    numbers = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(numbers, default=-1)


def _publish(temp: Path, target: Path) -> bool:
    """Give the complete file ``temp`` the name ``target`` unless that name exists; True when published."""
    try:
        os.link(temp, target)
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # no hard links here: reserve the name exclusively, then move the file onto the reservation
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        os.replace(temp, target)
        return True
    os.unlink(temp)
    return True


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, under another user
        return True
    return True


def remove_stale_temp_files(directory: str | Path, min_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete the temporary files of writers that were killed outright: written by a process of this machine
    that no longer exists, and untouched for ``min_age`` seconds. Returns the paths removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None or match.group(2) != _HOST or _process_exists(int(match.group(1))):
            continue
        path = Path(directory) / name
        try:
            if now - path.stat().st_mtime >= min_age:
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return removed


def _sync_directory(directory: Path) -> None:
    """Make the new directory entry durable (best effort: not every system can fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class NumberedWriter:
    """Saves PNGs as ``name_format.format(n)`` in ``directory``, n continuing after the highest existing one.

    Publishing is atomic and never replaces an existing file, so concurrent writers each get their own numbers.
    """

    def __init__(self, directory: str | Path, pattern: tuple[str, re.Pattern] = SAMPLE_PATTERN):
        self.directory = Path(directory)
        self.name_format, self.regex = pattern
        blocking = next((p for p in (self.directory, *self.directory.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise OutputError(f"cannot create output folder {self.directory}: {blocking} is a file, not a folder; "
                              f"choose another --outdir")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create output folder {self.directory}: {err.strerror or err}; "
                              f"choose another --outdir") from None
        if not self.directory.is_dir():
            raise OutputError(f"output path {self.directory} is not a folder; choose another --outdir")
        self._check_writable()
        remove_stale_temp_files(self.directory)
        self._next = highest_index(self.directory, self.regex) + 1

    def _temp_path(self) -> Path:
        return self.directory / f"{TEMP_PREFIX}{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:12]}.png"

    def _check_writable(self) -> None:
        """Fail now, not after minutes of sampling, when files cannot be created in the folder."""
        probe = self._temp_path()
        with interrupts_deferred():
            try:
                os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                os.unlink(probe)
            except OSError as err:
                raise OutputError(f"cannot write to output folder {self.directory}: {err.strerror or err}; "
                                  f"choose another --outdir") from None

    def save(self, image: Image.Image, parameters: str | None = None) -> Path:
        """Write ``image`` (with a ``parameters`` text chunk) under the next free number; returns its path."""
        temp = self._temp_path()
        with interrupts_deferred():
            try:
                fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    image.save(f, format="PNG", pnginfo=png_info(parameters) if parameters is not None else None)
                    f.flush()
                    os.fsync(f.fileno())
                while True:
                    target = self.directory / self.name_format.format(self._next)
                    if _publish(temp, target):
                        self._next += 1
                        _sync_directory(self.directory)
                        return target
                    # taken (another process, or a file that appeared): skip past everything there now
                    self._next = max(self._next + 1, highest_index(self.directory, self.regex) + 1)
            except OSError as err:
                raise OutputError(f"cannot write {temp.parent}: {err.strerror or err}; "
                                  f"free some space or choose another --outdir") from None
            finally:
                if temp.exists():
                    temp.unlink()
