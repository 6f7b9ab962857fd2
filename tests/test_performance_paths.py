"""The fast paths keep the original's numbers: memory formats, in-place inference ops, SDPA, loader conversions.

Every check runs the tiny reference model (same classes as SD v1) on CPU; no timing is asserted.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.backend import onednn
from ldm.backend.layout import memory_format_of
from ldm.errors import CheckpointError
from ldm.loading.build import load_model_from_config
from ldm.loading.safetensors import read_safetensors
from ldm.modules.ops import Conv2d, linear_geglu, module_memory_format, pointwise_conv
from tests.conftest import assert_matches_reference, mapping_rss, tiny_config, tiny_state_dict

CL = torch.channels_last


def conv_kernels(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1]


def test_loader_lays_out_kernels_as_asked(tiny_ckpt):
    model = load_model_from_config(tiny_config(), tiny_ckpt, memory_format=CL)
    kernels = conv_kernels(model)
    assert kernels and all(memory_format_of(k) == CL for k in kernels)
    plain = load_model_from_config(tiny_config(), tiny_ckpt, memory_format=torch.contiguous_format)
    assert all(k.is_contiguous() for k in conv_kernels(plain))


def test_default_layout_follows_dtype(tiny_ckpt):
    """float32 on CPU keeps the plain layout (faster there), bf16 goes channels_last."""
    fp32 = load_model_from_config(tiny_config(), tiny_ckpt)
    bf16 = load_model_from_config(tiny_config(), tiny_ckpt, dtype=torch.bfloat16)
    assert module_memory_format(fp32) == torch.contiguous_format
    assert module_memory_format(bf16) == CL
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_channels_last_model_matches_reference(tiny_ckpt, tiny_io):
    """UNet and autoencoder in channels_last reproduce the original's outputs; inputs in either layout."""
    model = load_model_from_config(tiny_config(), tiny_ckpt, memory_format=CL)
    with torch.no_grad():
        for x in (tiny_io["unet_x"], tiny_io["unet_x"].contiguous(memory_format=CL)):
            eps = model.apply_model(x, tiny_io["unet_t"], tiny_io["cond"])
            assert_matches_reference(eps, tiny_io["unet_eps"], "unet_eps")
            assert memory_format_of(eps) == memory_format_of(x)
        posterior = model.encode_first_stage(tiny_io["img"])
        assert_matches_reference(posterior.mean, tiny_io["post_mean"], "post_mean")
        decoded = model.decode_first_stage(tiny_io["z_scaled"])
    assert_matches_reference(decoded, tiny_io["decoded"], "decoded")
    assert decoded.is_contiguous()


