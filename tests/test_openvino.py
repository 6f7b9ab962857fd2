"""The OpenVINO backend (ldm/backend/openvino.py, ldm/inference/openvino.py): the original's outputs through
OpenVINO, and its cache.

The tiny model's four networks are converted once per module into a temporary cache (a few minutes on a 2-core
CPU); the full-size model's are ``slow``. Everything here is skipped where ``openvino`` is not installed.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.backend import openvino as ov_backend
from ldm.backend.openvino import OpenVINOConversionError
from ldm.inference.openvino import DecodeCall, OpenVINOModel, UNetCall
from ldm.inference.pipeline import Pipeline, Settings
from ldm.inference.precision import Precision
from ldm.inference.tiling import tiled_decode, tiled_encode
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from tests.conftest import FIXTURES, PROMPTS, assert_matches_reference

pytestmark = pytest.mark.skipif(not ov_backend.available(),
                                reason="openvino is not installed (pip install openvino: wheels for Linux x86-64 "
                                       "and ARM64, Windows x86-64 and macOS arm64)")
SAMPLING = dict(S=10, batch_size=2, shape=[4, 8, 8], verbose=False, unconditional_guidance_scale=7.5, eta=0.0)
FULL = Precision("full", torch.float32, None)


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def ov_tiny(tiny_model, ov_cache):
    """The tiny model through OpenVINO in float32, cached in ``ov_cache``; ``ov_tiny.notices`` holds what it said."""
    notices: list[str] = []
    model = OpenVINOModel(tiny_model, model_hash="tiny-reference", cache_dir=ov_cache, say=notices.append)
    model.notices = notices
    return model


def run_every_part(model, io) -> list[torch.Tensor]:
    """One call of each network: text encoder, UNet, encoder (moments), decoder."""
    return [model.get_learned_conditioning(PROMPTS), model.apply_model(io["unet_x"], io["unet_t"], io["cond"]),
            model.encode_first_stage(io["img"]).parameters, model.decode_first_stage(io["z_scaled"])]


def entry_of(cache, part: str):
    (entry,) = cache.glob(f"{part}-*")
    return entry


# ---------------------------------------------------------------------------------------------- golden outputs
def test_text_encoder_matches_the_original(ov_tiny, tiny_io):
    assert_matches_reference(ov_tiny.get_learned_conditioning(PROMPTS), tiny_io["cond"], "cond")
    assert_matches_reference(ov_tiny.get_learned_conditioning(["", ""]), tiny_io["uncond"], "uncond")


def test_unet_matches_the_original(ov_tiny, tiny_io):
    x, t, cond = tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"]
    for c in (cond, [cond], {"c_crossattn": [cond]}):  # the conditioning forms apply_model takes
        assert_matches_reference(ov_tiny.apply_model(x, t, c), tiny_io["unet_eps"], "unet_eps")


def test_autoencoder_matches_the_original(ov_tiny, tiny_io):
    posterior = ov_tiny.encode_first_stage(tiny_io["img"])
    assert_matches_reference(posterior.mean, tiny_io["post_mean"], "post_mean")
    assert_matches_reference(posterior.logvar, tiny_io["post_logvar"], "post_logvar")
    assert_matches_reference(ov_tiny.get_first_stage_encoding(posterior.mode()), tiny_io["z_scaled"], "z_scaled")
    assert_matches_reference(ov_tiny.decode_first_stage(tiny_io["z_scaled"]), tiny_io["decoded"], "decoded")


@pytest.mark.parametrize("sampler, key", [(DDIMSampler, "ddim_s10_eta0"), (PLMSSampler, "plms_s10")])
def test_samplers_match_the_original(ov_tiny, tiny_io, sampler, key):
    samples, _ = sampler(ov_tiny).sample(conditioning=tiny_io["cond"], unconditional_conditioning=tiny_io["uncond"],
                                         x_T=tiny_io["x_T"], **SAMPLING)
    assert samples.dtype == torch.float32
    assert_matches_reference(samples, tiny_io[key], key)


def test_img2img_matches_the_original(ov_tiny, tiny_io):
    sampler = DDIMSampler(ov_tiny)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    z_enc = sampler.stochastic_encode(tiny_io["z_scaled"], torch.tensor([7, 7]), noise=tiny_io["img2img_noise"])
    assert_matches_reference(z_enc, tiny_io["img2img_z_enc"], "img2img_z_enc")
    out = sampler.decode(z_enc, tiny_io["cond"], 7, unconditional_guidance_scale=7.5,
                         unconditional_conditioning=tiny_io["uncond"], verbose=False)
    assert_matches_reference(out, tiny_io["img2img_s10_strength075"], "img2img")


def test_dpm_solver_matches_torch(ov_tiny, tiny_model, tiny_io):
    """DPM-Solver++ passes fractional timesteps: they reach the OpenVINO UNet as the torch one computes them."""
    kwargs = dict(conditioning=tiny_io["cond"], unconditional_conditioning=tiny_io["uncond"], x_T=tiny_io["x_T"],
                  **SAMPLING)
    with torch.no_grad():
        ours, _ = DPMSolverSampler(ov_tiny).sample(**kwargs)
        reference, _ = DPMSolverSampler(tiny_model).sample(**kwargs)
    assert_matches_reference(ours, reference, "dpm_solver")


def test_tiled_decode_and_encode_match_torch(ov_tiny, tiny_model):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert_matches_reference(tiled_decode(ov_tiny, z, tile=8, overlap=4),
                                 tiled_decode(tiny_model, z, tile=8, overlap=4), "tiled decode")
        ours = tiled_encode(ov_tiny, image, tile=64, overlap=32).parameters
        reference = tiled_encode(tiny_model, image, tile=64, overlap=32).parameters
    assert_matches_reference(ours, reference, "tiled encode")


def test_pipeline_runs_on_the_openvino_model(ov_tiny, tiny_model, tiny_io, monkeypatch):
    """``Pipeline(OpenVINOModel(...), ...)`` as it stands: golden latents, and images within 2 of 255 levels of
    the torch backend's."""
    pipe = Pipeline(ov_tiny, torch.device("cpu"), FULL)
    monkeypatch.setattr(pipe, "noise", lambda seeds, shape, draws=1: [tiny_io["x_T"]])
    with torch.no_grad():
        latents = pipe.txt2img_latents(PROMPTS, [0, 1], Settings(steps=10, height=64, width=64))
    assert_matches_reference(latents, tiny_io["ddim_s10_eta0"], "ddim_s10_eta0")
    assert pipe.size_multiple == Pipeline(tiny_model, torch.device("cpu"), FULL).size_multiple
    settings = Settings(steps=5, height=64, width=64)
    images, _ = Pipeline(ov_tiny, torch.device("cpu"), FULL).generate(["a red circle"], [3], settings)
    reference, _ = Pipeline(tiny_model, torch.device("cpu"), FULL).generate(["a red circle"], [3], settings)
    assert np.abs(images.astype(int) - reference.astype(int)).max() <= 2


