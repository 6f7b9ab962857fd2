"""Writing results: watermark, AUTOMATIC1111 metadata, grid layout, numbering, atomic and concurrent writes."""
from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.app.output import (
    GRID_PATTERN,
    TEMP_PREFIX,
    NumberedWriter,
    Watermarker,
    can_watermark,
    format_parameters,
    highest_index,
    interrupts_deferred,
    make_grid,
    parse_parameters,
    read_watermark,
)
from ldm.errors import OutputError
from ldm.loading.model_hash import ModelHash, file_sha256, remembered_sha256


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A calm test image (soft colour gradients, a little noise): dwtDct decodes reliably only on such images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.5, 2.0, size=(3, 3))]
    image = 127.5 + 10 * np.stack(channels, -1) + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- watermark
def test_watermark_decodes_at_512():
    marked = Watermarker()(smooth_image(512, 512))
    assert read_watermark(marked) == b"StableDiffusionV1"
    assert marked.size == (512, 512) and marked.mode == "RGB"


def test_watermark_is_the_original_procedure():
    """The original: cv2 RGB->BGR, WatermarkEncoder 'bytes' 'StableDiffusionV1' with 'dwtDct', then back to RGB."""
    import cv2
    from imwatermark import WatermarkEncoder

    image = smooth_image(512, 384, seed=1)
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", b"StableDiffusionV1")
    expected = encoder.encode(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR), "dwtDct")[:, :, ::-1]
    np.testing.assert_array_equal(np.asarray(Watermarker()(image)), expected)


def test_watermark_size_limit():
    assert can_watermark(256, 256) and can_watermark(128, 512)
    assert not can_watermark(64, 64) and not can_watermark(255, 256)
    with pytest.raises(ValueError, match="too small"):
        Watermarker()(smooth_image(64, 64))


def test_unwatermarked_image_does_not_decode():
    assert read_watermark(smooth_image(512, 512)) != b"StableDiffusionV1"


# ---------------------------------------------------------------------------------------------- metadata
def test_parameters_a1111_format():
    text = format_parameters("a red circle", "blurry", {"Steps": 20, "Sampler": "DDIM", "CFG scale": 7.5,
                                                        "Seed": 42, "Size": "512x512", "Model hash": "0123456789"})
    assert text == ("a red circle\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789")


def test_parameters_without_negative_prompt_and_quoting():
    text = format_parameters("p", "", {"Steps": 5, "Note": "a, b: c", "Skipped": None})
    assert text == 'p\nSteps: 5, Note: "a, b: c"'
    assert parse_parameters(text) == ("p", "", {"Steps": "5", "Note": "a, b: c"})


def test_parameters_round_trip_multiline():
    fields = {"Steps": "50", "Sampler": "DPM-Solver++", "Seed": "7", "Size": "64x64"}
    text = format_parameters("line one\nline two", "neg one", fields)
    assert parse_parameters(text) == ("line one\nline two", "neg one", fields)


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_checkpoint_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    from ldm.loading import model_hash

    path, memo = tmp_path / "model.ckpt", tmp_path / "cache" / "sha256.json"
    path.write_bytes(b"abc")
    reads = []
    monkeypatch.setattr(model_hash, "file_sha256", lambda p: reads.append(p) or file_sha256(p))
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert remembered_sha256(path, memo) == abc and len(reads) == 1
    assert remembered_sha256(path, memo) == abc and len(reads) == 1  # remembered: not read again
    stat = path.stat()
    path.write_bytes(b"abd")  # same size; the modification time says it changed
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert remembered_sha256(path, memo) == file_sha256(path) != abc and len(reads) == 2
    memo.write_text("{not json")  # a damaged memo costs the hashing, nothing else
    assert remembered_sha256(path, memo) == file_sha256(path) and len(reads) == 3
    assert remembered_sha256(path, memo) == file_sha256(path) and len(reads) == 3


def test_model_hash_without_a_writable_cache(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"abc")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert ModelHash(path).result() == "ba7816bf8f"
    assert ModelHash(tmp_path / "missing.ckpt").result() is None


