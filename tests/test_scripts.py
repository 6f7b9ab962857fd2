"""End-to-end runs of scripts/txt2img.py and scripts/img2img.py on the tiny reference model (64x64 images).

Each real process pays ~5 s of imports, so the runs that need one (two concurrent writers, the 512x512
watermark, img2img, Ctrl-C, tracebacks) start together as subprocesses, and the other flag combinations run the
scripts' own ``main`` in this process, under the same ``ldm.app.cli.main`` wrapper, while those work. Everything
runs on one thread: the processes share the CPU, and an image's pixels depend on the thread count.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.app import cli
from ldm.app.output import Watermarker, parse_parameters, read_watermark
from tests.test_output import smooth_image

ROOT = Path(__file__).resolve().parents[1]
NEGATIVE = "blurry, dark"


def script(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / f"{name}.py")]


def model_flags(ckpt, config) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(config), "--device", "cpu"]


def start(argv: list[str], cwd: Path = ROOT) -> subprocess.Popen:
    # one thread: the runs share the CPU, and pixels depend on the thread count (as on every torch CPU build)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop(cli.TRACEBACK_ENV, None)
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Run:
    """A script run: a subprocess (waited for on first use) or an in-process call of the script's main."""

    def __init__(self, outdir: Path | None, proc: subprocess.Popen | None = None):
        self.outdir, self.proc = outdir, proc
        self.returncode: int | None = None
        self.stdout = self.stderr = ""

    @classmethod
    def inline(cls, name: str, argv: list[str], outdir: Path | None) -> Run:
        run = cls(outdir)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run.returncode = cli.main(load_script(name).main, argv, prog=f"{name}.py")
        run.stdout, run.stderr = out.getvalue(), err.getvalue()
        return run

    def wait(self) -> Run:
        if self.proc is not None and self.returncode is None:
            self.stdout, self.stderr = self.proc.communicate(timeout=600)
            self.returncode = self.proc.returncode
        return self

    def samples(self) -> list[Path]:
        return sorted((self.outdir / "samples").glob("*.png"))

    def grids(self) -> list[Path]:
        return sorted(self.outdir.glob("grid-*.png"))

    def __repr__(self) -> str:
        return f"rc={self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class Runs(dict):
    """name -> Run; a run is checked (exit 0, no traceback) when first looked up."""

    def __getitem__(self, name: str) -> Run:
        run = super().__getitem__(name).wait()
        assert run.returncode == 0 and "Traceback" not in run.stderr, f"{name}: {run}"
        return run


