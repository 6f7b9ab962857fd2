"""Model parts that hold their compute weights only while in use (ldm.residency) and the CPU pipeline's use of them."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ldm.checkpoint import load_model_from_config
from ldm.pipeline import Pipeline, Settings, load_pipeline, resolve_precision
from ldm.precision import is_conv_kernel, tune_cpu_allocator
from ldm.residency import PartWeights
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def stored_unet(tiny_ckpt):
    model = load_model_from_config(tiny_config(), tiny_ckpt, as_stored=True)
    return model, model.model


def test_as_stored_loading_keeps_the_file_tensors(tiny_ckpt):
    model = load_model_from_config(tiny_config(), tiny_ckpt, as_stored=True, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the file's dtype; dtype is ignored
    assert model.alphas_cumprod.dtype == torch.float32


def test_a_part_computes_in_its_dtype_and_layout_only_while_in_use(tiny_ckpt):
    _, unet = stored_unet(tiny_ckpt)
    stored = {name: p.data for name, p in unet.named_parameters()}
    weights = PartWeights(unet, torch.bfloat16, torch.channels_last)
    for _ in range(2):  # a part can be used again after being set aside
        weights.use()
        for name, p in unet.named_parameters():
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, stored[name].to(torch.bfloat16))
            if is_conv_kernel(p):
                assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        weights.set_aside()
        for name, p in unet.named_parameters():
            assert p.data_ptr() == stored[name].data_ptr() and p.dtype == torch.float32


def test_weights_that_need_no_conversion_are_not_copied(tiny_ckpt):
    _, unet = stored_unet(tiny_ckpt)
    pointers = [p.data_ptr() for p in unet.parameters()]
    PartWeights(unet, torch.float32, torch.contiguous_format).use()
    assert [p.data_ptr() for p in unet.parameters()] == pointers


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_setting_a_part_aside_returns_its_converted_memory_to_the_system():
    """Even with the C heap told to keep freed memory (as the pipeline does on the CPU)."""
    tune_cpu_allocator()

    def anon_bytes() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    part = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)])  # 64 MiB float32
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

    def dtypes():
        return tuple(next(part.parameters()).dtype
                     for part in (model.cond_stage_model, model.model, model.first_stage_model))

    seen = {}
    for name in ("get_learned_conditioning", "apply_model", "decode_first_stage"):
        method = getattr(model, name)

        def spy(*args, _name=name, _method=method, **kwargs):
            seen.setdefault(_name, set()).add(dtypes())
            return _method(*args, **kwargs)
        monkeypatch.setattr(model, name, spy)
    on_demand = generate(pipe)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert seen == {"get_learned_conditioning": {(bf16, fp32, fp32)}, "apply_model": {(fp32, bf16, fp32)},
                    "decode_first_stage": {(fp32, fp32, bf16)}}
    assert dtypes() == (fp32, fp32, fp32)
    monkeypatch.undo()

    # the same model with every weight converted at load, as on CUDA
    cast = load_model_from_config(tiny_config(), tiny_ckpt, dtype=bf16, memory_format=torch.channels_last)
    at_load = generate(Pipeline(cast, torch.device("cpu"), resolve_precision("bf16", torch.device("cpu"))))
    np.testing.assert_array_equal(on_demand, at_load)
