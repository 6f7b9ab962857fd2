"""Model files already on this machine: a snapshot in the local Hugging Face cache, found without the network."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def hf_cache_folder(repo_id: str, complete: Callable[[Path], bool]) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache, if a ``complete`` one is there (the one
    ``refs/main`` names, else the newest)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        folder = snapshots / ref.read_text().strip()
        if complete(folder):
            return folder
    candidates = [p for p in snapshots.iterdir() if p.is_dir() and complete(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