def parameters(path: Path) -> tuple[str, str, dict[str, str]]:
    with Image.open(path) as image:
        return parse_parameters(image.text["parameters"])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def sha10(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def write_checker(folder: Path, threshold: float) -> Path:
    """A small random safety checker whose concept thresholds are all ``threshold`` (-1: flags everything)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=224, patch_size=32), projection_dim=16)
    model = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(2.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tiny_config_path, tmp_path_factory) -> Runs:
    """Every successful end-to-end run: subprocesses started first, then the in-process ones."""
    pytest.importorskip("diffusers")
    tmp = tmp_path_factory.mktemp("runs")
    model = model_flags(tiny_ckpt, tiny_config_path)
    small = ["--H", "64", "--W", "64", "--ddim_steps", "3"]
    shared = tmp / "shared"
    (shared / "samples").mkdir(parents=True)
    for name in ("00007.png", "notes.txt", "abc.png", "00020-old.png"):
        (shared / "samples" / name).write_bytes(b"keep")
    (shared / "grid-0002.png").write_bytes(b"keep")
    (shared / "readme.md").write_text("keep")
    init = tmp / "init.png"
    rgba = np.zeros((50, 70, 4), np.uint8)
    rgba[..., :3] = np.asarray(smooth_image(70, 50))
    rgba[10:40, 15:50, 3] = 255
    Image.fromarray(rgba, "RGBA").save(init)
    common = model + small + ["--precision", "full", "--safety_checker", "off"]
    a_run = common + ["--outdir", str(shared), "--n_samples", "2", "--n_iter", "2", "--negative_prompt", NEGATIVE,
                      "--prompt", "a red circle"]
    wm = model + ["--H", "512", "--W", "512", "--ddim_steps", "1", "--scale", "1.0", "--n_samples", "1",
                  "--n_iter", "1", "--seed", "7"]
    i2i = model + ["--init-img", str(init), "--ddim_steps", "4", "--strength", "0.5", "--dpm_solver",
                   "--prompt", "a red circle", "--safety_checker", "off"]
    results = Runs()
    # two concurrent writers into one folder with an existing 00007.png, grid-0002.png and unrelated files
    results["ddim_a"] = Run(shared, start(script("txt2img") + a_run + ["--seed", "100"]))
    results["ddim_b"] = Run(shared, start(script("txt2img") + a_run + ["--seed", "200", "--per_image"]))
    results["wm_512"] = Run(tmp / "wm", start(script("txt2img") + wm + ["--outdir", str(tmp / "wm")]))
    results["img2img"] = Run(tmp / "i2i", start(script("img2img") + i2i + ["--n_samples", "2",
                                                                           "--outdir", str(tmp / "i2i")]))

    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle\n\n   \na blue square\n" + " ".join(["a very long prompt"] * 30) + "\n\n")
    inline = {
        # image 2 of run a (iteration 1, slot 0: seed 100 + 2), alone
        "regen": ("txt2img", common + ["--n_samples", "1", "--n_iter", "1", "--seed", "102", "--skip_grid",
                                       "--negative_prompt", NEGATIVE, "--prompt", "a red circle"]),
        # image 3 of run b (computed one at a time), alone
        "regen_b": ("txt2img", common + ["--n_samples", "1", "--n_iter", "1", "--seed", "203", "--skip_grid",
                                         "--negative_prompt", NEGATIVE, "--prompt", "a red circle"]),
        "plms_file": ("txt2img", model + small + ["--plms", "--from-file", str(prompts), "--n_samples", "2",
                                                  "--n_iter", "1", "--safety_checker",
                                                  str(write_checker(tmp / "flag_all", -1.0))]),
        "dpm_fixed": ("txt2img", model + ["--dpm_solver", "--fixed_code", "--H", "100", "--W", "64",
                                          "--ddim_steps", "3", "--n_samples", "2", "--n_iter", "2", "--n_rows", "1",
                                          "--scale", "1.0", "--safety_checker",
                                          str(write_checker(tmp / "flag_none", 2.0))]),
        "no_wm_512": ("txt2img", wm + ["--no_watermark", "--skip_grid", "--safety_checker", "off"]),
        "img2img_regen": ("img2img", i2i + ["--n_samples", "1", "--seed", "43", "--skip_grid"]),
        "grid_only": ("txt2img", model + ["--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "3",
                                          "--n_iter", "1", "--skip_save", "--ddim_eta", "0.5",
                                          "--safety_checker", "off"]),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses, whose images some of these runs must reproduce
    try:
        for name, (which, argv) in inline.items():
            results[name] = Run.inline(which, argv + ["--outdir", str(tmp / name)], tmp / name)
    finally:
        torch.set_num_threads(threads)
    return results


# ---------------------------------------------------------------------------------------------- txt2img
def test_numbering_with_concurrent_runs_and_existing_files(runs):
    shared = runs["ddim_a"].outdir
    runs["ddim_b"]
    names = sorted(os.listdir(shared / "samples"))
    assert names == sorted(["00007.png", "notes.txt", "abc.png", "00020-old.png"] +
                           [f"{i:05}.png" for i in range(8, 16)])
    assert (shared / "samples" / "00007.png").read_bytes() == b"keep"
    assert sorted(os.listdir(shared)) == ["grid-0002.png", "grid-0003.png", "grid-0004.png", "readme.md", "samples"]
    seeds = sorted(int(parameters(shared / "samples" / f"{i:05}.png")[2]["Seed"]) for i in range(8, 16))
    assert seeds == [100, 101, 102, 103, 200, 201, 202, 203]


def test_metadata(runs, tiny_ckpt):
    shared = runs["ddim_a"].outdir
    runs["ddim_b"]
    for i in range(8, 16):
        prompt, negative, fields = parameters(shared / "samples" / f"{i:05}.png")
        assert (prompt, negative) == ("a red circle", NEGATIVE)
        assert fields["Steps"] == "3" and fields["Sampler"] == "DDIM" and fields["CFG scale"] == "7.5"
        assert fields["Size"] == "64x64" and fields["Model hash"] == sha10(tiny_ckpt)
        assert fields["Precision"] == "fp32" and "NSFW" not in fields
    for grid in (shared / "grid-0003.png", shared / "grid-0004.png"):
        assert parameters(grid)[0] == "a red circle"
        assert pixels(grid).shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # n_rows = n_samples = 2, 2 px padding


def test_recorded_seed_regenerates_the_image_alone(runs):
    shared = runs["ddim_a"].outdir
    runs["ddim_b"]
    by_seed = {parameters(p)[2]["Seed"]: p for p in (shared / "samples").glob("000??.png") if p.name != "00007.png"}
    (alone,) = runs["regen"].samples()
    assert parameters(alone)[2]["Seed"] == "102"
    # from a batch: within the batched kernels' rounding (docs/benchmark.md); with --per_image: bit for bit
    assert max_diff(pixels(alone), pixels(by_seed["102"])) <= 2
    assert not np.array_equal(pixels(by_seed["102"]), pixels(by_seed["103"]))
    (alone_b,) = runs["regen_b"].samples()
    np.testing.assert_array_equal(pixels(alone_b), pixels(by_seed["203"]))


def test_small_images_skip_the_watermark_with_a_notice(runs):
    out = runs["ddim_a"].stdout
    assert out.count("watermark") == 1 and "64x64" in out


def test_plms_from_file_partial_batch_long_prompt_and_flagged_images(runs):
    result = runs["plms_file"]
    samples = result.samples()
    assert len(samples) == 3  # blank lines skipped; batches of 2 then 1
    assert [parameters(p)[0][:12] for p in samples] == ["a red circle", "a blue squar", "a very long "]
    assert {parameters(p)[2]["Sampler"] for p in samples} == {"PLMS"}
    assert [parameters(p)[2]["Seed"] for p in samples] == ["42", "43", "44"]
    assert "reading prompts from" in result.stdout
    assert result.stdout.count("only the first 77 are used") == 1
    # the checker flags everything: black images, reported on stdout, marked in the metadata
    for path in samples:
        assert pixels(path).max() == 0 and "NSFW" in parameters(path)[2]
    assert result.stdout.count("was flagged") == 3
    assert len(result.grids()) == 1 and pixels(result.grids()[0]).max() == 0


def test_dpm_solver_fixed_code_rounding_and_unflagged(runs):
    result = runs["dpm_fixed"]
    # the tiny UNet downsamples once: sides must be multiples of 8 * 2 (SD v1: 8 * 8 = 64)
    assert "--H 100 is not a multiple of 16, which this model needs; using 96" in result.stdout
    samples = result.samples()
    assert len(samples) == 4
    fields = [parameters(p)[2] for p in samples]
    assert {f["Sampler"] for f in fields} == {"DPM-Solver++"} and {f["Size"] for f in fields} == {"64x96"}
    assert [f["Seed"] for f in fields] == ["42", "43", "42", "43"]  # the same start codes every iteration
    assert pixels(samples[0]).shape == (96, 64, 3)
    np.testing.assert_array_equal(pixels(samples[0]), pixels(samples[2]))
    assert not np.array_equal(pixels(samples[0]), pixels(samples[1]))
    assert "flagged" not in result.stdout and pixels(samples[0]).max() > 0
    assert pixels(result.grids()[0]).shape == (4 * 98 + 2, 66 + 2, 3)  # --n_rows 1: one image per row


def test_skip_save_writes_only_the_grid(runs):
    result = runs["grid_only"]
    assert result.samples() == [] and len(result.grids()) == 1
    fields = parameters(result.grids()[0])[2]
    assert fields["Eta"] == "0.5" and fields["Seed"] == "42" and fields["Sampler"] == "DDIM"
    assert pixels(result.grids()[0]).shape == (66 + 2, 3 * 66 + 2, 3)


def test_watermark_at_512(runs):
    (marked,) = runs["wm_512"].samples()
    (grid,) = runs["wm_512"].grids()
    assert read_watermark(Image.open(marked)) == b"StableDiffusionV1"
    assert read_watermark(Image.open(grid)) == b"StableDiffusionV1"
    (plain,) = runs["no_wm_512"].samples()
    assert read_watermark(Image.open(plain)) != b"StableDiffusionV1"
    # the watermark is the only difference, applied as the original does
    np.testing.assert_array_equal(pixels(marked), np.asarray(Watermarker()(Image.open(plain))))
    assert "watermark" not in runs["wm_512"].stdout
    # autocast: bf16 only on a CPU with native bf16 (the in-process run has the same CPU)
    assert parameters(marked)[2]["Precision"] == parameters(plain)[2]["Precision"] in ("bf16", "fp32")


def test_safety_checker_auto_warns_once_when_absent(runs):
    lines = [line for line in runs["wm_512"].stdout.splitlines() if "safety checker not found" in line]
    assert len(lines) == 1


# ---------------------------------------------------------------------------------------------- img2img
def test_img2img(runs):
    result = runs["img2img"]
    assert "resizing the input image from 70x50 to 64x64" in result.stdout
    samples = result.samples()
    assert len(samples) == 2 and pixels(samples[0]).shape == (64, 64, 3)
    prompt, negative, fields = parameters(samples[0])
    assert prompt == "a red circle" and negative == ""
    assert fields["Denoising strength"] == "0.5" and fields["Sampler"] == "DPM-Solver++" and fields["Seed"] == "42"
    assert fields["CFG scale"] == "5.0" and fields["Size"] == "64x64"
    (alone,) = runs["img2img_regen"].samples()
    assert max_diff(pixels(alone), pixels(samples[1])) <= 2  # image 2 of a batch, made alone from its seed
    assert len(result.grids()) == 1


# ---------------------------------------------------------------------------------------------- bad input
def test_errors_in_a_real_process(tiny_config_path, tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    image = tmp_path / "i.png"
    Image.new("RGB", (64, 64)).save(image)
    cases = {
        "flag": (script("txt2img") + ["--H", "abc"], "argument --H: invalid int value: 'abc'", 2),
        "corrupt_ckpt": (script("txt2img") + ["--ckpt", str(corrupt), "--config", str(tiny_config_path)],
                         "truncated, corrupt or not a PyTorch checkpoint", 1),
        "strength": (script("img2img") + ["--init-img", str(image), "--strength", "1.5"],
                     "--strength must be between 0.0 and 1.0", 2),
    }
    procs = {name: start(argv, cwd=tmp_path) for name, (argv, _, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        _, expected, code = cases[name]
        assert proc.returncode == code, f"{name}: {stderr}"
        assert len(stderr.strip().splitlines()) == 1 and expected in stderr, f"{name}: {stderr}"
        assert "Traceback" not in stderr + stdout


def run_inline(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """The script's main under the same wrapper as a real run, in this process."""
    try:
        code = cli.main(load_script(name).main, argv, prog=f"{name}.py")
    except SystemExit as exit_:  # argparse exits by itself
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_default_checkpoint_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_inline("txt2img", [], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "mkdir -p models/ldm/stable-diffusion-v1 && ln -s" in err
    assert ('`python scripts/txt2img.py --config models/ldm/toy-shapes/config.yaml --ckpt '
            'models/ldm/toy-shapes/model.ckpt --prompt "a red circle on a white background" --H 64 --W 64`') in err


@pytest.fixture
def bad_inputs(tmp_path, tiny_ckpt, tiny_config_path):
    corrupt_image = tmp_path / "corrupt.png"
    corrupt_image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "a_file").write_text("x")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02")
    good_image = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good_image)
    model = model_flags(tiny_ckpt, tiny_config_path)
    return tmp_path, model, str(good_image), str(corrupt_image), str(binary)