def test_a_network_is_compiled_only_while_its_stage_runs(tiny_model, ov_cache, monkeypatch):
    """As the torch backend sets its parts' weights aside, the pipeline on OpenVINO drops a network's compiled
    model once its stage is done: no compiled UNet while the autoencoder decodes (SD v1 in fp32: peak RSS 5.6 ->
    4.2 GB), nothing compiled once the batch is made; the next batch compiles from the cache, to the same images."""
    model = OpenVINOModel(tiny_model, model_hash="tiny-reference", cache_dir=ov_cache)
    compiled_at_decode = []
    decode = model.decode_first_stage

    def watched_decode(z, *args, **kwargs):
        compiled_at_decode.append({part.name: len(part._compiled) for part in model.parts})
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(model, "decode_first_stage", watched_decode)
    pipe, settings = Pipeline(model, torch.device("cpu"), FULL), Settings(steps=3, height=64, width=64)
    first, _ = pipe.generate(["a red circle", "a blue square"], [3, 4], settings)
    conversions = [part.conversions for part in model.parts]
    again, _ = pipe.generate(["a red circle", "a blue square"], [3, 4], settings)
    assert compiled_at_decode == 2 * [{"unet": 0, "decoder": 0, "encoder": 0, "text_encoder": 0}]
    assert all(not part._compiled for part in model.parts)
    assert [part.conversions for part in model.parts] == conversions
    np.testing.assert_array_equal(again, first)


# ---------------------------------------------------------------------------------------------- cache
def test_a_second_model_loads_from_the_cache(ov_tiny, tiny_model, tiny_io, ov_cache):
    first = run_every_part(ov_tiny, tiny_io)
    again = OpenVINOModel(tiny_model, model_hash="tiny-reference", cache_dir=ov_cache)
    for ours, reference in zip(run_every_part(again, tiny_io), first):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert [part.conversions for part in again.parts] == [0, 0, 0, 0]
    assert {e.name.split("-")[0] for e in ov_cache.iterdir()} == {"text_encoder", "unet", "decoder", "encoder"}


def test_a_new_shape_is_compiled_not_converted(ov_tiny, tiny_model, tiny_io, ov_cache):
    run_every_part(ov_tiny, tiny_io)
    conversions = ov_tiny.unet.conversions
    x, t, c = torch.randn(1, 4, 16, 24), torch.tensor([321]), tiny_io["cond"][:1]
    with torch.no_grad():
        assert_matches_reference(ov_tiny.apply_model(x, t, c), tiny_model.apply_model(x, t, c), "eps 16x24")
    assert ov_tiny.unet.conversions == conversions
    assert [(1, 4, 16, 24) in (s[0] for s in signature[1:]) for signature in ov_tiny.unet._compiled] == [True]


