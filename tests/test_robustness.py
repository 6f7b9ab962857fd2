"""Reliability and security (issue 8): hostile and broken checkpoints, no network, broken inputs, nothing lost.

Claims about a process (exit code, one line on stderr, no traceback, network namespace, signals, a read-only
mount) are checked on real processes, started together where they can be; the rest runs the scripts' own
``main`` under the same ``ldm.app.cli.main`` wrapper in this process. The image and prompt readers are also checked
with hypothesis on arbitrary and on mutated bytes: any input gives a valid result or an ``LdmError``.
"""
from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import unicodedata
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm.app import cli
from ldm.app.image_io import MAX_IMAGE_PIXELS, MAX_PROMPT_CHARS, open_image, read_prompt_file
from ldm.app.output import TEMP_PREFIX, NumberedWriter, highest_index, remove_stale_temp_files
from ldm.errors import CheckpointError, InputError, LdmError, OutputError
from ldm.loading.build import load_model_from_config
from ldm.loading.checkpoint import read_checkpoint
from tests.conftest import tiny_config, tiny_state_dict
from tests.test_output import smooth_image
from tests.test_scripts import model_flags, pixels, run_inline, script, start

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--H", "64", "--W", "64", "--ddim_steps", "2", "--n_iter", "1", "--n_samples", "1", "--safety_checker",
         "off"]


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_one_line(code: int, err: str, expected: str, out: str = "") -> None:
    assert code not in (0, None), err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert "Traceback" not in err + out


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def can_unshare(*flags: str, then: str = "true") -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", *flags, "sh", "-c", then], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------------------------------------- hostile pickles
class _TouchMarker:
    """Unpickling this runs ``touch marker`` (through ``function``: os.system, or exec of Python code)."""

    def __init__(self, marker: Path, function: str = "system"):
        self.marker, self.function = marker, function

    def __reduce__(self):
        if self.function == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').close()",))
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path, form: str, function: str = "system") -> Path:
    """A checkpoint whose extras hold a payload: ``zip`` (torch.save), ``legacy`` (pre-1.6 torch.save) or
    ``pickle`` (a plain pickle, as many .pt files are)."""
    obj = {"state_dict": tiny_state_dict(), "global_step": 1, "x": _TouchMarker(marker, function)}
    if form == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=form == "zip")
    return path


