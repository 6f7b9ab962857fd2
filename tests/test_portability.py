"""Every CPU runs the README's commands: fast paths are optional, chosen by what oneDNN computes here, and fall
back to torch's public ops when they fail.

* the README's main command (toy model) under ``ONEDNN_MAX_CPU_ISA`` = AVX2, AVX512_CORE, AVX512_CORE_BF16 and
  unset (oneDNN caps stand in for CPUs unlike this one), x ``--precision`` autocast / bf16 / full, x the
  checkpoint stored in fp16 (as shipped), fp32 and bf16: every run finishes with sensible images, and the fp32
  images of the fp16 and fp32 checkpoints agree across caps;
* every private oneDNN op made to raise: the pipeline still runs, fp32 outputs at the reference tolerance;
* a prepacked kernel never outlives its weights: switching a part in use to its EMA weights gives the EMA numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.backend import onednn
from ldm.inference.pipeline import Settings, load_pipeline
from ldm.inference.residency import PartWeights
from ldm.loading.build import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules import ops
from tests.conftest import assert_matches_reference, tiny_config, tiny_ema_state_dict, tiny_state_dict
from tests.toy_classifier import classify

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = ROOT / "models/ldm/toy-shapes/config.yaml"
TOY_CKPT = ROOT / "models/ldm/toy-shapes/model.ckpt"
CAPS = ("", "AVX2", "AVX512_CORE", "AVX512_CORE_BF16")  # "": no cap, the CPU's own instruction set
PRECISIONS = ("autocast", "bf16", "full")
STORED = ("fp16", "fp32", "bf16")
PROMPT = "a red circle on a white background"
# The README's main command, with fewer steps and images so that 36 runs fit in the suite.
MAIN_COMMAND = ["--prompt", PROMPT, "--H", "64", "--W", "64", "--ddim_steps", "20", "--n_iter", "1",
                "--n_samples", "2", "--skip_grid", "--seed", "1000"]

# One process per cap (oneDNN reads the cap once); in it, scripts/txt2img.py's main() for every checkpoint
# dtype and precision, as the script runs it. A run that raises is recorded, not fatal.
DRIVER = r"""
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/scripts")
import torch
torch.set_num_threads(1)
import txt2img
runs = json.loads(sys.argv[2])
for run in runs:
    try:
        txt2img.main(run["argv"])
        run["error"] = None
    except BaseException as err:
        run["error"] = "".join(traceback.format_exception_only(err)).strip()
print("RESULT " + json.dumps(runs))
"""


def _convert(dtype: str, out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts/convert_ckpt.py"), str(TOY_CKPT), str(out),
                    "--dtype", dtype], check=True, capture_output=True, text=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def toy_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The shipped toy checkpoint (fp16) and the same weights stored as fp32 and bf16 (scripts/convert_ckpt.py)."""
    folder = tmp_path_factory.mktemp("toy")
    return {"fp16": TOY_CKPT, "fp32": _convert("fp32", folder / "toy-fp32.safetensors"),
            "bf16": _convert("bf16", folder / "toy-bf16.safetensors")}


@pytest.fixture(scope="module")
def matrix(toy_checkpoints, tmp_path_factory) -> dict[tuple[str, str, str], dict]:
    """(cap, stored dtype, precision) -> the run's outcome and its images."""
    results = {}
    for cap in CAPS:
        runs = []
        for stored in STORED:
            for prec in PRECISIONS:
                outdir = tmp_path_factory.mktemp(f"run-{cap or 'native'}-{stored}-{prec}")
                argv = [*MAIN_COMMAND, "--config", str(TOY_CONFIG), "--ckpt", str(toy_checkpoints[stored]),
                        "--precision", prec, "--outdir", str(outdir)]
                runs.append({"cap": cap, "stored": stored, "precision": prec, "outdir": str(outdir), "argv": argv})
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), json.dumps(runs)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1800)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"cap {cap or 'none'}: the driver died\n{proc.stderr[-2000:]}"
        for run in json.loads(lines[-1][len("RESULT "):]):
            files = sorted(Path(run["outdir"], "samples").glob("*.png"))
            run["images"] = [np.asarray(Image.open(f).convert("RGB")) for f in files]
            results[(run["cap"], run["stored"], run["precision"])] = run
    return results


@pytest.mark.parametrize("cap", CAPS)
def test_readme_main_command_runs_on_every_isa_precision_and_checkpoint_dtype(matrix, cap):
    for stored in STORED:
        for prec in PRECISIONS:
            run = matrix[(cap, stored, prec)]
            what = f"ONEDNN_MAX_CPU_ISA={cap or '(unset)'} --precision {prec}, checkpoint stored {stored}"
            assert run["error"] is None, f"{what}: {run['error']}"
            assert len(run["images"]) == 2, f"{what}: {len(run['images'])} images"
            verdicts = [classify(image) for image in run["images"]]
            # sensible: a red shape on a white background (at 20 steps; both images, every configuration)
            assert all(v.background == "white" and v.colour == "red" for v in verdicts), f"{what}: {verdicts}"


def test_fp32_images_agree_across_isas_and_checkpoint_dtypes(matrix):
    """fp16 weights are exact in fp32: the fp16 and fp32 checkpoints give one model, whatever the kernels."""
    reference = matrix[("", "fp32", "full")]["images"]
    assert len(reference) == 2
    for cap in CAPS:
        for stored in ("fp16", "fp32"):
            images = matrix[(cap, stored, "full")]["images"]
            assert len(images) == 2
            diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(images, reference))
            assert diff <= 2, f"ONEDNN_MAX_CPU_ISA={cap or '(unset)'}, {stored}: max pixel difference {diff}"


