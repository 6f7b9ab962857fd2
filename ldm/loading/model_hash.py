"""The ``Model hash`` of a checkpoint, as the image metadata records it (the AUTOMATIC1111 convention).

A checkpoint's sha256 is remembered in ``~/.cache/ldm/sha256.json`` under its path, size, modification time and
inode: a later run on the same, unchanged file does not read its gigabytes again (:func:`remembered_sha256`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path

from ldm.util import user_cache_dir, write_json_atomically

MEMO_ENTRIES = 256  # checkpoints remembered (the most recently hashed)


def file_sha256(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: Path) -> str:
    """What says a file is unchanged: its resolved path, size, modification time (ns) and inode."""
    st = path.stat()
    return json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])


def remembered_sha256(path: str | Path, memo: Path | None = None, compute: bool = True) -> str | None:
    """``file_sha256(path)``, read from ``memo`` (default ``~/.cache/ldm/sha256.json``) while the file keeps its
    path, size, modification time and inode, else computed and remembered (``compute=False``: None instead). A
    memo that cannot be read or written only costs the hashing."""
    path = Path(path)
    memo = user_cache_dir() / "sha256.json" if memo is None else memo
    identity = _identity(path)
    try:
        known = json.loads(memo.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    value = known.get(identity)
    if isinstance(value, str) and len(value) == 64:
        return value
    if not compute:
        return None
    value = file_sha256(path)
    if _identity(path) != identity:  # changed while it was read: not remembered
        return value
    known.pop(identity, None)
    known[identity] = value
    kept = dict(list(known.items())[-MEMO_ENTRIES:])
    with contextlib.suppress(OSError):  # a concurrent writer's entry may be lost (recomputed)
        write_json_atomically(memo, kept, prefix=".sha256-")
    return value


class ModelHash:
    """The ``Model hash`` of a checkpoint (first 10 hex digits of its sha256), computed in a background thread
    (or remembered, :func:`remembered_sha256`)."""

    def __init__(self, path: str | Path | None):
        self._sha256: str | None = None
        self._thread = None
        self._path = Path(path) if path is not None and Path(path).is_file() else None
        if self._path is not None:
            self._thread = threading.Thread(target=self._compute, args=(Path(path),), daemon=True)
            self._thread.start()

    def _compute(self, path: Path) -> None:
        try:
            self._sha256 = remembered_sha256(path)
        except OSError:
            self._sha256 = None

    def sha256(self, wait: bool = True) -> str | None:
        """The whole sha256, waiting for it if needed (None when there is no file); ``wait=False``: only if it is
        known already (remembered from an earlier run, or computed), else None."""
        if not wait and self._thread is not None and self._thread.is_alive():
            try:
                return remembered_sha256(self._path, compute=False)
            except OSError:
                return None
        if self._thread is not None:
            self._thread.join()
        return self._sha256

    def result(self) -> str | None:
        """The short hash, waiting for it if needed (None when there is no file)."""
        full = self.sha256()
        return full[:10] if full else None