def test_the_payload_is_live(tmp_path):
    """The files below really run code when unpickled the way the original loader did (pickle / torch.load)."""
    marker = tmp_path / "ran"
    with open(write_evil(tmp_path / "evil.pt", marker, "pickle"), "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    torch.load(write_evil(tmp_path / "evil.ckpt", marker, "zip", "exec"), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("form", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("function", ["system", "exec"])
def test_code_in_a_checkpoint_is_refused(tmp_path, form, function):
    marker = tmp_path / "ran"
    path = write_evil(tmp_path / "evil.ckpt", marker, form, function)
    with pytest.raises(CheckpointError, match=r"refusing to load .*nothing was executed") as info:
        read_checkpoint(path)
    assert len(str(info.value).splitlines()) == 1 and "weights_only" not in str(info.value)
    with pytest.raises(CheckpointError):
        load_model_from_config(tiny_config(), path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def processes(tiny_ckpt, tiny_config_path, tmp_path_factory):
    """Short real runs, started together: hostile checkpoints through both scripts, and an outdir on a
    read-only mount."""
    tmp = tmp_path_factory.mktemp("processes")
    runs = {}
    marker = tmp / "ran"
    image = tmp / "init.png"
    smooth_image(64, 64).save(image)
    zip_ckpt = write_evil(tmp / "evil.ckpt", marker, "zip")
    pickle_ckpt = write_evil(tmp / "evil.pt", marker, "pickle")
    runs["evil_txt2img"] = start(script("txt2img") + ["--ckpt", str(zip_ckpt), "--config", str(tiny_config_path),
                                                      "--outdir", str(tmp / "out_a")] + SMALL)
    runs["evil_img2img"] = start(script("img2img") + ["--ckpt", str(pickle_ckpt), "--config", str(tiny_config_path),
                                                      "--init-img", str(image), "--outdir", str(tmp / "out_b"),
                                                      "--ddim_steps", "2", "--safety_checker", "off"])
    if can_unshare("-rm", then="mount --bind /tmp /tmp"):
        readonly = tmp / "readonly"
        (readonly / "samples").mkdir(parents=True)
        mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        runs["readonly"] = start(["unshare", "-rm", "sh", "-c", mount, str(readonly)] + script("txt2img") +
                                 model_flags(tiny_ckpt, tiny_config_path) + SMALL + ["--outdir", str(readonly)])
    results = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = (proc.returncode, out, err)
    return tmp, marker, results


@pytest.mark.parametrize("name", ["evil_txt2img", "evil_img2img"])
def test_scripts_refuse_code_in_a_checkpoint(processes, name):
    tmp, marker, results = processes
    code, out, err = results[name]
    assert_one_line(code, err, "refusing to load", out)
    assert "nothing was executed" in err and not marker.exists()
    assert not list(tmp.glob("out_*/**/*.png"))


def test_read_only_outdir_fails_before_loading(processes):
    """An existing output folder that cannot be written fails at once, not after sampling. The tests run as root,
    whom permissions do not stop, so the folder is made read-only by a bind mount in a private mount namespace."""
    _, _, results = processes
    if "readonly" not in results:
        pytest.skip("no mount namespace here (unshare -rm)")
    code, out, err = results["readonly"]
    assert_one_line(code, err, "cannot write to output folder", out)
    assert "Read-only file system" in err and "Loading model" not in out


# ---------------------------------------------------------------------------------------------- Lightning extras
def test_original_lightning_checkpoint_with_extras_loads(tmp_path, tiny_io, tiny_model):
    """A checkpoint laid out as Lightning wrote the SD v1 releases (callbacks keyed by the ModelCheckpoint class,
    optimizer and scheduler states), plus hyper-parameters as other trainers save them (OmegaConf, AttributeDict,
    Namespace, defaultdict, paths): all read inertly, the weights loaded."""
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.parsing import AttributeDict

    from ldm.lr_scheduler import LambdaLinearScheduler

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LambdaLinearScheduler(
        warm_up_steps=[10000], f_min=[1.0], f_max=[1.0], f_start=[1e-6], cycle_lengths=[10**13]))
    weight.grad = torch.ones(3)
    optimizer.step()
    scheduler.step()
    path = tmp_path / "v1-5-like.ckpt"
    torch.save({
        "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": tiny_state_dict(),
        "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": np.float64(0.1), "dirpath": "/logs"}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": OmegaConf.create({"lr": 1e-4, "steps": [1, 2]}), "attrs": AttributeDict(a=1),
                             "args": Namespace(lr=1.0), "counts": collections.defaultdict(list, a=[1]),
                             "logdir": Path("/logs"), "lr": np.array([1e-4])},
    }, path)
    _, extras = read_checkpoint(path)
    assert extras["global_step"] == 470000 and extras["hyper_parameters"]["attrs"] == {"a": 1}
    model = load_model_from_config(tiny_config(), path)
    with torch.no_grad():
        ours = model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
        ref = tiny_model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
    assert torch.equal(ours, ref)


# ---------------------------------------------------------------------------------------------- broken checkpoints
def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


def _safetensors_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _state_dict_without(prefix: str) -> dict:
    return {k: v for k, v in tiny_state_dict().items() if not k.startswith(prefix)}


def _wrong_shape() -> dict:
    sd = tiny_state_dict()
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    return sd