# ---------------------------------------------------------------------------------------------- failing fast paths
class _Raising:
    """Stands in for a private op (and its ``.binary`` overload): every call raises as oneDNN does."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.name}: could not create a primitive descriptor (test)")

    @property
    def binary(self):
        return self


@pytest.fixture
def private_ops_raise(monkeypatch):
    """Every private oneDNN op that the fast paths call raises; a fresh gate that has seen no failure."""
    for name in ("_convolution_pointwise", "_linear_pointwise"):
        monkeypatch.setattr(torch.ops.mkldnn, name, _Raising(name))
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", _Raising("mkldnn_reorder_conv2d_weight"))
    monkeypatch.setattr(torch.Tensor, "to_mkldnn", _Raising("to_mkldnn"))
    gate = onednn.Gate()
    monkeypatch.setattr(onednn, "gate", gate)
    monkeypatch.setattr(ops, "gate", gate)
    return gate


@pytest.mark.usefixtures("one_thread")
def test_pipeline_runs_when_every_private_op_raises(private_ops_raise, tiny_ckpt, tiny_config_path, tiny_io, capsys):
    pipe = load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full", say=lambda m: None)
    model = pipe.model
    with torch.no_grad():
        pipe.use(model.cond_stage_model)
        assert_matches_reference(model.get_learned_conditioning(["a red circle on a blue background",
                                                                  "a photograph of an astronaut riding a horse"]),
                                 tiny_io["cond"], "cond")
        pipe.use(model.model)
        assert_matches_reference(model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"]),
                                 tiny_io["unet_eps"], "unet_eps")
        samples, _ = DDIMSampler(model).sample(S=10, conditioning=tiny_io["cond"], batch_size=2, shape=[4, 8, 8],
                                               verbose=False, unconditional_guidance_scale=7.5,
                                               unconditional_conditioning=tiny_io["uncond"], eta=0.0,
                                               x_T=tiny_io["x_T"])
        assert_matches_reference(samples, tiny_io["ddim_s10_eta0"], "ddim_s10_eta0")
        pipe.use(model.first_stage_model)
        assert_matches_reference(model.decode_first_stage(tiny_io["z_scaled"]), tiny_io["decoded"], "decoded")
    if onednn.Gate().computes(torch.float32):  # the fast paths were tried, failed, and were switched off
        assert ("convolution", torch.float32) in private_ops_raise.failed
        assert ("linear", torch.float32) in private_ops_raise.failed
    images, _ = pipe.generate(["a red circle"], [7], Settings(steps=3, height=64, width=64))
    assert images.shape == (1, 64, 64, 3) and images.std() > 0
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice: oneDNN")]
    assert len(notices) <= 1


@pytest.mark.usefixtures("one_thread")
def test_bf16_pipeline_runs_when_every_private_op_raises(private_ops_raise, tiny_ckpt, tiny_config_path):
    pipe = load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="bf16", say=lambda m: None)
    images, _ = pipe.generate(["a red circle"], [7], Settings(steps=3, height=64, width=64))
    assert images.shape == (1, 64, 64, 3) and images.std() > 0


# ---------------------------------------------------------------------------------------------- stale kernels
@pytest.mark.usefixtures("one_thread")
def test_switching_a_part_in_use_to_its_ema_weights_computes_with_them(tmp_path, tiny_io):
    """``ema_scope`` writes the EMA weights into the parameters in place; prepacked kernels must follow."""
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**tiny_state_dict(), **tiny_ema_state_dict()}}, full)
    config = tiny_config()
    config.model.params.use_ema = True
    model = load_model_from_config(config, full, as_stored=True)
    PartWeights(model.model, torch.float32, torch.contiguous_format).use()
    # The EMA model computed without any prepacking: the EMA weights loaded as the plain ones.
    ema = {k.removeprefix("model_ema."): v for k, v in tiny_ema_state_dict().items()}
    names = {name: name.replace(".", "") for name, _ in model.model.named_parameters()}
    ema_plain = tiny_state_dict()
    for name, flat in names.items():
        ema_plain[f"model.{name}"] = ema[flat]
    torch.save({"state_dict": ema_plain}, tmp_path / "ema.ckpt")
    reference = load_model_from_config(tiny_config(), tmp_path / "ema.ckpt")
    args = (tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
    with torch.no_grad():
        expected = reference.apply_model(*args)
        plain = model.apply_model(*args)  # packs the kernels
        assert any(m._packed is not None for m in model.model.modules() if isinstance(m, ops.Conv2d)) == \
            onednn.gate.usable("convolution", torch.float32)
        assert_matches_reference(plain, tiny_io["unet_eps"], "plain weights")
        with model.ema_scope():
            ours = model.apply_model(*args)
        after = model.apply_model(*args)
    assert (ours - plain).abs().max() > 100 * (1e-3 * expected.std() + 1e-5)  # the EMA weights do differ
    assert_matches_reference(ours, expected, "EMA weights of a part in use")
    assert_matches_reference(after, tiny_io["unet_eps"], "plain weights restored")


def test_a_packed_kernel_follows_an_in_place_write():
    conv = ops.Conv2d(8, 8, 3, padding=1)
    if not conv.prepack(torch.float32, torch.contiguous_format):
        pytest.skip("oneDNN computes no float32 convolution in this torch build")
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict({"weight": 2 * conv.weight, "bias": conv.bias})
        expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        torch.testing.assert_close(conv(x), expected)