class _Ops(TorchDispatchMode):
    """Records the operators called."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops(fn) -> tuple[torch.Tensor, list[str]]:
    recorder = _Ops()
    with torch.no_grad(), recorder:
        out = fn()
    return out, recorder.names


def _close_to(y: torch.Tensor, expected: torch.Tensor, roundings: int = 1) -> None:
    """float32: to the usual 1e-5; bf16: to ``roundings`` roundings of the result (the inputs are bf16 already)."""
    tol = 1e-5 if y.dtype == torch.float32 else roundings * 2 ** -8
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_pointwise_conv_is_the_convolution(dtype, layout):
    """A 1x1 convolution, with and without a residual; channels_last: one matmul, the sum in its epilogue."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 1).to(dtype)
    x = torch.randn(2, 6, 4, 3).to(dtype).contiguous(memory_format=layout)
    residual = torch.randn(2, 5, 4, 3).to(dtype).contiguous(memory_format=layout)
    plain = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
    y, _ = _ops(lambda: pointwise_conv(conv, x))
    _close_to(y, plain)
    assert memory_format_of(y) == layout
    y, ops = _ops(lambda: pointwise_conv(conv, x, residual=residual))
    _close_to(y, plain + residual.double())
    assert memory_format_of(y) == layout
    fused = layout == CL and onednn.gate.usable("linear", dtype)  # where oneDNN computes ``dtype`` on this CPU
    assert ("mkldnn._linear_pointwise.binary" in " ".join(ops)) == fused
    bias = residual[:, :, :1, :1]  # broadcast: no epilogue
    _close_to(_ops(lambda: pointwise_conv(conv, x, residual=bias))[0], plain + bias.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("packed", [True, False])
def test_convolution_adds_the_residual(dtype, layout, packed):
    """``Conv2d(x, residual)`` is ``conv(x) + residual``; in channels_last the sum is in the convolution's
    epilogue, with the kernel prepacked or not, and the two give the same numbers."""
    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, padding=1).to(dtype)
    x = torch.randn(2, 8, 6, 5).to(dtype).contiguous(memory_format=layout)
    residual = torch.randn(2, 16, 6, 5).to(dtype).contiguous(memory_format=layout)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) + residual.double()
    onednn_here = onednn.gate.usable("convolution", dtype)  # where oneDNN computes ``dtype`` on this CPU
    if packed:
        assert conv.prepack(dtype, layout) == onednn_here
    y, ops = _ops(lambda: conv(x, residual=residual))
    _close_to(y, expected)
    assert ("mkldnn._convolution_pointwise.binary" in " ".join(ops)) == (layout == CL and onednn_here)
    if packed:
        conv.release_packed()
        with torch.no_grad():  # another kernel (prepacked or not): the same sum, not the same rounding
            torch.testing.assert_close(conv(x, residual=residual), y)
    with torch.no_grad():
        bias = residual[:, :, :1, :1]  # broadcast: no epilogue
        assert torch.equal(conv(x, residual=bias), conv(x) + bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_is_value_times_gelu_of_gate(dtype):
    """GEGLU on CPU inference: in bf16 the product is taken in the second matmul's epilogue (rounded once)."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 2 * 24).to(dtype)
    x = torch.randn(3, 7, 16).to(dtype)
    h, gate = F.linear(x.double(), proj.weight.double(), proj.bias.double()).chunk(2, dim=-1)
    fused = onednn.gate.usable("linear", dtype)
    y, ops = _ops(lambda: linear_geglu(proj, x))
    # bf16: fused, the product in the epilogue (one rounding); public ops round h, gelu(gate) and the product
    _close_to(y, h * F.gelu(gate), roundings=1 if fused else 3)
    assert ("mkldnn._linear_pointwise.binary" in " ".join(ops)) == (dtype == torch.bfloat16 and fused)


def test_inference_and_training_paths_agree(tiny_model, tiny_io):
    """In-place ops are used only without autograd; with it, outputs are the same and gradients flow."""
    unet = tiny_model.model.diffusion_model
    x, t, cond = tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"]
    with torch.no_grad():
        fast = unet(x, t, cond)
    x_grad = x.clone().requires_grad_(True)
    slow = unet(x_grad, t, cond)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)  # the fused oneDNN matmuls round differently
    slow.square().mean().backward()
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all() and x_grad.grad.abs().sum() > 0


def test_unet_gradients_are_exact():
    """gradcheck (float64) through ResBlocks, spatial transformers and GEGLU: in-place residual adds are safe."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                     attention_resolutions=[1], channel_mult=[1], num_head_channels=16,
                     use_spatial_transformer=True, context_dim=8).double()
    for p in unet.parameters():  # zero-initialised output layers would hide most of the graph
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([10])
    assert torch.autograd.gradcheck(lambda x, c: unet(x, t, c), (x, context), eps=1e-6, atol=1e-5)


class _CreatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _square_tensors(fn, n: int) -> list[tuple[int, ...]]:
    recorder = _CreatedShapes()
    with torch.no_grad(), recorder:
        fn()
    assert recorder.shapes
    return [s for s in recorder.shapes if len(s) >= 2 and s[-1] == s[-2] == n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_attention_matrix_is_materialised(tiny_ckpt, dtype):
    """At 32x32 latents the UNet's first level and the autoencoder's mid block attend over 1024 tokens:
    no (1024 x 1024) tensor may appear, in either layout."""
    model = load_model_from_config(tiny_config(), tiny_ckpt, dtype=dtype)
    context_dim = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    cond, z = torch.randn(1, 77, context_dim), torch.randn(1, 4, 32, 32)
    assert not _square_tensors(lambda: model.apply_model(z, torch.tensor([10]), cond), 1024)
    assert not _square_tensors(lambda: model.decode_first_stage(z.to(dtype)), 1024)
    assert not _square_tensors(lambda: model.encode_first_stage(torch.randn(1, 3, 256, 256, dtype=dtype)), 1024)


@pytest.mark.parametrize("legacy", [True, False])
def test_qkv_attention_blocks(legacy):
    """The non-transformer AttentionBlock (class-conditional LDMs): both head orders equal the original's
    einsum attention, without a (T x T) tensor."""
    from ldm.modules.diffusionmodules.openaimodel import QKVAttention, QKVAttentionLegacy

    bs, heads, ch, length = 2, 3, 4, 1024
    qkv = torch.randn(bs, 3 * heads * ch, length)
    if legacy:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * heads, ch, length) for t in qkv.chunk(3, dim=1))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * ch ** -0.25, k * ch ** -0.25), dim=-1)
    ref = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    block = (QKVAttentionLegacy if legacy else QKVAttention)(heads)
    torch.testing.assert_close(block(qkv), ref, rtol=1e-4, atol=1e-5)
    assert not _square_tensors(lambda: block(qkv), length)