BROKEN_CHECKPOINTS = {
    "png": ("model.ckpt", _png_bytes, "is a PNG image, not a model checkpoint"),
    "empty": ("model.ckpt", lambda: b"", "is empty (0 bytes)"),
    "lfs_pointer": ("model.ckpt", lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 4\n",
                    "Git LFS pointer"),
    "html": ("model.ckpt", lambda: b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
    "text": ("model.ckpt", lambda: b"model:\n  target: x\n", "corrupt or not a PyTorch checkpoint"),
    "safetensors_as_ckpt": ("model.ckpt", lambda: _safetensors_header(b'{"a":{"dtype":"F32","shape":[1],'
                                                                      b'"data_offsets":[0,4]}}') + b"\0" * 4,
                            "is a safetensors file; rename it to model.safetensors"),
    "ckpt_as_safetensors": ("model.safetensors", lambda: b"PK\x03\x04" + b"\0" * 60, "named .safetensors"),
    "bad_header": ("model.safetensors", lambda: _safetensors_header(b"{not json}"), "not a valid safetensors"),
    "deep_header": ("model.safetensors", lambda: _safetensors_header(b"[" * 100_000), "not a valid safetensors"),
    "header_too_long": ("model.safetensors", lambda: struct.pack("<Q", 2**40) + b"{}", "not a valid safetensors"),
    "truncated": ("model.ckpt", None, "truncated, corrupt or not a PyTorch checkpoint"),
    "wrong_shape": ("model.ckpt", _wrong_shape, "model.diffusion_model.out.2.bias (5,) vs (4,)"),
    "no_autoencoder": ("model.ckpt", lambda: _state_dict_without("first_stage_model."),
                       "no autoencoder weights (first_stage_model.*)"),
    "no_unet": ("model.safetensors", lambda: _state_dict_without("model.diffusion_model."), "no UNet weights"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoints_are_one_line(case, tmp_path, tiny_ckpt, tiny_config_path, capsys):
    name, make, expected = BROKEN_CHECKPOINTS[case]
    path = tmp_path / name
    content = make() if make is not None else tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2]
    if isinstance(content, dict):
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(content, path)
        else:
            torch.save({"state_dict": content}, path)
    else:
        path.write_bytes(content)
    argv = ["--ckpt", str(path), "--config", str(tiny_config_path), "--device", "cpu", "--outdir",
            str(tmp_path / "out")] + SMALL
    code, out, err = run_inline("txt2img", argv, capsys)
    assert_one_line(code, err, expected, out)
    assert "weights_only" not in err  # never the advice to unpickle with code execution
    assert not list((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize("layout", ["diffusers", "plain"])
def test_checkpoint_folder(layout, tmp_path, tiny_config_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    if layout == "diffusers":
        (folder / "model_index.json").write_text("{}")
    code, out, err = run_inline("txt2img", ["--ckpt", str(folder), "--config", str(tiny_config_path),
                                            "--outdir", str(tmp_path / "out")] + SMALL, capsys)
    assert_one_line(code, err, "diffusers folder" if layout == "diffusers" else "not a file", out)


# ---------------------------------------------------------------------------------------------- no network
GUARD = '''
"""Test guard: every TCP/UDP connection and name lookup is logged to $LDM_NETWORK_LOG and refused."""
import os
import socket

NETWORK_GUARD = True
_LOG = os.environ["LDM_NETWORK_LOG"]


def _refuse(what, target):
    with open(_LOG, "a") as log:
        log.write(f"{os.getpid()} {what} {target!r}\\n")
    raise OSError(101, "network access attempted (refused by the test guard)")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect_ex", address)
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo = lambda host, *args, **kwargs: _refuse("getaddrinfo", host)
socket.gethostbyname = lambda host: _refuse("gethostbyname", host)
'''

PROBE = '''
import contextlib, importlib.util, io, socket, sys
import sitecustomize
assert sitecustomize.NETWORK_GUARD
try:  # the guard's own check: this one attempt is expected in the log
    socket.create_connection(("guard-selftest.invalid", 80), timeout=1)
except OSError:
    pass
import torch
from omegaconf import OmegaConf
from ldm.app import cli
from ldm.loading.build import parameters_on_meta
from ldm.util import instantiate_from_config

ROOT, TMP, CKPT, CONFIG = sys.argv[1:5]
# the default SD v1 config: ViT-L/14 text encoder and tokenizer of the default version, UNet, autoencoder
config = OmegaConf.load(f"{ROOT}/configs/stable-diffusion/v1-inference.yaml")
with parameters_on_meta():  # the 1.07 G parameters take no memory; buffers are real
    model = instantiate_from_config(config.model)
print("params", sum(p.numel() for p in model.parameters()))
print("tokens", model.cond_stage_model.tokenize(["a photograph of an astronaut riding a horse"])[0, :10].tolist())


def script(name):
    spec = importlib.util.spec_from_file_location(name, f"{ROOT}/scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run(name, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(script(name), argv, prog=name)
    print(name, "exit", code, "stderr", err.getvalue().strip().replace("\\n", " | "))


torch.set_num_threads(1)
# the default config and checkpoint paths, with no checkpoint: fails only for the checkpoint
run("txt2img", ["--config", f"{ROOT}/configs/stable-diffusion/v1-inference.yaml", "--outdir", f"{TMP}/default"])
# a whole run, safety checker auto: found in the Hugging Face cache of $HF_HOME
run("txt2img", ["--ckpt", CKPT, "--config", CONFIG, "--device", "cpu", "--H", "64", "--W", "64", "--ddim_steps",
                "2", "--n_samples", "1", "--n_iter", "1", "--outdir", f"{TMP}/run"])
run("img2img", ["--ckpt", CKPT, "--config", CONFIG, "--device", "cpu", "--init-img", f"{TMP}/init.png",
                "--ddim_steps", "2", "--n_samples", "1", "--outdir", f"{TMP}/i2i", "--safety_checker", "off"])
'''


@pytest.fixture(scope="module")
def offline(tiny_ckpt, tiny_config_path, tmp_path_factory):
    """The probe above and the safety-checker tests, in a network namespace with no interfaces, with no offline
    variable set and a guard that logs and refuses any connection or name lookup."""
    if not can_unshare("-rn"):
        pytest.skip("no network namespace here (unshare -rn)")
    pytest.importorskip("diffusers")
    from tests.test_scripts import write_checker

    tmp = tmp_path_factory.mktemp("offline")
    (tmp / "guard").mkdir()
    (tmp / "guard" / "sitecustomize.py").write_text(GUARD)
    (tmp / "probe.py").write_text(PROBE)
    smooth_image(64, 64).save(tmp / "init.png")
    # a Hugging Face cache holding the safety checker, as `huggingface-cli download` leaves it
    repo = tmp / "hf" / "hub" / "models--CompVis--stable-diffusion-safety-checker"
    write_checker(repo / "snapshots" / "0123abcd", 2.0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    log = tmp / "network.log"
    env = {k: v for k, v in os.environ.items() if not (k.endswith("_OFFLINE") or k.startswith(("HF_", "HUGGING")))}
    env.pop(cli.TRACEBACK_ENV, None)
    env.update(PYTHONPATH=os.pathsep.join([str(tmp / "guard"), str(ROOT)]), LDM_NETWORK_LOG=str(log),
               HF_HOME=str(tmp / "hf"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    probe = subprocess.Popen(["unshare", "-rn", sys.executable, str(tmp / "probe.py"), str(ROOT), str(tmp),
                              str(tiny_ckpt), str(tiny_config_path)], cwd=tmp, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    suite = subprocess.Popen(["unshare", "-rn", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/test_safety.py"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    probe_out, probe_err = probe.communicate(timeout=600)
    suite_out, _ = suite.communicate(timeout=600)
    attempts = log.read_text().splitlines() if log.exists() else []
    return Namespace(tmp=tmp, probe=(probe.returncode, probe_out, probe_err), suite=(suite.returncode, suite_out),
                     attempts=attempts)


def test_no_network_is_touched(offline):
    # exactly the guard's own test connection: proof that it was active, and that nothing else tried
    assert len(offline.attempts) == 1 and "guard-selftest.invalid" in offline.attempts[0], offline.attempts
    # nothing waited on a timeout or retried (a timeout would need a connection attempt, logged above)
    assert not any(word in offline.probe[1] + offline.probe[2] + offline.suite[1]
                   for word in ("timed out", "Retrying", "ConnectionError", "offline mode"))


def test_default_config_builds_without_network(offline):
    code, out, err = offline.probe
    assert code == 0, out + err
    assert "params 1066235307" in out  # SD v1: UNet 860 M + CLIP ViT-L/14 text 123 M + autoencoder 84 M
    assert "tokens [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]" in out
    (line,) = [line for line in out.splitlines() if line.startswith("txt2img exit 1")]
    assert "checkpoint not found: models/ldm/stable-diffusion-v1/model.ckpt" in line and "ln -s" in line


def test_scripts_run_without_network(offline):
    code, out, err = offline.probe
    assert code == 0, out + err
    assert "\ntxt2img exit 0 " in out and "\nimg2img exit 0 " in out
    assert "safety checker not found" not in out  # found in the local Hugging Face cache
    assert len(list((offline.tmp / "run" / "samples").glob("*.png"))) == 1
    assert len(list((offline.tmp / "i2i" / "samples").glob("*.png"))) == 1


def test_safety_checker_tests_pass_without_network(offline):
    code, out = offline.suite
    assert code == 0 and " passed" in out and "skipped" not in out, out


# ---------------------------------------------------------------------------------------------- init images
def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _png_chunk(b"IEND", b""))


def _rgb(width: int = 30, height: int = 20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), (250, 0, 0)), Image.new("RGB", (16, 16), (0, 250, 0))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP"
                                                                               else {}))


GOOD_IMAGES = {  # name -> (bytes, (width, height), notice expected)
    "cmyk.jpg": (lambda: _encode(_rgb().convert("CMYK"), "JPEG"), (30, 20), None),
    "animated.png": (lambda: _animated("PNG"), (16, 16), "2 frames; using the first"),
    "animated.webp": (lambda: _animated("WEBP"), (16, 16), "2 frames; using the first"),
    "grey16.tif": (lambda: _encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "TIFF"), (30, 20), None),
    "float.tif": (lambda: _encode(Image.fromarray(np.full((20, 30), 0.5, np.float32)), "TIFF"), (30, 20), None),
    "la.png": (lambda: _encode(_rgb().convert("LA"), "PNG"), (30, 20), None),
    "bilevel.bmp": (lambda: _encode(_rgb().convert("1"), "BMP"), (30, 20), None),
    "one_pixel.png": (lambda: _encode(Image.new("RGB", (1, 1)), "PNG"), (1, 1), None),
}


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_unusual_images_open_as_rgb(name, tmp_path):
    make, size, notice = GOOD_IMAGES[name]
    path = tmp_path / name
    path.write_bytes(make())
    notes = []
    image = open_image(path, notes.append)
    assert image.mode == "RGB" and image.size == size
    assert (notice is None and notes == []) or (notice is not None and notice in notes[0])
    if name.startswith("animated"):
        assert image.getpixel((0, 0)) == (250, 0, 0)
    if name == "grey16.tif":
        assert image.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 * 255


BAD_IMAGES = {  # name -> (bytes, message)
    "bomb.png": (lambda: png_claiming(100_000, 100_000), "too large (limit"),
    "just_over.png": (lambda: png_claiming(8193, 8192), "too large (limit"),
    "eps.eps": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", "not an image in a supported"),
    "svg.svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "not an image in a supp"),
    "empty.png": (lambda: b"", "the file is empty"),
    "truncated.jpg": (lambda: _encode(_rgb(64, 64), "JPEG")[:400], "truncated or corrupt"),
    "corrupt.tif": (lambda: _corrupt_tiff(), "truncated or corrupt"),
}


def _corrupt_tiff() -> bytes:
    data = bytearray(_encode(_rgb(64, 64), "TIFF", compression="tiff_deflate"))
    data[200:260] = b"\xff" * 60  # inside the deflate stream: libtiff complains on stderr
    return bytes(data)


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_one_clear_error(name, tmp_path, capfd):
    make, message = BAD_IMAGES[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(InputError, match=re.escape(message)) as info:
        open_image(path)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # no libtiff/libpng chatter on the terminal


def test_image_size_limit_is_the_documented_one():
    assert MAX_IMAGE_PIXELS == 8192 * 8192 and Image.MAX_IMAGE_PIXELS != MAX_IMAGE_PIXELS  # restored after use


def _seed_images() -> list[bytes]:
    image = _rgb(24, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exercises exif_transpose
    return [_encode(image, "PNG"), _encode(image.convert("P"), "PNG"), _encode(image, "JPEG", exif=exif),
            _encode(image, "GIF"), _encode(image, "BMP"), _encode(image, "TIFF", compression="tiff_deflate"),
            _encode(image, "WEBP"), _encode(image.convert("I;16"), "PNG"), _encode(image, "TGA"),
            _encode(image, "PPM"), _animated("GIF")]


SEED_IMAGES = _seed_images()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid file with a few bytes flipped, deleted, inserted, or the tail cut off."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "delete", "insert", "cut"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def _open_or_input_error(path: Path) -> None:
    try:
        image = open_image(path, notice=lambda message: None)
    except InputError as err:
        assert len(str(err).splitlines()) == 1
        return
    assert image.mode == "RGB" and min(image.size) >= 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(SEED_IMAGES))
def test_any_damaged_image_opens_or_is_an_input_error(scratch, data):
    path = scratch / "image.bin"
    path.write_bytes(data)
    _open_or_input_error(path)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=512) | st.sampled_from([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"II*\0",
                                                       b"MM\0*", b"BM", b"RIFF\0\0\0\0WEBP"]).flatmap(
    lambda head: st.binary(max_size=256).map(lambda tail: head + tail)))
def test_any_bytes_open_or_are_an_input_error(scratch, data):
    path = scratch / "bytes.bin"
    path.write_bytes(data)
    _open_or_input_error(path)


# ---------------------------------------------------------------------------------------------- prompt files
PROMPT_CASES = {  # name -> (bytes, prompts or error fragment)
    "utf16_bom": ("a red circle\r\nзебра\n".encode("utf-16"), ["a red circle", "зебра"]),
    "utf16_be_bom": (codecs.BOM_UTF16_BE + "a cat\n".encode("utf-16-be"), ["a cat"]),
    "utf32_bom": ("x\ny".encode("utf-32"), ["x", "y"]),
    "utf8_bom": (codecs.BOM_UTF8 + "café".encode(), ["café"]),
    "latin1": ("ok\ncafé\n".encode("latin-1"), "is not UTF-8 text (byte 0xE9 at offset 6, line 2); save it as UTF-8"),
    "windows1252": ("“quoted”".encode("cp1252"), "is not UTF-8 text (byte 0x93 at offset 0, line 1)"),
    "broken_utf16": (codecs.BOM_UTF16_LE + b"a", "starts with a UTF-16 byte order mark but is not valid UTF-16"),
    "nul": (b"a prompt\x00", "not a text file (it contains NUL bytes at offset 8)"),
    "escape": (b"fine\n\x1b[31mred\n", "line 2 contains control character U+001B"),
    "binary": (bytes(range(1, 128)), "line 1 contains control character U+0001"),
    "binary_high": (bytes(range(128, 256)), "is not UTF-8 text (byte 0x80 at offset 0, line 1)"),
    "long_line": (b"short\n" + b"a" * (MAX_PROMPT_CHARS + 1), f"line 2 has {MAX_PROMPT_CHARS + 1} characters"),
    "longest_allowed": (b"b" * MAX_PROMPT_CHARS, ["b" * MAX_PROMPT_CHARS]),
}


@pytest.mark.parametrize("name", sorted(PROMPT_CASES))
def test_prompt_file_encodings_and_junk(name, tmp_path):
    data, expected = PROMPT_CASES[name]
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    if isinstance(expected, list):
        assert read_prompt_file(path) == expected
    else:
        with pytest.raises(InputError, match=re.escape(expected)) as info:
            read_prompt_file(path)
        assert len(str(info.value).splitlines()) == 1


def _check_prompts(prompts: list[str]) -> None:
    assert prompts and all(isinstance(p, str) and p and p == p.strip() for p in prompts)
    for prompt in prompts:
        assert len(prompt) <= MAX_PROMPT_CHARS
        assert not [ch for ch in prompt if ch != "\t" and unicodedata.category(ch) == "Cc"]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | mutated(["a red circle\nзебра\n".encode(e) for e in ("utf-8", "utf-16",
                                                                                          "utf-32", "utf-8-sig")]))
def test_any_prompt_file_reads_or_is_an_input_error(scratch, data):
    path = scratch / "prompts.txt"
    path.write_bytes(data)
    try:
        prompts = read_prompt_file(path)
    except InputError as err:
        assert len(str(err).splitlines()) == 1
        return
    _check_prompts(prompts)


TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\ufeff") | st.just("\n"),
               max_size=200)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]))
