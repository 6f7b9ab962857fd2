"""Model parts that hold their compute weights only while in use (ldm.inference.residency), and the CPU pipeline's
use of them."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ldm.backend.layout import is_conv_kernel
from ldm.backend.memory import tuned_allocator
from ldm.backend.onednn import gate
from ldm.inference.pipeline import Pipeline, Settings, load_pipeline
from ldm.inference.precision import resolve_precision
from ldm.inference.residency import PartWeights
from ldm.loading.build import load_model_from_config
from ldm.modules.ops import Conv2d, kernel_dtype
from tests.conftest import assert_matches_reference, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def stored_unet(tiny_ckpt):
    model = load_model_from_config(tiny_config(), tiny_ckpt, as_stored=True)
    return model, model.model


def test_as_stored_loading_keeps_the_file_tensors(tiny_ckpt):
    model = load_model_from_config(tiny_config(), tiny_ckpt, as_stored=True, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the file's dtype; dtype is ignored
    assert model.alphas_cumprod.dtype == torch.float32


def test_a_part_computes_in_its_dtype_and_layout_only_while_in_use(tiny_ckpt, tiny_io):
    _, unet = stored_unet(tiny_ckpt)
    stored = {name: p.data for name, p in unet.named_parameters()}
    convs = [m for m in unet.modules() if isinstance(m, Conv2d) and is_conv_kernel(m.weight)]
    weights = PartWeights(unet, torch.bfloat16, torch.channels_last)
    packs = gate.usable("convolution", torch.bfloat16)  # where oneDNN computes bf16 on this CPU
    for _ in range(2):  # a part can be used again after being set aside
        weights.use()
        for name, p in unet.named_parameters():
            if is_conv_kernel(p) and packs:  # kept as stored; the convolution computes from its own prepacked copy
                assert p.data_ptr() == stored[name].data_ptr()
            else:
                assert p.dtype == torch.bfloat16 and torch.equal(p, stored[name].to(torch.bfloat16))
                assert not is_conv_kernel(p) or p.is_contiguous(memory_format=torch.channels_last)
        assert convs and all(c.compute == ((torch.bfloat16, torch.channels_last) if packs else None) for c in convs)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            unet.diffusion_model(tiny_io["unet_x"], tiny_io["unet_t"], context=tiny_io["cond"])
        assert all((c._packed is not None) == packs for c in convs)
        weights.set_aside()
        assert all(c.compute is None and c._packed is None for c in convs)
        for name, p in unet.named_parameters():
            assert p.data_ptr() == stored[name].data_ptr() and p.dtype == torch.float32


def test_prepacked_float32_convolutions_match_the_original(tiny_ckpt, tiny_io):
    model = load_model_from_config(tiny_config(), tiny_ckpt, as_stored=True)
    for part in (model.model, model.first_stage_model):
        PartWeights(part, torch.float32, torch.contiguous_format).use()
    with torch.no_grad():
        eps = model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
        decoded = model.decode_first_stage(tiny_io["z_scaled"])
    assert all(m._packed is not None for m in model.model.modules() if isinstance(m, Conv2d) and m.compute)
    assert_matches_reference(eps, tiny_io["unet_eps"], "unet_eps")
    assert_matches_reference(decoded, tiny_io["decoded"], "decoded")


def test_prepacking_is_dropped_by_a_cast_and_never_used_with_autograd():
    conv = Conv2d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    expected = conv(x)
    assert conv.prepack(torch.float32, torch.contiguous_format)
    out = conv(x)  # autograd on: the plain convolution
    assert conv._packed is None and out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected.detach())
    assert conv._packed is not None
    conv.double()
    assert conv.compute is None and conv._packed is None
    assert not Conv2d(4, 8, 3, groups=2).prepack(torch.float32, torch.contiguous_format)


def test_weights_that_need_no_conversion_are_not_copied(tiny_ckpt):
    _, unet = stored_unet(tiny_ckpt)
    pointers = [p.data_ptr() for p in unet.parameters()]
    PartWeights(unet, torch.float32, torch.contiguous_format).use()
    assert [p.data_ptr() for p in unet.parameters()] == pointers


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_setting_a_part_aside_returns_its_converted_memory_to_the_system():
    """Even with the C heap told to keep freed memory (as a CPU run does)."""
    def anon_bytes() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    with tuned_allocator():
        part = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)])  # 64 MiB fp32
        weights = PartWeights(part, torch.bfloat16, torch.contiguous_format)
        weights.use()  # 32 MiB of bf16 copies
        in_use = anon_bytes()
        weights.set_aside()
        assert in_use - anon_bytes() > 24 << 20


def generate(pipe: Pipeline) -> np.ndarray:
    settings = Settings(steps=3, height=64, width=64)
    images, _ = pipe.generate(["a red circle", "a blue square"], [1, 2], settings)
    return images


def test_cpu_pipeline_converts_each_part_while_it_runs_with_the_same_images(tiny_ckpt, tiny_config_path, monkeypatch):
    pipe = load_pipeline(tiny_config_path, tiny_ckpt, "cpu", "bf16", "off", say=lambda m: None)
    model = pipe.model
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # nothing converted at load

    def dtypes():  # what each part computes in: its weights', its convolutions' prepacked kernels'
        parts = (model.cond_stage_model, model.model, model.first_stage_model)
        weights = tuple(next(p.dtype for p in part.parameters() if not is_conv_kernel(p)) for part in parts)
        kernels = tuple(frozenset(kernel_dtype(c) for c in part.modules() if isinstance(c, Conv2d))
                        for part in parts[1:])
        return weights + kernels

    seen = {}
    for name in ("get_learned_conditioning", "apply_model", "decode_first_stage"):
        method = getattr(model, name)

        def spy(*args, _name=name, _method=method, **kwargs):
            seen.setdefault(_name, set()).add(dtypes())
            return _method(*args, **kwargs)
        monkeypatch.setattr(model, name, spy)
    on_demand = generate(pipe)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert seen == {"get_learned_conditioning": {(bf16, fp32, fp32, frozenset({fp32}), frozenset({fp32}))},
                    "apply_model": {(fp32, bf16, fp32, frozenset({bf16}), frozenset({fp32}))},
                    "decode_first_stage": {(fp32, fp32, bf16, frozenset({fp32}), frozenset({bf16}))}}
    assert dtypes() == (fp32, fp32, fp32, frozenset({fp32}), frozenset({fp32}))
    monkeypatch.undo()

    # the same model with every weight converted at load, as on CUDA
    cast = load_model_from_config(tiny_config(), tiny_ckpt, dtype=bf16, memory_format=torch.channels_last)
    at_load = generate(Pipeline(cast, torch.device("cpu"), resolve_precision("bf16", torch.device("cpu"))))
    np.testing.assert_array_equal(on_demand, at_load)