def test_the_cache_key_follows_checkpoint_weights_code_and_versions(ov_tiny, tiny_model, tiny_io, monkeypatch):
    inputs = (tiny_io["unet_x"], tiny_io["unet_t"].float(), tiny_io["cond"])
    key, description = ov_tiny.unet.key(inputs)
    assert description["part"] == "unet" and description["checkpoint"] == "tiny-reference"
    # one converted model serves every batch and latent size (each is compiled on its own)
    assert ov_tiny.unet.key((inputs[0][:1, :, :4], inputs[1][:1], inputs[2][:1]))[0] == key
    other_hash = OpenVINOModel(tiny_model, model_hash="another-checkpoint", cache_dir=None)
    assert other_hash.unet.key(inputs)[0] != key
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.model.diffusion_model.out[2].weight.add_(1e-3)
    changed_model = OpenVINOModel(changed, model_hash="tiny-reference", cache_dir=None)
    assert changed_model.unet.key(inputs)[0] != key
    assert changed_model.decoder.key([tiny_io["z_scaled"]])[0] == ov_tiny.decoder.key([tiny_io["z_scaled"]])[0]
    monkeypatch.setattr(ov_backend, "openvino_version", lambda: "0.0.0-other")
    assert ov_tiny.unet.key(inputs)[0] != key
    monkeypatch.undo()
    monkeypatch.setattr(ov_tiny.unet, "code", "the digest of edited model code")
    assert ov_tiny.unet.key(inputs)[0] != key


