"""Reduced precision: device/dtype choices, the fp32 decode fallback, and how far bf16 samples are from fp32.

Stated distances (measured on this code, bounds with about 2x margin):
- tiny model, DDIM 10 steps, guidance 7.5: bf16 latents within 3 % (relative L2) of fp32, images 41 dB PSNR;
- full-size SD v1 on the deterministic weights (slow): UNet eps within 1.4 %, DDIM 4 steps at 16x16 latents
  within 2.3 %, decoded images 42 dB PSNR.
Two different seeds in fp32 are 137 % apart (9 dB): the bounds separate "same sample" from "another sample".
"""
from __future__ import annotations

import mmap
import os
import time

import pytest
import torch

from ldm.backend import memory, onednn
from ldm.backend.layout import preferred_memory_format
from ldm.inference import precision
from ldm.loading.build import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler
from tests.conftest import PROMPTS, mapping_rss, tiny_config

LATENT_BOUND, PSNR_BOUND = 0.06, 35.0


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] mapped to [0, 1] as the pipeline saves them."""
    a, b = ((a.float() + 1) / 2).clamp(0, 1), ((b.float() + 1) / 2).clamp(0, 1)
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("AVX512_CORE", False), ("avx512_core_vnni", False),
                                         ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("", True)])
def test_bf16_counts_as_native_only_where_the_cap_allows_it(monkeypatch, cap, native):
    """On a CPU with AVX512-BF16 (stood in for), ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 means no native bf16."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(onednn.gate, "computes", lambda dtype: True)
    assert onednn.computes_bf16_natively() == native