# ---------------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("count, nrow", [(6, 3), (5, 2), (2, 4), (1, 1)])
def test_grid_layout_matches_torchvision(count, nrow):
    from torchvision.utils import make_grid as tv_make_grid

    rng = np.random.default_rng(count)
    images = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(count)]
    expected = tv_make_grid(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), nrow=nrow)
    np.testing.assert_array_equal(make_grid(images, nrow), expected.permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------- numbering
def names(folder):
    return sorted(os.listdir(folder))


def test_numbering_continues_after_highest_and_ignores_unrelated(tmp_path):
    for name in ("00003.png", "00010.png", "notes.txt", "grid-0007.png", "abc.png", "00011-x.png", "0099.jpg"):
        (tmp_path / name).write_bytes(b"keep")
    writer = NumberedWriter(tmp_path)
    first, second = writer.save(smooth_image(8, 8)), writer.save(smooth_image(8, 8))
    assert (first.name, second.name) == ("00011.png", "00012.png")
    assert (tmp_path / "00003.png").read_bytes() == b"keep" and (tmp_path / "00010.png").read_bytes() == b"keep"
    grid = NumberedWriter(tmp_path, GRID_PATTERN).save(smooth_image(8, 8))
    assert grid.name == "grid-0008.png"


def test_numbering_starts_at_zero_and_creates_folder(tmp_path):
    writer = NumberedWriter(tmp_path / "a" / "samples")
    assert writer.save(smooth_image(8, 8)).name == "00000.png"
    assert NumberedWriter(tmp_path, GRID_PATTERN).save(smooth_image(8, 8)).name == "grid-0000.png"


def test_never_overwrites_a_file_that_appears_meanwhile(tmp_path):
    writer = NumberedWriter(tmp_path)
    (tmp_path / "00000.png").write_bytes(b"other")   # another process took 0 and 1 after we scanned
    (tmp_path / "00001.png").write_bytes(b"other")
    path = writer.save(smooth_image(8, 8))
    assert path.name == "00002.png"
    assert (tmp_path / "00000.png").read_bytes() == b"other"


def test_metadata_and_pixels_survive(tmp_path):
    image = smooth_image(32, 16)
    path = NumberedWriter(tmp_path).save(image, "prompt é ✓\nSteps: 1")
    with Image.open(path) as saved:
        assert saved.text["parameters"] == "prompt é ✓\nSteps: 1"
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(image))
    assert not [n for n in names(tmp_path) if n.startswith(TEMP_PREFIX)]


def _write_many(args):
    folder, count = args
    writer = NumberedWriter(folder)
    return [writer.save(smooth_image(16, 16, seed=i)).name for i in range(count)]


def test_concurrent_writers_get_distinct_numbers(tmp_path):
    (tmp_path / "00004.png").write_bytes(b"old")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_write_many, [(str(tmp_path), 10)] * 4)
    written = [name for result in results for name in result]
    assert len(written) == 40 and len(set(written)) == 40
    assert names(tmp_path) == ["00004.png"] + [f"{i:05}.png" for i in range(5, 45)]
    for name in written:
        with Image.open(tmp_path / name) as image:
            image.load()


def test_interrupt_while_writing_leaves_nothing(tmp_path):
    class Exploding:
        def save(self, f, **kwargs):
            f.write(b"partial")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        NumberedWriter(tmp_path).save(Exploding())
    assert names(tmp_path) == []


def test_signal_during_publish_is_deferred():
    events = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            events.append("finished the block")
    assert events == ["finished the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outdir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="out is a file, not a folder"):
        NumberedWriter(tmp_path / "out")
    with pytest.raises(OutputError, match="out is a file, not a folder"):
        NumberedWriter(tmp_path / "out" / "samples")


def test_highest_index(tmp_path):
    assert highest_index(tmp_path / "missing", GRID_PATTERN[1]) == -1
    (tmp_path / "grid-12345.png").write_bytes(b"")
    assert highest_index(tmp_path, GRID_PATTERN[1]) == 12345