def test_prompt_text_round_trips_in_every_accepted_encoding(scratch, text, encoding):
    path = scratch / "roundtrip.txt"
    path.write_bytes(text.encode(encoding))
    expected = [line.strip() for line in text.splitlines() if line.strip()]
    if not expected:
        with pytest.raises(InputError, match="no prompts"):
            read_prompt_file(path)
    else:
        assert read_prompt_file(path) == expected


# ---------------------------------------------------------------------------------------------- flags and outdir
@pytest.mark.parametrize("argv, expected", [
    (["--ddim_steps", "0"], "--ddim_steps must be at least 1"),
    (["--ddim_steps", "-5"], "--ddim_steps must be at least 1"),
    (["--ddim_steps", "1001"], "--ddim_steps 1001 is more than the model's 1000 diffusion steps"),
    (["--n_samples", "-3"], "--n_samples must be at least 1 (got -3)"),
    (["--n_samples", "1000000000"], "--n_samples must be at most 100000"),
    (["--n_iter", "0"], "--n_iter must be at least 1"),
    (["--n_iter", "1000000"], "this run would make 1000000 images"),
    (["--scale", "inf"], "--scale must be a finite number"),
    (["--scale=-inf"], "--scale must be a finite number"),
    (["--ddim_eta", "nan"], "--ddim_eta must be a finite number >= 0 and at most 1"),
    (["--ddim_eta", "3"], "more gives NaN (black) images"),
    (["--H", "-64"], "--H must be at least 1"),
    (["--W", "0"], "--W must be at least 1"),
    (["--H", "1000000", "--W", "1000000"], "1000000x1000000 images need at least"),
    (["--H", "4096", "--W", "4096", "--n_iter", "100000", "--n_samples", "1"], "use --skip_grid"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--prompt", "x" * (MAX_PROMPT_CHARS + 1)], f"--prompt has {MAX_PROMPT_CHARS + 1} characters"),
    (["--negative_prompt", "y" * (MAX_PROMPT_CHARS + 1)], "--negative_prompt has"),
    (["--outdir", "/proc/ldm-robustness-test"], "cannot create output folder /proc/ldm-robustness-test"),
    (["--outdir", "/proc/self"], "cannot create output folder /proc/self/samples"),
    (["--ddim_steps", "abc"], "argument --ddim_steps: invalid int value"),
])
def test_out_of_range_flags_fail_before_loading(argv, expected, tmp_path, tiny_ckpt, tiny_config_path, capsys):
    base = model_flags(tiny_ckpt, tiny_config_path) + ["--H", "64", "--W", "64", "--ddim_steps", "2", "--n_iter",
                                                       "1", "--n_samples", "1", "--safety_checker", "off",
                                                       "--outdir", str(tmp_path / "out")]
    code, out, err = run_inline("txt2img", base + argv, capsys)
    assert_one_line(code, err, expected, out)
    assert "Loading model" not in out


def test_init_image_too_large_for_memory_fails_before_loading(tmp_path, tiny_ckpt, tiny_config_path, capsys,
                                                              monkeypatch):
    """The init image decides the size: checked against the memory (here a pretended 0.1 GiB) before loading."""
    import ldm.app.run

    image = tmp_path / "big.png"
    Image.new("RGB", (2000, 2100)).save(image)
    argv = model_flags(tiny_ckpt, tiny_config_path) + ["--init-img", str(image), "--outdir", str(tmp_path / "out"),
                                                       "--safety_checker", "off"]
    code, out, err = run_inline("img2img", argv + ["--strength", "nan"], capsys)
    assert_one_line(code, err, "--strength must be between 0.0 and 1.0 (got nan)", out)
    monkeypatch.setattr(ldm.app.run, "total_memory_bytes", lambda device: 2**30 // 20)
    code, out, err = run_inline("img2img", argv, capsys)
    assert_one_line(code, err, "GiB while sampling (estimate), more than the 0.05 GiB of cpu memory here; use a "
                               "smaller --H/--W (scale the init image down)", out)
    assert re.search(r"1984x2112 images need at least 0\.\d+ GiB", err) and "Loading model" not in out


def test_memory_estimate_is_small_at_the_default_size():
    """The estimate is a lower bound: it must never refuse SD v1 at 512x512, even on a small machine."""
    from omegaconf import OmegaConf

    from ldm.app.run import sampling_memory_bytes

    config = OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    assert sampling_memory_bytes(config, 512, 512, 4) < 0.1 * 2**30
    big = sampling_memory_bytes(config, 4096, 4096, 4)
    assert 3.5 * 2**30 < big < 6 * 2**30  # grows with the pixel count: 64x at 8x the side
    assert sampling_memory_bytes(config, 4096, 4096, 2, batch=1) < big / 3


# ---------------------------------------------------------------------------------------------- nothing lost
@pytest.mark.parametrize("signum, code, says", [(signal.SIGTERM, 143, "terminated"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_a_signal_stops_a_real_run_cleanly(signum, code, says, tiny_ckpt, tiny_config_path, tmp_path):
    """SIGTERM or Ctrl-C in the middle of a run: one line, its exit code, whole images, no temporary file, no grid."""
    outdir = tmp_path / "out"
    proc = start(script("txt2img") + model_flags(tiny_ckpt, tiny_config_path) + [
        "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "500",
        "--outdir", str(outdir), "--safety_checker", "off"])
    deadline = time.time() + 180
    while time.time() < deadline and len(list((outdir / "samples").glob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"{says}; the images saved so far are complete")
    samples = sorted((outdir / "samples").iterdir())
    assert len(samples) >= 2 and temp_files(outdir) == []
    for path in samples:
        assert pixels(path).shape == (64, 64, 3)
    assert not list(outdir.glob("grid-*"))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_during_the_grid_write_keeps_the_grid_whole(signum, code, tmp_path, tiny_ckpt, tiny_config_path,
                                                           capsys, monkeypatch):
    """The signal arrives while the grid's PNG is being written: the grid is finished and published, then the
    run stops with the signal's exit code, leaving no temporary file."""
    import ldm.app.output

    calls = []
    real_png_info = ldm.app.output.png_info

    def png_info_then_signal(parameters):
        calls.append(parameters)
        if len(calls) == 3:  # two samples, then the grid
            os.kill(os.getpid(), signum)
        return real_png_info(parameters)

    monkeypatch.setattr(ldm.app.output, "png_info", png_info_then_signal)
    outdir = tmp_path / "out"
    argv = model_flags(tiny_ckpt, tiny_config_path) + ["--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples",
                                                       "2", "--n_iter", "1", "--safety_checker", "off",
                                                       "--outdir", str(outdir)]
    exit_code, _, err = run_inline("txt2img", argv, capsys)
    assert exit_code == code, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    (grid,) = outdir.glob("grid-*.png")
    assert pixels(grid).shape == (64 + 4, 2 * 66 + 2, 3)
    assert len(list((outdir / "samples").glob("*.png"))) == 2 and temp_files(outdir) == []


KILLED_WRITER = '''
import sys, time
from ldm.app.output import NumberedWriter


class Slow:
    def save(self, f, **kwargs):
        f.write(b"\\x89PNG\\r\\n\\x1a\\n half an image")
        f.flush()
        time.sleep(600)


NumberedWriter(sys.argv[1]).save(Slow())
'''


def test_kill_9_leaves_only_a_hidden_temp_file_that_later_runs_ignore_then_remove(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder)], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in temp_files(folder) if p.stat().st_size]:
        assert child.poll() is None, child.stderr.read()
        time.sleep(0.05)
    child.kill()
    child.wait(timeout=60)
    (left,) = temp_files(folder)
    assert left.name.startswith(TEMP_PREFIX) and left.stat().st_size > 0
    # a later writer ignores it for numbering, and leaves it while it may still belong to a slow writer
    assert NumberedWriter(folder).save(smooth_image(8, 8)).name == "00000.png" and left.exists()
    # unrelated hidden files that look alike: a live process's (ours) and another machine's
    ours = folder / left.name.replace(f"{TEMP_PREFIX}{child.pid}-", f"{TEMP_PREFIX}{os.getpid()}-")
    other_host = folder / f"{TEMP_PREFIX}{child.pid}-00000000-0123456789ab.png"
    for path in (ours, other_host):
        path.write_bytes(b"in progress elsewhere")
    hour_ago = time.time() - 3600
    for path in (left, ours, other_host):
        os.utime(path, (hour_ago, hour_ago))
    assert NumberedWriter(folder).save(smooth_image(8, 8)).name == "00001.png"
    assert not left.exists() and ours.exists() and other_host.exists()
    assert remove_stale_temp_files(folder) == [] and highest_index(folder, NumberedWriter(folder).regex) == 1


def test_no_hard_links_still_never_overwrites(tmp_path, monkeypatch):
    """Filesystems without hard links (FAT, some shares) publish by exclusive reservation plus rename."""
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    writer = NumberedWriter(tmp_path)
    assert writer.save(smooth_image(8, 8)).name == "00000.png"
    (tmp_path / "00001.png").write_bytes(b"another process")
    assert writer.save(smooth_image(8, 8)).name == "00002.png"
    assert (tmp_path / "00001.png").read_bytes() == b"another process"
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png", "00002.png"]
    with Image.open(tmp_path / "00002.png") as image:
        image.load()


def test_outdir_checks_leave_nothing_behind(tmp_path):
    NumberedWriter(tmp_path / "a")
    assert os.listdir(tmp_path / "a") == []
    if sys.platform.startswith("linux"):  # a folder that exists but where nobody, root included, creates files
        with pytest.raises(OutputError, match="cannot write to output folder /proc/self: "):
            NumberedWriter("/proc/self")


def test_failed_write_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk or a vanished folder while saving: one clear error, no partial file."""
    class DiskFull:
        def save(self, f, **kwargs):
            f.write(b"partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device; free some space"):
        NumberedWriter(tmp_path).save(DiskFull())
    assert os.listdir(tmp_path) == []


def test_every_user_error_is_an_ldm_error():
    assert issubclass(CheckpointError, LdmError) and issubclass(OutputError, LdmError)
    assert str(CheckpointError("two\n  lines")) == "two lines"


def test_prompt_file_through_the_script(tmp_path, tiny_ckpt, tiny_config_path, capsys):
    """A UTF-16 prompt file as Windows Notepad saves it runs; a Latin-1 one is named with its line."""
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_bytes("a red circle\r\n".encode("utf-16"))
    bad.write_bytes("a red circle\ncafé\n".encode("latin-1"))
    base = model_flags(tiny_ckpt, tiny_config_path) + SMALL + ["--outdir", str(tmp_path / "out"), "--skip_grid"]
    code, out, err = run_inline("txt2img", base + ["--from-file", str(good)], capsys)
    assert code == 0, err
    (sample,) = (tmp_path / "out" / "samples").glob("*.png")
    with Image.open(sample) as image:
        assert image.text["parameters"].startswith("a red circle\n")
    code, out, err = run_inline("txt2img", base + ["--from-file", str(bad)], capsys)
    assert_one_line(code, err, "is not UTF-8 text (byte 0xE9 at offset 16, line 2)", out)


def test_flag_errors_answer_before_torch_is_imported():
    """Flag errors (and --help) come at once: torch, and with it minutes of start-up, is imported only after the
    flags are parsed, inside the error handling (so Ctrl-C during start-up is one line too)."""
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["txt2img.py", "--H", "abc"]
        try:
            runpy.run_path({str(ROOT / 'scripts' / 'txt2img.py')!r}, run_name="__main__")
        except SystemExit as exit_:
            print(exit_.code, "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 False", result.stdout + result.stderr
    assert_one_line(2, result.stderr, "argument --H: invalid int value: 'abc'")
