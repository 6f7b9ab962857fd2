"""Shared fixtures: the tiny reference model (same classes as SD v1, 4 M parameters) and the golden data.

Everything under tests/fixtures/ was produced by the original CompVis implementation (see
tests/fixtures/REFERENCE.md); nothing there comes from this code.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"

# The interrupt tests send SIGINT, SIGTERM and SIGHUP to the scripts. A shell that starts pytest in the background
# (`nohup`, `&`) makes it ignore SIGINT or SIGHUP, and ignored signals stay ignored in every child process.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
for _name in ("SIGTERM", "SIGHUP"):
    if hasattr(signal, _name) and signal.getsignal(getattr(signal, _name)) is signal.SIG_IGN:
        signal.signal(getattr(signal, _name), signal.SIG_DFL)
TINY = FIXTURES / "tiny"
PROMPTS = ["a red circle on a blue background", "a photograph of an astronaut riding a horse"]


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """The package's user cache (checkpoint hashes, OpenVINO's converted networks) in a folder of this test run,
    for the tests and the scripts they start: never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def assert_matches_reference(ours: torch.Tensor, ref: torch.Tensor, name: str = "") -> None:
    """The reference tolerance: max|ours - ref| <= 1e-3 * std(ref) + 1e-5, in float32."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours, ref = ours.detach().float().cpu(), ref.float()
    std = ref.std(correction=0).item() if ref.numel() > 1 else 0.0
    err = (ours - ref).abs().max().item()
    tol = 1e-3 * std + 1e-5
    assert err <= tol, f"{name}: max abs error {err:.3g} exceeds tolerance {tol:.3g}"


def mapping_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps, Linux)."""
    total, counting = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and ":" not in fields[0]:  # a mapping's header: address range, perms, offset, device, inode, path
                counting = len(fields) == 6 and fields[5] == str(path)
            elif counting and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def tiny_config():
    """The tiny reference config, with the CLIP folder pointed at the fixture copy."""
    config = OmegaConf.load(TINY / "v1-tiny.yaml")
    config.model.params.cond_stage_config.params.version = str(TINY / "clip")
    return config


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(TINY / "weights.safetensors").items()}


def tiny_ema_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(TINY / "ema.safetensors").items()}


@pytest.fixture(scope="session")
def tiny_io() -> dict[str, torch.Tensor]:
    return load_file(TINY / "io.safetensors")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny reference weights saved as an original-layout ``.ckpt`` ({"state_dict": ...})."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": tiny_state_dict(), "global_step": 0}, path)
    return path


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    """The tiny config written to a file, as the scripts' ``--config`` takes it."""
    path = tmp_path_factory.mktemp("config") / "v1-tiny.yaml"
    OmegaConf.save(tiny_config(), path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """The tiny model loaded through the library loader, float32, eval mode, CPU. Do not modify it."""
    from ldm.loading.build import load_model_from_config

    return load_model_from_config(tiny_config(), tiny_ckpt)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and on a shared CPU idle OpenMP threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _process_wide_fast_path_state_is_left_as_found():
    """A test that makes a fast path fail must do it on a gate of its own: the process's gate switches a failed
    path to torch's op for good, and later in-process runs would then round differently from subprocesses."""
    from ldm.backend import onednn

    before = (dict(onednn.gate.failed), torch.backends.mkldnn.enabled)
    yield
    after = (dict(onednn.gate.failed), torch.backends.mkldnn.enabled)
    if after != before:
        onednn.gate.failed.clear()
        onednn.gate.failed.update(before[0])
        torch.backends.mkldnn.enabled = before[1]
        pytest.fail(f"the test changed the process's fast-path state: {before} -> {after}")