def test_damaged_entries_are_rebuilt(ov_tiny, tiny_model, tiny_io, ov_cache, tmp_path):
    first = run_every_part(ov_tiny, tiny_io)
    cache = tmp_path / "cache"
    shutil.copytree(ov_cache, cache)
    bin_file = entry_of(cache, "decoder") / "model.bin"
    with open(bin_file, "r+b") as f:  # cut short
        f.truncate(bin_file.stat().st_size // 2)
    (entry_of(cache, "text_encoder") / "meta.json").write_text("{not json")
    notices: list[str] = []
    again = OpenVINOModel(tiny_model, model_hash="tiny-reference", cache_dir=cache, say=notices.append)
    for ours, reference in zip(run_every_part(again, tiny_io), first):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert {p.name: p.conversions for p in again.parts} == {"text_encoder": 1, "unet": 0, "decoder": 1, "encoder": 0}
    assert sum("damaged" in n for n in notices) == 2
    for part in ("decoder", "text_encoder"):  # rewritten whole
        entry = entry_of(cache, part)
        ov_backend.check_entry(entry, json.loads((entry / "meta.json").read_text())["key"])
    assert not list(cache.glob(".tmp-*")) and not list(cache.glob(".trash-*"))


def test_an_entry_check_sees_a_changed_byte(tmp_path):
    entry = tmp_path / "unet-x"
    entry.mkdir()
    (entry / "model.xml").write_bytes(b"<net>" + bytes(range(256)) * 100 + b"</net>")
    (entry / "model.bin").write_bytes(bytes(1000))
    files = {name: ov_backend._file_record(entry / name) for name in ("model.xml", "model.bin")}
    (entry / "meta.json").write_text(json.dumps({"key": "k", "format": ov_backend.FORMAT, "files": files}))
    ov_backend.check_entry(entry, "k")
    with pytest.raises(ValueError, match="key"):
        ov_backend.check_entry(entry, "another key")
    data = bytearray((entry / "model.xml").read_bytes())
    data[1000] ^= 1
    (entry / "model.xml").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.xml"):
        ov_backend.check_entry(entry, "k")


def _stand_in_export(*args, path=None, write=None):
    """In place of :func:`export_to_openvino`: the model x -> relu(x), without a conversion's minutes; ``write``
    replaces OpenVINO's writer."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, 4, -1, -1], np.float32, name="z")
    model = ov.Model([ops.relu(x)], [x], "stand-in")
    if path is None:
        return model
    (write or ov.save_model)(model, path)


def test_an_interrupted_write_leaves_no_entry(tiny_model, tiny_io, tmp_path, monkeypatch):
    def interrupted(model, path):
        path.write_text("<net half written")
        raise KeyboardInterrupt

    model = OpenVINOModel(tiny_model, model_hash="tiny-reference", cache_dir=tmp_path)
    monkeypatch.setattr(ov_backend, "export_to_openvino",
                        lambda *args: _stand_in_export(path=args[-1], write=interrupted))
    with pytest.raises(KeyboardInterrupt):
        model.decoder._entry([tiny_io["z_scaled"]])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ov_backend, "export_to_openvino", lambda *args: _stand_in_export(path=args[-1]))
    entry = model.decoder._entry([tiny_io["z_scaled"]])
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "model.bin", "model.xml"]


def test_an_unwritable_cache_converts_in_memory(tiny_model, tiny_io, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    notices: list[str] = []
    model = OpenVINOModel(tiny_model, cache_dir=not_a_folder / "cache", say=notices.append)
    monkeypatch.setattr(ov_backend, "export_to_openvino", lambda *args: _stand_in_export(path=args[-1]))
    (out,) = model.decoder(-tiny_io["z_scaled"])  # the stand-in: relu
    torch.testing.assert_close(out, torch.relu(-tiny_io["z_scaled"]))
    assert model.decoder.entry is None and model.decoder.conversions == 1
    assert any("cannot write the OpenVINO cache" in n for n in notices)


def test_an_entry_superseded_by_other_code_or_versions_goes_once_unused(tiny_model, tiny_io, tmp_path, monkeypatch):
    """An upgrade or an edit of the model code leaves no converted copy behind: the same network of the same
    checkpoint made by other code, library versions or format is removed once unused for a day; other networks,
    checkpoints or inputs, an entry used within the day, and entries without a checkpoint hash stay."""
    monkeypatch.setattr(ov_backend, "export_to_openvino", lambda *args: _stand_in_export(path=args[-1]))
    z = tiny_io["z_scaled"]
    first = OpenVINOModel(tiny_model, model_hash="checkpoint-a", cache_dir=tmp_path)
    first.decoder(z)
    entry = first.decoder.entry
    meta = json.loads((entry / "meta.json").read_text())
    day = 24 * 3600

    def copy_of(name: str, idle: float, source: Path = entry, **describe) -> Path:
        other = tmp_path / f"decoder-{name}"
        shutil.copytree(source, other)
        changed = dict(meta, key=name, describe={**meta["describe"], **describe})
        (other / "meta.json").write_text(json.dumps(changed))
        os.utime(other, (time.time() - idle, time.time() - idle))
        return other

    old_code = copy_of("old-code", 2 * day, code="the digest of older model code")
    old_libraries = copy_of("old-libraries", 30 * day, openvino="2025.0.0", torch="2.9.0", format=0)
    in_use = copy_of("in-use", day / 2, code="the digest of another install's code")
    other_checkpoint = copy_of("other-checkpoint", 2 * day, checkpoint="checkpoint-b", code="older")
    other_inputs = copy_of("other-inputs", 2 * day, inputs=["torch.float16[-1, 4, -1, -1]"], code="older")
    os.utime(entry, (time.time() - 2 * day, time.time() - 2 * day))

    notices: list[str] = []
    again = OpenVINOModel(tiny_model, model_hash="checkpoint-a", cache_dir=tmp_path, say=notices.append)
    again.decoder(z)
    assert again.decoder.entry == entry and again.decoder.conversions == 0
    assert time.time() - entry.stat().st_mtime < 3600  # marked used
    assert not old_code.exists() and not old_libraries.exists()
    assert in_use.exists() and other_checkpoint.exists() and other_inputs.exists()
    assert sorted(notices) == [f"notice: removed decoder-{name} from the OpenVINO cache (superseded by {entry.name})"
                               for name in ("old-code", "old-libraries")]
    assert not list(tmp_path.glob(".trash-*"))

    unhashed = copy_of("unhashed", 0, checkpoint=None)
    unhashed_old = copy_of("unhashed-old", 2 * day, checkpoint=None, code="older")
    assert ov_backend.remove_superseded(unhashed) == [] and unhashed_old.exists()


def test_a_model_stored_in_bfloat16_converts_to_the_same_float32_network(tiny_model, tiny_io, tmp_path):
    """Weights stored in another dtype are traced as float32 copies; the IR is written while they live (the
    converted model shares their memory), and an in-memory conversion owns its weights."""
    stored = copy.deepcopy(tiny_model.first_stage_model).to(torch.bfloat16)
    reference = copy.deepcopy(stored).float()
    call, reference_call = DecodeCall(stored, 0.5), DecodeCall(reference, 0.5)
    axes = [{0: ("batch", 1), 2: ("height", 1), 3: ("width", 1)}]
    z = tiny_io["z_scaled"][:1]
    with torch.no_grad():
        expected = reference_call(z)
    for cache in (tmp_path, None):
        part = ov_backend.OpenVINOPart("decoder", call, stored, axes, cache_dir=cache)
        (out,) = part(z)
        assert_matches_reference(out, expected, f"decoded (cache {cache})")
    assert stored.decoder.conv_in.weight.dtype == torch.bfloat16


def test_a_failed_compile_is_one_line_naming_the_torch_backend(monkeypatch):
    class Core:
        def compile_model(self, *args):
            raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:117:\nException from x.cpp:54:\n"
                               "Arguments do not have the same element type\n\n")

    monkeypatch.setattr(ov_backend, "core", Core)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    part = ov_backend.OpenVINOPart("decoder", conv, conv, [{0: ("batch", 1)}], cache_dir=None)
    with pytest.raises(OpenVINOConversionError) as err:
        part(torch.zeros(1, 3, 8, 8))
    assert str(err.value) == ("OpenVINO cannot compile the decoder (f32): Arguments do not have the same element "
                              "type; the torch backend runs this model (--backend torch)")


def test_a_network_openvino_cannot_compile_falls_back_to_torch_when_asked(monkeypatch):
    """``fallback`` (what ``--backend auto`` asks): one notice, then the network computes in torch, float32."""
    class Core:
        def compile_model(self, *args):
            raise RuntimeError("Arguments do not have the same element type")

    monkeypatch.setattr(ov_backend, "core", Core)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(torch.bfloat16)
    expected = torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8), conv.weight.float(), conv.bias.float(), padding=1)
    notices: list[str] = []
    part = ov_backend.OpenVINOPart("decoder", conv, conv, [{0: ("batch", 1)}], say=notices.append, fallback=True)
    for _ in range(2):
        (out,) = part(torch.ones(1, 3, 8, 8))
        assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)
    assert len(notices) == 2 and notices[0].startswith("converting the decoder")
    assert notices[1].startswith("notice: OpenVINO cannot compile the decoder (f32): Arguments do not")


# ---------------------------------------------------------------------------------------------- what is traced
def test_the_traced_unet_is_plain_ops_even_with_the_fast_paths_set_up(tiny_ckpt, tiny_io):
    """With the weights prepared as the CPU pipeline prepares them (prepacked oneDNN kernels, Winograd-eligible
    convolutions), ``torch.export`` records torch's public ops only, and that graph computes the original's
    numbers."""
    from ldm.inference.residency import PartWeights
    from ldm.loading.build import load_model_from_config
    from tests.conftest import tiny_config

    model = load_model_from_config(tiny_config(), tiny_ckpt)
    PartWeights(model.model, torch.float32, torch.contiguous_format).use()
    assert any(getattr(m, "compute", None) for m in model.model.modules())
    call = UNetCall(model.model.diffusion_model)
    args = (tiny_io["unet_x"], tiny_io["unet_t"].float(), tiny_io["cond"])
    with torch.no_grad():
        exported = torch.export.export(call, args, strict=False)
        ov_backend.check_plain_ops(exported, "unet")
        assert_matches_reference(exported.module()(*args), tiny_io["unet_eps"], "unet_eps")


def test_a_private_op_in_the_graph_is_refused():
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("this torch build has no oneDNN linear op")

    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.linear.weight, self.linear.bias, "none", [], "")

    with torch.no_grad():
        exported = torch.export.export(Fused(), (torch.randn(2, 8),), strict=False)
    with pytest.raises(OpenVINOConversionError, match="mkldnn::_linear_pointwise"):
        ov_backend.check_plain_ops(exported, "test module")


def test_geglu_exports_as_two_matmuls_without_a_split():
    """OpenVINO runs a split of one matmul's output with a reference kernel (16 of them: 1.5 % of an SD v1 UNet
    step); the exported GEGLU is two matmuls of the projection's halves, with eager's values."""
    from ldm.modules.attention import GEGLU

    geglu, x = GEGLU(8, 16).eval(), torch.randn(2, 5, 8)
    with torch.no_grad():
        exported = torch.export.export(geglu, (x,), strict=False)
        torch.testing.assert_close(exported.module()(x), geglu(x))
    ops = [n.target._opname for n in exported.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert ops.count("linear") == 2 and not {"split", "split_with_sizes", "chunk"} & set(ops), ops


def test_conversion_leaves_no_traced_values_in_the_model(tiny_model, tiny_io):
    """The decoder keeps the shape of its last input (the original's ``last_z_shape``); traced with symbolic
    shapes, that was left symbolic and the model could no longer be copied."""
    model = copy.deepcopy(tiny_model)
    before = model.first_stage_model.decoder.last_z_shape if hasattr(model.first_stage_model.decoder,
                                                                    "last_z_shape") else None
    OpenVINOModel(model, cache_dir=None).decode_first_stage(tiny_io["z_scaled"])
    assert getattr(model.first_stage_model.decoder, "last_z_shape", None) == before
    copy.deepcopy(model)


def test_weights_are_traced_in_float32_and_restored():
    module = torch.nn.Linear(4, 4).to(torch.bfloat16)
    stored = module.weight.data_ptr()
    with ov_backend.float32_weights(module):
        assert module.weight.dtype == torch.float32 and module.bias.dtype == torch.float32
    assert module.weight.data_ptr() == stored and module.bias.dtype == torch.bfloat16


def test_precision_names(tiny_model):
    assert ov_backend.inference_precision_hint("fp32") == "f32"
    with pytest.raises(ValueError, match="unknown"):
        ov_backend.inference_precision_hint("fp8")
    if not ov_backend.cpu_computes_bf16():
        with pytest.raises(ValueError, match="bfloat16"):
            OpenVINOModel(tiny_model, precision="bf16", cache_dir=None)


def test_conversion_ignores_the_callers_autocast():
    """The pipeline converts a network at its first call, inside its bf16 autocast: the graph must not take the
    autocast's bf16 casts (OpenVINO's bf16 is its compile hint; with the casts its bf16 compile failed)."""
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = ov_backend.export_to_openvino(module, [torch.zeros(1, 3, 8, 8)], [None], "test network")
    types = {str(out.get_element_type()) for op in model.get_ordered_ops() for out in op.outputs()}
    assert "<Type: 'bfloat16'>" not in types and "<Type: 'float32'>" in types


def test_bf16_under_the_pipelines_autocast(tiny_model, tiny_io):
    if not ov_backend.cpu_computes_bf16():
        pytest.skip("this CPU has no bfloat16 arithmetic OpenVINO uses (AVX512-BF16 or AMX)")
    model = OpenVINOModel(tiny_model, precision="bf16", model_hash="tiny-reference", cache_dir=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as Pipeline.generate runs it at --precision bf16
        eps = model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
    assert (eps - tiny_io["unet_eps"]).norm() / tiny_io["unet_eps"].norm() < 2e-2


def test_bf16_is_close_to_the_original(tiny_model, tiny_io, ov_cache):
    if not ov_backend.cpu_computes_bf16():
        pytest.skip("this CPU has no bfloat16 arithmetic OpenVINO uses (AVX512-BF16 or AMX)")
    model = OpenVINOModel(tiny_model, precision="bf16", model_hash="tiny-reference", cache_dir=ov_cache)
    for ours, key in ((model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"]), "unet_eps"),
                      (model.decode_first_stage(tiny_io["z_scaled"]), "decoded")):
        assert (ours - tiny_io[key]).norm() / tiny_io[key].norm() < 2e-2, key


# ---------------------------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_full_model_matches_the_original(tmp_path_factory):
    """Full-size SD v1 on the reference's deterministic weights through OpenVINO in float32 (several GB of RAM
    and disk, minutes), then loaded again from the cache without converting."""
    from omegaconf import OmegaConf

    from ldm.loading.build import load_model_from_config
    from ldm.testing.deterministic_weights import write_deterministic_checkpoint

    config = OmegaConf.load("configs/stable-diffusion/v1-inference.yaml")
    path = tmp_path_factory.mktemp("full") / "sd-v1-det.ckpt"
    write_deterministic_checkpoint(config, path, seed=0)
    cache = tmp_path_factory.mktemp("full-openvino")
    io = load_file(FIXTURES / "full" / "io.safetensors")
    model = load_model_from_config(config, path)
    for attempt in range(2):
        ov_model = OpenVINOModel(model, model_hash="full-det-0", cache_dir=cache)
        assert_matches_reference(ov_model.get_learned_conditioning(["a photograph of an astronaut riding a horse", ""]),
                                 io["cond"], "cond")
        eps = ov_model.apply_model(io["unet_x"], io["unet_t"], io["cond"][:1].expand(2, -1, -1))
        assert_matches_reference(eps, io["unet_eps"], "unet_eps")
        posterior = ov_model.encode_first_stage(io["img"])
        assert_matches_reference(posterior.mean, io["post_mean"], "post_mean")
        assert_matches_reference(posterior.logvar, io["post_logvar"], "post_logvar")
        assert_matches_reference(ov_model.decode_first_stage(io["z"]), io["decoded"], "decoded")
        assert [p.conversions for p in ov_model.parts] == ([1, 1, 1, 1] if attempt == 0 else [0, 0, 0, 0])
        ov_model.release()
    path.unlink()


# ---------------------------------------------------------------------------------------------- --backend
def test_backend_choice(monkeypatch):
    from ldm.errors import InputError
    from ldm.inference.pipeline import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "full") == ("auto", FULL)  # settled on the loaded model: auto_backend
    assert resolve_backend("openvino", cpu, "full")[0] == "openvino"
    with pytest.raises(InputError, match="runs on the CPU; use --device cpu"):
        resolve_backend("openvino", torch.device("meta"), "full")
    with pytest.raises(InputError, match="fp32 or bf16"):
        resolve_backend("openvino", cpu, "fp16")
    with pytest.raises(InputError, match="unknown backend 'onnx'"):
        resolve_backend("onnx", cpu, "full")
    monkeypatch.setattr(ov_backend, "cpu_computes_bf16", lambda: False)
    with pytest.raises(InputError, match="use --precision full"):
        resolve_backend("openvino", cpu, "bf16")
    monkeypatch.setattr("ldm.inference.precision.computes_bf16_natively", lambda: True)
    assert resolve_backend("openvino", cpu, "autocast")[1].label == "fp32"  # the best OpenVINO computes here
    monkeypatch.setattr(ov_backend, "available", lambda: False)
    with pytest.raises(InputError, match="pip install openvino"):
        resolve_backend("openvino", cpu, "full")


def test_auto_is_openvino_where_it_was_measured_faster(monkeypatch, tiny_model):
    """``--backend auto``: OpenVINO for an SD-sized UNet on an AVX-512 CPU with the memory to convert it; torch for
    a small model, on AVX2, off the CPU, short of memory, or in a bf16 that OpenVINO cannot compute."""
    from ldm.backend import memory
    from ldm.inference import pipeline
    from ldm.inference.precision import resolve_precision

    cpu = torch.device("cpu")
    bf16 = resolve_precision("bf16", cpu)
    assert pipeline.auto_backend(tiny_model, cpu, FULL) == "torch"  # far below SD v1's 860 M UNet parameters
    monkeypatch.setattr(pipeline, "OPENVINO_AUTO_MIN_PARAMETERS", 1000)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2 ** 40)
    monkeypatch.setattr(ov_backend, "cpu_computes_bf16", lambda: True)
    assert pipeline.auto_backend(tiny_model, cpu, FULL) == "openvino"
    assert pipeline.auto_backend(tiny_model, cpu, bf16) == "openvino"
    assert pipeline.auto_backend(tiny_model, torch.device("cuda"), FULL) == "torch"
    monkeypatch.setattr(ov_backend, "cpu_computes_bf16", lambda: False)
    assert pipeline.auto_backend(tiny_model, cpu, bf16) == "torch"
    weights = 4 * sum(p.numel() for p in tiny_model.parameters())
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: int(1.5 * weights))
    assert pipeline.auto_backend(tiny_model, cpu, FULL) == "torch"
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 3 * weights)
    assert pipeline.auto_backend(tiny_model, cpu, FULL) == "openvino"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert pipeline.auto_backend(tiny_model, cpu, FULL) == "torch"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")

    def broken():
        raise ImportError("libopenvino.so.2026.4.1: cannot open shared object file")

    monkeypatch.setattr(ov_backend, "core", broken)
    assert pipeline.auto_backend(tiny_model, cpu, FULL) == "torch"
    monkeypatch.setattr(ov_backend, "available", lambda: False)
    assert pipeline.auto_backend(tiny_model, cpu, FULL) == "torch"


def test_load_pipeline_takes_autos_choice(monkeypatch, tiny_config_path, tiny_ckpt, tmp_path):
    """``load_pipeline(backend="auto")`` settles on the loaded model: OpenVINO (said, with the torch fallback on)
    where :func:`auto_backend` picks it, the torch backend where not."""
    from ldm.inference import pipeline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    said: list[str] = []
    monkeypatch.setattr(pipeline, "auto_backend", lambda model, device, prec: "openvino")
    pipe = pipeline.load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full", say=said.append)
    assert isinstance(pipe.model, OpenVINOModel) and all(part.fallback for part in pipe.model.parts)
    assert any(m.startswith("backend: OpenVINO (--backend auto") for m in said)
    explicit = pipeline.load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full", backend="openvino")
    assert not any(part.fallback for part in explicit.model.parts)  # asked for by name: its errors are the user's
    monkeypatch.setattr(pipeline, "auto_backend", lambda model, device, prec: "torch")
    assert not isinstance(pipeline.load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full").model,
                          OpenVINOModel)


# ---------------------------------------------------------------------------------------------- a run from the record
@pytest.fixture(scope="module")
def recorded_cache(tmp_path_factory, tiny_config_path, tiny_ckpt):
    """A cache in which a pipeline ran once on OpenVINO (converting, and recording the model), made once per
    module: (its folder, the images of that run)."""
    from ldm.inference import pipeline

    folder = tmp_path_factory.mktemp("recorded") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        first = pipeline.load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full",
                                       backend="openvino", say=lambda message: None)
        assert first.model.__dict__["_torch_model"] is not None
        images, _ = first.generate(["a red circle"], [3], Settings(steps=5, height=64, width=64))
    assert len(list((folder / "ldm" / "openvino" / "models").glob("*.json"))) == 1
    return folder, images


@pytest.fixture
def recorded(recorded_cache, monkeypatch, tmp_path, tiny_config_path, tiny_ckpt):
    """A copy of :func:`recorded_cache` of this test's own (``tmp_path / "cache"``); returns (the images of the
    recording run, a function that loads the pipeline again from it)."""
    from ldm.inference import pipeline

    folder, images = recorded_cache
    shutil.copytree(folder, tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def load(backend="openvino"):
        return pipeline.load_pipeline(tiny_config_path, tiny_ckpt, device="cpu", precision="full",
                                      backend=backend, say=lambda message: None)

    return images, load


def test_a_second_run_builds_no_torch_model(recorded, tiny_model, tiny_io, monkeypatch):
    """From its record, the model runs with no torch model (nor Lightning's import): the same images, the
    original's latents, its schedule and sizes."""
    images, load = recorded
    pipe = load()
    model = pipe.model
    assert isinstance(model, OpenVINOModel) and model.__dict__["_torch_model"] is None
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod"):
        assert torch.equal(getattr(model, name), getattr(tiny_model, name)), name
    assert (model.num_timesteps, model.scale_factor, model.channels) == \
        (tiny_model.num_timesteps, tiny_model.scale_factor, tiny_model.channels)
    reference = Pipeline(tiny_model, torch.device("cpu"), FULL)
    assert (pipe.size_multiple, pipe.downsampling_factor, pipe.latent_channels) == \
        (reference.size_multiple, reference.downsampling_factor, reference.latent_channels)
    text = "a red circle " * 30
    assert pipe.prompt_tokenizer.count_tokens(text) == tiny_model.cond_stage_model.count_tokens(text) > 77
    again, _ = pipe.generate(["a red circle"], [3], Settings(steps=5, height=64, width=64))
    np.testing.assert_array_equal(again, images)
    monkeypatch.setattr(pipe, "noise", lambda seeds, shape, draws=1: [tiny_io["x_T"]])
    with torch.no_grad():
        latents = pipe.txt2img_latents(PROMPTS, [0, 1], Settings(steps=10, height=64, width=64))
    assert_matches_reference(latents, tiny_io["ddim_s10_eta0"], "ddim_s10_eta0")
    assert model.__dict__["_torch_model"] is None and [p.conversions for p in model.parts] == [0, 0, 0, 0]


def test_what_only_the_torch_model_has_builds_it(recorded, tiny_model, tiny_io):
    """Image-to-image on a recorded model converts the encoder from a torch model built then (the original's
    posterior), and the record gains it; an attribute only the torch model has builds it too."""
    _, load = recorded
    model = load().model
    posterior = model.encode_first_stage(tiny_io["img"])
    assert model.__dict__["_torch_model"] is not None and model.encoder.conversions == 1
    assert_matches_reference(posterior.mean, tiny_io["post_mean"], "post_mean")
    again = load().model
    again.encode_first_stage(tiny_io["img"])
    assert again.__dict__["_torch_model"] is None and again.encoder.conversions == 0
    assert again.first_stage_model.embed_dim == tiny_model.first_stage_model.embed_dim  # built for the asking


def test_a_record_is_used_only_as_it_was_written(recorded, monkeypatch, tmp_path):
    """Other library versions, edited model code, a damaged cache entry: the torch model is built, and the run
    is the torch-built one's."""
    images, load = recorded
    monkeypatch.setattr(ov_backend, "openvino_version", lambda: "0.0.0-other")
    assert load().model.__dict__["_torch_model"] is not None
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (record,) = (tmp_path / "cache" / "ldm" / "openvino" / "models").glob("*.json")
    data = json.loads(record.read_text())
    assert load().model.__dict__["_torch_model"] is None
    good = json.loads(record.read_text())
    data["code"]["sha256"] = "0" * 64  # as if a file of the model's code had changed since
    record.write_text(json.dumps(data))
    assert load().model.__dict__["_torch_model"] is not None
    for broken in ({**good, "facts": {"tokenizer": good["facts"]["tokenizer"]}}, [1, 2]):  # JSON, not a record
        record.write_text(json.dumps(broken))
        assert load().model.__dict__["_torch_model"] is not None
    pipe = load()
    pipe.generate(["a red circle"], [3], Settings(steps=5, height=64, width=64))  # writes the record again
    assert load().model.__dict__["_torch_model"] is None
    unet = entry_of(tmp_path / "cache" / "ldm" / "openvino", "unet")
    with open(unet / "model.bin", "r+b") as f:
        f.truncate(unet.joinpath("model.bin").stat().st_size // 2)
    pipe = load()
    assert pipe.model.__dict__["_torch_model"] is not None
    again, _ = pipe.generate(["a red circle"], [3], Settings(steps=5, height=64, width=64))
    np.testing.assert_array_equal(again, images)


def test_auto_takes_a_recorded_model_where_it_picks_openvino(recorded, monkeypatch):
    from ldm.inference import pipeline

    _, load = recorded
    monkeypatch.setattr(pipeline, "auto_backend_for", lambda *args: "openvino")
    model = load(backend="auto").model
    assert isinstance(model, OpenVINOModel) and model.__dict__["_torch_model"] is None
    assert all(part.fallback for part in model.parts)
    monkeypatch.setattr(pipeline, "auto_backend_for", lambda *args: "torch")
    assert not isinstance(load(backend="auto").model, OpenVINOModel)


def test_the_script_on_openvino_makes_the_torch_backends_images(tmp_path):
    """The README's main command (the embedded toy model) with ``--backend openvino``: the torch backend's images
    within 2 of 255 levels, fp32 (a second run's cache use: test_a_second_model_loads_from_the_cache)."""
    root = Path(__file__).resolve().parents[1]
    toy = root / "models" / "ldm" / "toy-shapes"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    runs = {}
    for backend in ("openvino", "torch"):
        out = tmp_path / backend
        cmd = [sys.executable, "scripts/txt2img.py", "--config", str(toy / "config.yaml"), "--ckpt",
               str(toy / "model.ckpt"), "--prompt", "a red circle on a white background", "--H", "64", "--W", "64",
               "--ddim_steps", "10", "--n_samples", "2", "--n_iter", "1", "--precision", "full", "--skip_grid",
               "--backend", backend, "--outdir", str(out)]
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("converting the unet to OpenVINO" in result.stdout) == (backend == "openvino")
        assert list((tmp_path / "cache" / "ldm" / "openvino").glob("unet-*"))  # converted into the user's cache
        samples = sorted((out / "samples").glob("*.png"))
        runs[backend] = [np.asarray(Image.open(p).convert("RGB")).astype(np.int16) for p in samples]
    assert len(runs["openvino"]) == len(runs["torch"]) == 2
    for ov, reference in zip(runs["openvino"], runs["torch"]):
        assert reference.std() > 10 and np.abs(ov - reference).max() <= 2