def test_text_encoder_uses_sdpa(tiny_model):
    assert tiny_model.cond_stage_model.transformer.config._attn_implementation == "sdpa"


def test_bf16_weights_run_without_autocast(tiny_ckpt, tiny_io):
    """A bf16 model takes float32 inputs (the sampler's) and returns the input's dtype."""
    model = load_model_from_config(tiny_config(), tiny_ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        eps = model.apply_model(tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"])
    assert eps.dtype == torch.float32
    err = (eps - tiny_io["unet_eps"]).norm() / tiny_io["unet_eps"].norm()
    assert err < 0.05


def test_casting_releases_the_checkpoint_pages(tmp_path):
    """Loading a float32 file as bf16 leaves almost none of the file resident (each source is released)."""
    big = {k: v.repeat(4, *([1] * (v.dim() - 1))) if v.dim() and v.shape[0] >= 64 else v
           for k, v in tiny_state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(big, path)  # a file of its own: pages only this test touches
    from ldm.backend.memory import FilePages
    from ldm.loading.checkpoint import _cast_like, read_state_dict

    sd = read_state_dict(path)
    expected = {k: torch.empty(v.shape, dtype=torch.float32, device="meta") for k, v in sd.items()}
    size = path.stat().st_size
    for t in sd.values():  # fault every page in, as casting does
        t.sum()
    assert mapping_rss(path) > 0.9 * size
    _cast_like(sd, expected, torch.bfloat16, release=FilePages.of(path).release)
    assert mapping_rss(path) < 0.1 * size
    torch.testing.assert_close(sd["model.diffusion_model.out.2.weight"].float(),
                               big["model.diffusion_model.out.2.weight"].bfloat16().float())


def test_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.tensor([True, False, True]), "e": torch.randn(0, 3), "f": torch.randn(1).half()}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    ours, theirs = read_safetensors(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_safetensors_reader_refuses_bad_offsets(tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    try:
        read_safetensors(path)
    except CheckpointError as err:
        assert "not a valid safetensors" in str(err)
    else:
        raise AssertionError("a tensor reaching past the end of the file was accepted")


def test_sdpa_equals_softmax_attention():
    """The attention helper is softmax(q k^T / sqrt(d)) v, as the original's einsum version."""
    from ldm.modules.attention import attention

    q, k, v = torch.randn(2, 9, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    heads, d = 4, 4
    qh, kh, vh = (t.reshape(2, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    ref = (F.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1) @ vh).permute(0, 2, 1, 3).reshape(2, 9, 16)
    torch.testing.assert_close(attention(q, k, v, heads), ref, rtol=1e-5, atol=1e-6)


def _cpp_compiler_missing() -> str | None:
    """Why inductor cannot compile for the CPU here (it needs a working C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # inductor's own check: InvalidCxxCompiler, or a missing module in other versions
        return f"torch.compile needs a C++ compiler: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


@pytest.mark.skipif(_cpp_compiler_missing() is not None, reason=str(_cpp_compiler_missing()))
def test_unet_compiles(tiny_ckpt, tiny_io):
    """``torch.compile`` (inductor, frozen weights) of a bf16 UNet traces the plain ops, not our oneDNN calls
    (which inductor cannot lower), and computes what eager mode does. (Compiling does not pay on a 2-core CPU:
    see docs/benchmark.md.)"""
    import torch._inductor.config as inductor_config

    unet = load_model_from_config(tiny_config(), tiny_ckpt, dtype=torch.bfloat16).model.diffusion_model
    x, t, cond = tiny_io["unet_x"].bfloat16(), tiny_io["unet_t"], tiny_io["cond"].bfloat16()
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        eager = unet(x, t, cond).float()
        compiled = torch.compile(unet)(x, t, cond).float()
    # inductor keeps fused intermediates in float32 where eager rounds each op to bf16
    assert (compiled - eager).abs().max() <= 0.05 * eager.abs().max()
