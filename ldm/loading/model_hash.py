"""The ``Model hash`` of a checkpoint, as the image metadata records it (the AUTOMATIC1111 convention)."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path


def file_sha256(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class ModelHash:
    """The ``Model hash`` of a checkpoint (first 10 hex digits of its sha256), computed in a background thread."""

    def __init__(self, path: str | Path | None):
        self._value: str | None = None
        self._thread = None
        if path is not None and Path(path).is_file():
            self._thread = threading.Thread(target=self._compute, args=(Path(path),), daemon=True)
            self._thread.start()

    def _compute(self, path: Path) -> None:
        try:
            self._value = file_sha256(path)[:10]
        except OSError:
            self._value = None

    def result(self) -> str | None:
        """The short hash, waiting for it if needed (None when there is no file)."""
        if self._thread is not None:
            self._thread.join()
        return self._value