def test_bf16_is_not_native_without_the_instructions_or_onednn(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not onednn.computes_bf16_natively()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(onednn.gate, "computes", lambda dtype: dtype == torch.float32)
    assert not onednn.computes_bf16_natively()


def test_onednn_gate_follows_what_onednn_computes_here():
    """float32 wherever torch has oneDNN; bf16 exactly where torch's oneDNN says so (it honours the ISA cap)."""
    gate = onednn.Gate()
    assert gate.computes(torch.float32) == torch.backends.mkldnn.is_available()
    assert gate.computes(torch.bfloat16) == (gate.present and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not gate.computes(torch.float16)


def test_a_failing_fast_path_switches_to_the_public_op_once(capsys):
    gate = onednn.Gate()
    calls = []

    def broken():
        calls.append("fast")
        raise RuntimeError("could not create a primitive descriptor\nmore")

    assert gate.run("linear", torch.float32, broken, lambda: torch.ones(1)).item() == 1
    assert gate.run("convolution", torch.float32, broken, lambda: torch.zeros(1)).item() == 0
    assert not gate.usable("linear", torch.float32) and not gate.usable("convolution", torch.float32)
    assert calls == ["fast", "fast"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("notice: oneDNN's fused linear kernel failed") and "descriptor" in err[0]


def test_preferred_memory_format():
    assert preferred_memory_format("cpu", torch.bfloat16) == torch.channels_last
    assert preferred_memory_format("cpu", torch.float32) == torch.contiguous_format
    assert preferred_memory_format("cpu") == torch.contiguous_format
    assert preferred_memory_format("cuda", torch.float16) == torch.channels_last
    assert preferred_memory_format("mps", torch.float16) == torch.contiguous_format


def _pageout_missing() -> str | None:
    """Why this system cannot page out a mapping on request (Linux 5.4+ ``MADV_PAGEOUT``, /proc for checking),
    or None."""
    if not os.path.exists("/proc/self/smaps"):
        return "needs Linux /proc/self/smaps"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with mmap.mmap(-1, mmap.PAGESIZE) as page:
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        failed = madvise(address, mmap.PAGESIZE, 21) != 0  # MADV_PAGEOUT
        errno = ctypes.get_errno()
        del address
    return f"the kernel refuses MADV_PAGEOUT (errno {errno}; Linux < 5.4 or a sandbox)" if failed else None


@pytest.mark.skipif(_pageout_missing() is not None, reason=str(_pageout_missing()))
def test_library_pages_are_handed_back(tmp_path):
    """The resident pages of a mapped shared object leave the process (a stand-in library that only this test
    maps: the kernel keeps pages another process maps, such as torch's in a test runner's children)."""
    library = tmp_path / "libstandin.so"
    library.write_bytes(os.urandom(8 << 20))
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        checksum = sum(mapped[i] for i in range(0, len(mapped), 4096))  # touch every page
        assert mapping_rss(library) > 7 << 20
        assert memory.release_library_pages() > 0
        assert mapping_rss(library) < 1 << 20
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == checksum  # faults back in, same bytes
    x = torch.randn(64, 64)
    torch.testing.assert_close(x @ torch.eye(64), x)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_a_mapped_file_is_let_go_while_it_is_read(tmp_path):
    """``releasing_mapped_file`` (OpenVINO compiling from its cache): pages of a read-only mapping that the block
    has read leave the process while it runs, and fault back in unchanged; a writable mapping keeps its changes."""
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(16 << 20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        with memory.releasing_mapped_file(path, every=0.05):
            checksum = sum(mapped[i] for i in range(0, len(mapped), 4096))  # read every page, as a compile does
            deadline = time.monotonic() + 10
            while mapping_rss(path) > 1 << 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert mapping_rss(path) <= 1 << 20
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == checksum
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as private:
        private[0] = private[0] ^ 0xFF
        changed = private[0]
        assert memory.release_mapped_file(path) == 0
        assert private[0] == changed


def test_the_allocator_is_tuned_only_while_a_run_asks_for_it(monkeypatch):
    """Entering sets glibc's heap to keep freed memory; nested entries change nothing; leaving the outermost
    restores glibc's defaults."""
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda settings: calls.append(dict(settings)) or True)
    with memory.tuned_allocator() as tuned:
        assert tuned and calls == [{memory._M_MMAP_MAX: 0, memory._M_TRIM_THRESHOLD: 2**31 - 1}]
        with memory.tuned_allocator() as nested:
            assert nested and len(calls) == 1
        assert len(calls) == 1
    assert calls[1] == {memory._M_MMAP_MAX: 65536, memory._M_TRIM_THRESHOLD: 128 * 1024}
    with pytest.raises(KeyError), memory.tuned_allocator():
        raise KeyError("a failing run restores them too")
    assert len(calls) == 4 and calls[3] == calls[1]


class _Decoder:
    """Stands in for a model whose reduced-precision decode overflows."""

    def __init__(self, dtype):
        self.first_stage_model = torch.nn.Conv2d(1, 1, 1).to(dtype)
        self.calls: list[torch.dtype] = []

    def decode_first_stage(self, z):
        dtype = self.first_stage_model.weight.dtype
        self.calls.append(dtype)
        return torch.full_like(z, float("inf") if dtype != torch.float32 else 1.0)


def test_decode_falls_back_to_float32_when_not_finite():
    model = _Decoder(torch.bfloat16)
    x = precision.decode_first_stage(model, torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))
    assert model.calls == [torch.bfloat16, torch.float32]
    assert torch.isfinite(x).all() and x.dtype == torch.float32
    assert model.first_stage_model.weight.dtype == torch.bfloat16  # restored


def test_decode_keeps_finite_results_and_float32_models():
    finite = _Decoder(torch.float32)
    precision.decode_first_stage(finite, torch.zeros(1, 1, 2, 2))
    assert finite.calls == [torch.float32]


def _sample(model, seed: int, dtype: torch.dtype, steps: int = 10, prompts=PROMPTS, shape=(4, 8, 8)):
    with torch.no_grad():
        cond = model.get_learned_conditioning(list(prompts))
        uncond = model.get_learned_conditioning([""] * len(prompts))
        x_T = torch.randn(len(prompts), *shape, generator=torch.Generator().manual_seed(seed))
        samples, _ = DDIMSampler(model).sample(S=steps, conditioning=cond, batch_size=len(prompts), shape=list(shape),
                                               verbose=False, unconditional_guidance_scale=7.5,
                                               unconditional_conditioning=uncond, eta=0.0, x_T=x_T.to(dtype))
        images = precision.decode_first_stage(model, samples.to(dtype))
    return samples.float(), images.float()


@pytest.fixture(scope="module")
def tiny_bf16(tiny_ckpt):
    return load_model_from_config(tiny_config(), tiny_ckpt, dtype=torch.bfloat16)


def test_bf16_samples_stay_close_to_fp32(tiny_model, tiny_bf16):
    for seed in (0, 1):
        ref_latents, ref_images = _sample(tiny_model, seed, torch.float32)
        latents, images = _sample(tiny_bf16, seed, torch.bfloat16)
        assert relative(latents, ref_latents) < LATENT_BOUND
        assert psnr(images, ref_images) > PSNR_BOUND


def test_the_bounds_separate_different_samples(tiny_model):
    """Negative control: another seed's sample, in the same precision, is far outside both bounds."""
    (l0, i0), (l1, i1) = _sample(tiny_model, 0, torch.float32), _sample(tiny_model, 1, torch.float32)
    assert relative(l1, l0) > 10 * LATENT_BOUND and psnr(i1, i0) < PSNR_BOUND / 2


@pytest.mark.slow
def test_full_model_bf16_is_close_to_fp32(tmp_path_factory):
    """Full-size SD v1 on deterministic weights: bf16 (channels_last, fused paths) against fp32."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from ldm.testing.deterministic_weights import write_deterministic_checkpoint
    from tests.conftest import FIXTURES

    config = OmegaConf.load("configs/stable-diffusion/v1-inference.yaml")
    path = tmp_path_factory.mktemp("full-bf16") / "sd-v1-det.ckpt"
    write_deterministic_checkpoint(config, path, seed=0)
    io = load_file(FIXTURES / "full" / "io.safetensors")
    prompt = ["a photograph of an astronaut riding a horse"]
    outputs = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model = load_model_from_config(config, path, dtype=dtype)
            with torch.no_grad():
                eps = model.apply_model(io["unet_x"], io["unet_t"], io["cond"][:1].expand(2, -1, -1))
            outputs[dtype] = (eps, *_sample(model, 0, dtype, steps=4, prompts=prompt, shape=(4, 16, 16)))
            del model
    finally:
        path.unlink()
    (eps, latents, images), (ref_eps, ref_latents, ref_images) = outputs[torch.bfloat16], outputs[torch.float32]
    assert relative(eps, ref_eps) < 0.03
    assert relative(latents, ref_latents) < 0.05
    assert psnr(images, ref_images) > PSNR_BOUND