@pytest.mark.parametrize("name, argv, expected", [
    ("txt2img", ["--plms", "--dpm_solver"], "--plms and --dpm_solver exclude each other"),
    ("txt2img", ["--precision", "fp8"], "invalid choice: 'fp8'"),
    ("txt2img", ["--device", "tpu"], "invalid device 'tpu'"),
    ("txt2img", ["--n_samples", "0", "MODEL"], "--n_samples must be at least 1"),
    ("txt2img", ["--scale", "nan", "MODEL"], "--scale must be a finite number"),
    ("txt2img", ["--plms", "--ddim_eta", "0.5", "MODEL"], "--ddim_eta must be 0 with --plms"),
    ("txt2img", ["--from-file", "TMP/missing.txt", "MODEL"], "prompt file not found"),
    ("txt2img", ["--from-file", "BINARY", "MODEL"], "not a text file"),
    ("txt2img", ["--laion400m"], "--laion400m needs the LAION-400M model"),
    ("txt2img", ["--config", "TMP/nope.yaml", "--ckpt", "CKPT"], "config not found"),
    ("txt2img", ["--ckpt", "TMP/nope.ckpt"], "checkpoint not found: "),
    ("txt2img", ["--safety_checker", "TMP/nope", "MODEL"], "safety checker folder not found"),
    ("txt2img", ["--outdir", "TMP/a_file", "MODEL"], "a_file is a file, not a folder"),
    ("txt2img", ["--C", "3", "--H", "64", "--W", "64", "MODEL"], "--C 3 does not match the model's 4"),
    ("txt2img", ["--f", "16", "--H", "64", "--W", "64", "MODEL"], "--f 16 does not match"),
    ("img2img", ["MODEL"], "no input image; give --init-img"),
    ("img2img", ["--init-img", "TMP/missing.png", "MODEL"], "init image not found"),
    ("img2img", ["--init-img", "CORRUPT", "MODEL"], "cannot read init image"),
    ("img2img", ["--init-img", "GOOD", "--strength", "-0.5", "MODEL"], "--strength must be between 0.0 and 1.0"),
])
def test_bad_input_is_one_line(bad_inputs, name, argv, expected, capsys, monkeypatch):
    tmp, model, good, corrupt, binary = bad_inputs
    monkeypatch.chdir(tmp)  # default paths (outputs/, models/...) resolve in the temporary folder
    replace = {"TMP": str(tmp), "CKPT": model[1], "GOOD": good, "CORRUPT": corrupt, "BINARY": binary}
    for key, value in replace.items():
        argv = [a.replace(key, value) for a in argv]
    if "MODEL" in argv:
        argv.remove("MODEL")
        argv += model + ([] if "--outdir" in argv else ["--outdir", str(tmp / "out")])
    code, _, err = run_inline(name, argv, capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err


def test_unavailable_device(capsys, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_inline("txt2img", ["--device", "cuda"], capsys)
    assert code == 1 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_help_keeps_the_original_flags(capsys):
    for name, flags in [("txt2img", ["--prompt", "--outdir", "--skip_grid", "--skip_save", "--ddim_steps", "--plms",
                                     "--dpm_solver", "--laion400m", "--fixed_code", "--ddim_eta", "--n_iter", "--H",
                                     "--W", "--C", "--f", "--n_samples", "--n_rows", "--scale", "--from-file",
                                     "--config", "--ckpt", "--seed", "--precision", "--negative_prompt",
                                     "--device", "--safety_checker", "--no_watermark"]),
                        ("img2img", ["--prompt", "--init-img", "--outdir", "--skip_grid", "--skip_save",
                                     "--ddim_steps", "--plms", "--dpm_solver", "--fixed_code", "--ddim_eta",
                                     "--n_iter", "--C", "--f", "--n_samples", "--n_rows", "--scale", "--strength",
                                     "--from-file", "--config", "--ckpt", "--seed", "--precision",
                                     "--negative_prompt", "--device", "--safety_checker", "--no_watermark"])]:
        parser = load_script(name).build_parser()
        options = {s for action in parser._actions for s in action.option_strings}
        assert set(flags) <= options
    txt = load_script("txt2img").build_parser().parse_args([])
    assert (txt.outdir, txt.ddim_steps, txt.n_iter, txt.H, txt.W, txt.C, txt.f, txt.n_samples, txt.n_rows, txt.scale,
            txt.seed, txt.precision, txt.ddim_eta) == ("outputs/txt2img-samples", 50, 2, 512, 512, 4, 8, 3, 0, 7.5, 42,
                                                       "autocast", 0.0)
    assert (txt.config, txt.ckpt) == ("configs/stable-diffusion/v1-inference.yaml",
                                      "models/ldm/stable-diffusion-v1/model.ckpt")
    img = load_script("img2img").build_parser().parse_args([])
    assert (img.outdir, img.n_iter, img.n_samples, img.scale, img.strength, img.seed) == (
        "outputs/img2img-samples", 1, 2, 5.0, 0.75, 42)
