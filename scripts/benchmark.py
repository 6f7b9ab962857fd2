"""Speed and memory of this implementation against diffusers (and the original's attention), side by side.

    python scripts/benchmark.py                    # everything at 512x512; writes docs/benchmark.md and .png
    python scripts/benchmark.py --parts unet,vae   # only the in-process step timings
    python scripts/benchmark.py --quick            # small sizes, a smoke test of every part (minutes)

Full-size SD v1 models are built from deterministic weights (``ldm.testing.deterministic_weights``), never
downloaded: a 4.27 GB original-layout ``.ckpt``, a bf16 ``.safetensors`` and a diffusers folder converted from
the same weights are written once to ``--workdir``. diffusers is a benchmark-only peer
(``pip install diffusers``). Parts:

* ``unet``: one classifier-free-guidance UNet step (batch 2) in one process, the implementations alternating:
  ours, diffusers' ``UNet2DConditionModel`` and, in fp32, "original": our modules with the original CompVis
  algorithm patched in (einsum attention materialising the (tokens x tokens) matrix, rearranges, plain ops).
* ``vae``: one VAE decode (batch 1) in one process, alternating ours and diffusers' ``AutoencoderKL``.
* ``e2e``: text-to-image (1 sample, ``--steps`` DDIM steps, guidance 7.5) in fresh processes, alternating
  ``ldm.inference.pipeline`` from the ``.ckpt`` and ``StableDiffusionPipeline.from_pretrained`` from the folder;
  wall time from interpreter start to decoded image, and the process's peak RSS (VmHWM). In bf16, ours also runs
  from the bf16 ``.safetensors`` (weights stored as computed).
* ``load``: peak RSS of loading alone, per checkpoint format and weight dtype.
* ``big``: a 1024x1024 text-to-image run of ours (peak RSS; ``--big-steps`` steps).
* ``optimum`` (with ``--optimum-python``): OpenVINO's own Stable Diffusion pipeline (optimum-intel's
  ``OVStableDiffusionPipeline``), exported once from the same diffusers folder and reshaped to static shapes, run
  by the interpreter of an environment that has it (its pins clash with ours: ``transformers<5.6``). Fresh
  processes alternating with ours: UNet step (batch 2) and VAE decode medians, then text-to-image end to end with
  an empty OpenVINO model cache (compile included) and with the cache filled; each ``--precisions`` entry
  (bf16 through OpenVINO's inference-precision hint, where the CPU computes bf16). Where ``openvino`` is
  installed here, ours runs on both backends: ``--backend openvino`` end to end with an empty and a filled model
  cache too, and its UNet step and decode rounds from that cache. ``optimum_steps``: only the step and decode
  rounds, from the model caches an earlier ``optimum`` run left in ``--workdir``.
* ``sdcpp`` (with ``--sdcpp-python``): stable-diffusion.cpp through its Python binding
  (``stable-diffusion-cpp-python``, built for this CPU), from the same weights (a ``.safetensors`` whose CLIP
  tensors are named as it expects), fp32, in fresh processes
  alternating with ours: its guided UNet step and decode as its log times them, end to end wall and peak RSS.

Timings are medians over ``--repeats``; no assertion is made. The machine's load (other processes) is
recorded with the table, since it moves absolute numbers (ratios are taken within one alternating run).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
PROMPT = "a photograph of an astronaut riding a horse"
GIB = 1e9


def peak_rss() -> int:
    """This process's own high-water RSS in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# ------------------------------------------------------------------------------------------------ assets
def asset_paths(workdir: Path) -> dict[str, Path]:
    """Where the fp32 .ckpt, a bf16 .safetensors and a diffusers folder, all from the same deterministic weights,
    are kept."""
    return {"ckpt": workdir / "sd-v1-det.ckpt", "bf16": workdir / "sd-v1-det-bf16.safetensors",
            "diffusers": workdir / "diffusers-sd-v1-det"}


def assets_ready(paths: dict[str, Path]) -> bool:
    return paths["ckpt"].exists() and paths["bf16"].exists() and (paths["diffusers"] / "model_index.json").exists()


def ensure_assets(workdir: Path) -> dict[str, Path]:
    """The benchmark's weights (:func:`asset_paths`), written where missing."""
    import torch
    from omegaconf import OmegaConf

    from ldm.testing.deterministic_weights import write_deterministic_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.load(CONFIG)
    paths = asset_paths(workdir)
    if not paths["ckpt"].exists():
        print(f"writing {paths['ckpt']} (deterministic weights, fp32)", flush=True)
        write_deterministic_checkpoint(config, paths["ckpt"])
    if not paths["bf16"].exists():
        print(f"writing {paths['bf16']}", flush=True)
        write_deterministic_checkpoint(config, paths["bf16"], dtype=torch.bfloat16)
    if not (paths["diffusers"] / "model_index.json").exists():
        print(f"converting to {paths['diffusers']}", flush=True)
        build_diffusers_folder(paths["ckpt"], paths["diffusers"])
    return paths


def _diffusers_components(ckpt: Path, dtype):
    """diffusers UNet and VAE converted (by diffusers' own converters) from the original-layout state dict."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from omegaconf import OmegaConf

    from ldm.loading.checkpoint import read_state_dict

    sd = read_state_dict(ckpt)
    original = OmegaConf.to_container(OmegaConf.load(CONFIG))
    out = []
    for cls, make_config, convert in (
            (UNet2DConditionModel, create_unet_diffusers_config_from_ldm, convert_ldm_unet_checkpoint),
            (AutoencoderKL, create_vae_diffusers_config_from_ldm, convert_ldm_vae_checkpoint)):
        config = make_config(original, sd)
        weights = convert(sd, config)
        with torch.device("meta"):
            module = cls(**config)
        module.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
        out.append(module.eval())
    return out


def build_diffusers_folder(ckpt: Path, folder: Path) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from omegaconf import OmegaConf
    from transformers import CLIPTokenizer

    from ldm.loading.build import load_model_from_config
    from ldm.modules.encoders.modules import TOKENIZER_DIR

    unet, vae = _diffusers_components(ckpt, torch.float32)
    ours = load_model_from_config(OmegaConf.load(CONFIG), ckpt)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ours.cond_stage_model.transformer,
                                   tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77),
                                   unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


# ------------------------------------------------------------------------------------------------ original
class original_algorithm:
    """Context manager: our UNet modules compute as the original CompVis code did (fp32, plain layout).

    Attention materialises softmax(q k^T) with einsum per head (``ldm/modules/attention.py`` of CompVis),
    SpatialTransformer rearranges (B, C, H, W) <-> (B, HW, C) around 1x1 convolutions, GEGLU and residuals
    allocate fresh tensors. Weights and convolutions are ours (identical math).
    """

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        from ldm.modules import attention as A
        from ldm.modules.diffusionmodules import openaimodel as U

        def cross_attention(self, x, context=None, mask=None, residual=None):
            h = self.heads
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
            q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(t.shape[0] * h,
                       t.shape[1], -1) for t in (q, k, v))
            sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
            out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
            out = out.reshape(-1, h, out.shape[1], out.shape[2]).permute(0, 2, 1, 3).reshape(-1, out.shape[1],
                                                                                           h * out.shape[2])
            out = self.to_out(out)
            return out if residual is None else out + residual

        def geglu(self, x):
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)

        def feed_forward(self, x, residual=None):
            out = self.net(x)
            return out if residual is None else out + residual

        def block(self, x, context=None):
            x = self.attn1(self.norm1(x)) + x
            x = self.attn2(self.norm2(x), context=context) + x
            return self.ff(self.norm3(x)) + x

        def spatial_transformer(self, x, context=None):
            b, c, h, w = x.shape
            x_in = x
            x = self.proj_in(self.norm(x))
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
            for blk in self.transformer_blocks:
                x = blk(x, context=context)
            x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
            return self.proj_out(x) + x_in

        def resblock(self, x, emb):
            h = self.in_layers(x)
            emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
            h = self.out_layers(h + emb_out)
            return self.skip_connection(x) + h

        self.saved = [(A.CrossAttention, "forward", A.CrossAttention.forward),
                      (A.GEGLU, "forward", A.GEGLU.forward), (A.FeedForward, "forward", A.FeedForward.forward),
                      (A.BasicTransformerBlock, "_forward", A.BasicTransformerBlock._forward),
                      (A.SpatialTransformer, "forward", A.SpatialTransformer.forward),
                      (U.ResBlock, "_forward", U.ResBlock._forward)]
        for (cls, name, _), fn in zip(self.saved, (cross_attention, geglu, feed_forward, block, spatial_transformer,
                                                   resblock)):
            setattr(cls, name, fn)
        return self

    def __exit__(self, *exc):
        for cls, name, fn in self.saved:
            setattr(cls, name, fn)


# ------------------------------------------------------------------------------------------------ children
def _alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Run each function once to warm up, then ``repeats`` rounds in turn; wall seconds per call."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def child_unet(args, paths) -> dict:
    result = {}
    for name, (times, flops) in _each_dtype(args, paths, _unet_rounds).items():
        result[name] = times
        if flops:
            result["flops"] = flops
    return result


def _unet_rounds(args, paths, dtype) -> tuple[dict, float | None]:
    import torch
    from omegaconf import OmegaConf

    from ldm.loading.build import load_model_from_config

    device = torch.device(args.device)
    x, t, context = _unet_inputs(args, dtype, device)
    unet = _ours(paths, dtype, device).model.diffusion_model
    theirs = _diffusers_components(paths["ckpt"], dtype)[0].to(device)
    fns = {"ours": lambda: (unet(x, t, context), _sync(device)),
           "diffusers": lambda: (theirs(x, t, encoder_hidden_states=context), _sync(device))}
    # the original's algorithm, and the FLOP count, on plain convolutions (prepacked ones are not counted)
    plain = None
    if dtype == torch.float32:
        plain = load_model_from_config(OmegaConf.load(CONFIG), paths["ckpt"], device=device).model.diffusion_model
    if plain is not None and args.original:
        def original():
            with original_algorithm():
                plain(x, t, context)
        fns["original"] = original
    times = _alternate(fns, args.repeats)
    return times, (unet_flops(plain, x, t, context) if plain is not None else None)


def _unet_inputs(args, dtype, device):
    """A classifier-free-guidance batch: latents (2, 4, size/8, size/8), timesteps, CLIP-shaped context."""
    import torch

    latent = args.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=gen).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
    return x, torch.tensor([500, 500], device=device), context


def _ours(paths, dtype, device):
    """Our model as the pipeline runs it: on the CPU loaded as stored, its UNet and autoencoder in use
    (converted to ``dtype``, convolution kernels prepacked; see ldm.inference.residency); elsewhere converted at
    load."""
    import torch
    from omegaconf import OmegaConf

    from ldm.backend.layout import preferred_memory_format
    from ldm.inference.residency import PartWeights
    from ldm.loading.build import load_model_from_config

    on_cpu = torch.device(device).type == "cpu"
    model = load_model_from_config(OmegaConf.load(CONFIG), paths["ckpt"], dtype=dtype, device=device,
                                   as_stored=on_cpu)
    if on_cpu:
        for part in (model.model, model.first_stage_model):
            PartWeights(part, dtype, preferred_memory_format(device, dtype)).use()
    return model


def unet_flops(unet, x, t, context) -> float:
    """Floating-point operations of one UNet call (matmuls, convolutions, attention), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, t, context)
    return float(counter.get_total_flops())


def child_compile(args, paths) -> dict:
    return _each_dtype(args, paths, _compile_rounds)


def _compile_rounds(args, paths, dtype) -> dict:
    """Our UNet eager (as the pipeline runs it) against ``torch.compile`` of it (inductor, frozen weights)."""
    import torch
    import torch._inductor.config as inductor_config
    from omegaconf import OmegaConf

    from ldm.loading.build import load_model_from_config

    device = torch.device(args.device)
    x, t, context = _unet_inputs(args, dtype, device)
    eager = _ours(paths, dtype, device).model.diffusion_model
    plain = load_model_from_config(OmegaConf.load(CONFIG), paths["ckpt"], dtype=dtype, device=device)
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled = torch.compile(plain.model.diffusion_model)
        start = time.perf_counter()
        compiled(x, t, context)
        _sync(device)
        compile_s = time.perf_counter() - start
        times = _alternate({"eager": lambda: (eager(x, t, context), _sync(device)),
                            "compiled": lambda: (compiled(x, t, context), _sync(device))}, args.repeats)
    return {**times, "compile": compile_s}


def child_vae(args, paths) -> dict:
    return _each_dtype(args, paths, _vae_rounds)


def _each_dtype(args, paths, rounds) -> dict:
    """``rounds(args, paths, dtype)`` for each dtype measured on the device, keyed by the dtype's name."""
    import torch

    from ldm.backend.memory import tuned_allocator

    with tuned_allocator():  # both implementations run in this process: the same allocator for all
        names = ([{"full": "float32", "bf16": "bfloat16"}[p] for p in args.precisions.split(",")]
                 if args.device == "cpu" else ["float16"])
        return {name: rounds(args, paths, getattr(torch, name)) for name in names}


def _vae_rounds(args, paths, dtype) -> dict:
    import torch


    device = torch.device(args.device)
    latent = args.size // 8
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ours = _ours(paths, dtype, device)
    theirs = _diffusers_components(paths["ckpt"], dtype)[1].to(device)
    scale = ours.scale_factor
    return _alternate({"ours": lambda: (ours.decode_first_stage(z), _sync(device)),
                       "diffusers": lambda: (theirs.decode(z / scale).sample, _sync(device))}, args.repeats)


CHILD_E2E_OURS = r"""
import json, sys, time
start = time.perf_counter()
ckpt, size, steps, precision, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
backend = sys.argv[6] if len(sys.argv) > 6 else "torch"
import torch
from ldm.backend.memory import release_library_pages, tuned_allocator
from ldm.inference.pipeline import Settings, load_pipeline
pipe = load_pipeline("{config}", ckpt, device=device, precision=precision, safety_checker="off", say=lambda m: None,
                     backend=backend)
if pipe.device.type == "cpu":  # as the scripts run it (ldm.app.run)
    tuned_allocator().__enter__()
    release_library_pages()
loaded = time.perf_counter()
images, _ = pipe.generate(["{prompt}"], [42], Settings(steps=steps, height=size, width=size))
done = time.perf_counter()
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"wall": done - start, "load": loaded - start, "generate": done - loaded, "rss": hwm,
                  "mean": float(images.mean())}}))
"""

CHILD_E2E_DIFFUSERS = r"""
import json, sys, time
start = time.perf_counter()
folder, size, steps, precision, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
import torch
from diffusers import StableDiffusionPipeline
dtype = {{"full": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}}[precision]
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None, local_files_only=True)
pipe = pipe.to(device)
pipe.set_progress_bar_config(disable=True)
loaded = time.perf_counter()
gen = torch.Generator("cpu").manual_seed(42)
image = pipe("{prompt}", height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, generator=gen,
             output_type="np").images
done = time.perf_counter()
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"wall": done - start, "load": loaded - start, "generate": done - loaded, "rss": hwm,
                  "mean": float(image.mean())}}))
"""

CHILD_OPTIMUM = r"""
import json, os, sys, time
start = time.perf_counter()
mode, folder, size, steps, precision, cache, repeats = sys.argv[1:8]
size, steps, repeats = int(size), int(steps), int(repeats)
import numpy as np
from optimum.intel import OVStableDiffusionPipeline

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

if mode == "export":  # the diffusers folder -> OpenVINO IR folder, once
    pipe = OVStableDiffusionPipeline.from_pretrained(sys.argv[8], export=True, compile=False, local_files_only=True)
    pipe.save_pretrained(folder)
    print(json.dumps({{"export": time.perf_counter() - start, "rss": rss()}}))
    sys.exit(0)
hint = {{"full": "f32", "bf16": "bf16"}}[precision]
pipe = OVStableDiffusionPipeline.from_pretrained(folder, compile=False, local_files_only=True,
                                                 ov_config={{"CACHE_DIR": cache, "INFERENCE_PRECISION_HINT": hint}})
pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
pipe.compile()
pipe.set_progress_bar_config(disable=True)
loaded = time.perf_counter()
result = {{"load": loaded - start}}
if mode == "e2e":
    image = pipe("{prompt}", height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                 output_type="np").images
    done = time.perf_counter()
    result.update({{"wall": done - start, "generate": done - loaded, "mean": float(np.mean(image))}})
else:  # parts: UNet step (classifier-free guidance: batch 2) and VAE decode, as the pipeline calls them
    rng = np.random.default_rng(0)
    channels, width = pipe.unet.config["in_channels"], pipe.unet.config["cross_attention_dim"]
    latent = rng.standard_normal((2, channels, size // 8, size // 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, width)).astype(np.float32)
    port = next(p for p in pipe.unet.model.inputs if p.get_any_name() == "timestep")  # its rank and type
    t = np.full([1] * port.get_partial_shape().rank.get_length(), 500, dtype=port.get_element_type().to_dtype())
    z = rng.standard_normal((1, channels, size // 8, size // 8)).astype(np.float32)
    unet = lambda: pipe.unet(sample=latent, timestep=t, encoder_hidden_states=context)
    decode = lambda: pipe.vae_decoder(latent_sample=z)
    unet(), decode()  # first calls (warm-up)
    times = {{"unet": [], "decode": []}}
    for _ in range(repeats):
        for name, fn in (("unet", unet), ("decode", decode)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    result["times"] = times
result["rss"] = rss()
print(json.dumps(result))
"""

CHILD_SDCPP = r"""
import io, json, os, re, sys, time
start = time.perf_counter()
ckpt, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import numpy as np
from stable_diffusion_cpp import StableDiffusion
log = io.StringIO()
sys.stderr = log  # its log (verbose) names each stage's time
threads = os.cpu_count()  # its binding's default is half the CPUs (one thread on a 2-core machine)
sd = StableDiffusion(model_path=ckpt, n_threads=threads, verbose=True)
loaded = time.perf_counter()
image = sd.generate_image(prompt="{prompt}", width=size, height=size, sample_steps=steps, cfg_scale=7.5,
                          sample_method="euler", seed=42)[0]
done = time.perf_counter()
sys.stderr = sys.__stderr__
stage = lambda name: float(re.findall(name + r" completed, taking ([0-9.]+)s", log.getvalue())[-1])
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"wall": done - start, "load": loaded - start, "generate": done - loaded, "rss": hwm,
                  "threads": threads, "step": stage("sampling") / steps, "decode": stage("decode_first_stage"),
                  "mean": float(np.asarray(image.convert("L")).mean())}}))
"""

CHILD_SDCPP_WEIGHTS = r"""
import json, sys
from safetensors.torch import save_file
from ldm.loading.checkpoint import read_state_dict
prefix = "cond_stage_model.transformer."
sd = read_state_dict(sys.argv[1])
sd = {(prefix + "text_model." + k[len(prefix):] if k.startswith(prefix) and not k.startswith(prefix + "text_model.")
       else k): v.contiguous() for k, v in sd.items()}
save_file(sd, sys.argv[2])
print(json.dumps({"tensors": len(sd)}))
"""

CHILD_OURS_PARTS = r"""
import json, sys
import torch
from ldm.backend.memory import tuned_allocator
from ldm.inference.pipeline import load_pipeline
ckpt, size, precision, repeats, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
pipe = load_pipeline("{config}", ckpt, device="cpu", precision=precision, safety_checker="off", say=lambda m: None,
                     backend=backend)
model, gen = pipe.model, torch.Generator().manual_seed(0)
for part in pipe.part_weights:  # torch: every part in use, as while the pipeline runs it
    part.use()
dtype = pipe.precision.weight_dtype if backend == "torch" else torch.float32
x = torch.randn(2, 4, size // 8, size // 8, generator=gen).to(dtype)
z = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(dtype)
t = torch.tensor([500, 500])
with torch.no_grad():
    context = model.get_learned_conditioning(["{prompt}", ""])
fns = {{"unet": lambda: model.apply_model(x, t, context), "decode": lambda: model.decode_first_stage(z)}}
sys.path.insert(0, "scripts")
from benchmark import _alternate  # noqa: E402  (this file; the child runs in the repository)
with tuned_allocator():  # the first calls (OpenVINO compiles from its cache, torch packs its kernels) are not timed
    times = _alternate(fns, repeats)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"times": times, "rss": hwm}}))
"""

CHILD_LOAD = r"""
import json, sys, time
import torch
from omegaconf import OmegaConf
from ldm.loading.build import load_model_from_config
start = time.perf_counter()
model = load_model_from_config(OmegaConf.load("{config}"), sys.argv[1], dtype=getattr(torch, sys.argv[2]))
loaded = time.perf_counter() - start
with torch.no_grad():  # touch every weight once, so memory-mapped pages are really resident
    for p in model.parameters():
        float(p.sum())
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"load": loaded, "rss": hwm}}))
"""

CHILD_IMPORT = r"""
import json
import torch, transformers, pytorch_lightning  # noqa: F401
from transformers import CLIPTextModel  # noqa: F401
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rss": hwm}))
"""


def run_child(code_or_args: list[str], env: dict | None = None, timeout: int = 3600,
              python: str | None = None) -> dict:
    out = subprocess.run([python or sys.executable, *code_or_args], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({code_or_args[:3]}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def e2e(args, paths, precision: str) -> dict[str, list[dict]]:
    ours_code = CHILD_E2E_OURS.format(config=CONFIG, prompt=PROMPT)
    theirs_code = CHILD_E2E_DIFFUSERS.format(prompt=PROMPT)
    runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    for _ in range(args.e2e_repeats):
        common = [str(args.size), str(args.steps), precision, args.device]
        runs["ours"].append(run_child(["-c", ours_code, str(paths["ckpt"]), *common]))
        runs["diffusers"].append(run_child(["-c", theirs_code, str(paths["diffusers"]), *common]))
        if precision == "bf16":  # ours also from weights stored in bf16 (scripts/convert_ckpt.py)
            runs.setdefault("ours_bf16_file", []).append(run_child(["-c", ours_code, str(paths["bf16"]), *common]))
    return runs


def optimum_runs(args, paths, child_args, steps_only: bool = False) -> dict:
    """OpenVINO's own pipeline (optimum-intel, ``--optimum-python``) against ours, fresh processes alternating.
    ``steps_only``: only the UNet step and decode rounds, from the model caches an earlier run filled."""
    folder = args.workdir / "optimum-sd-v1-det"

    def optimum(*argv: str, timeout: int = 7200) -> dict:
        return run_child(["-c", CHILD_OPTIMUM.format(prompt=PROMPT), *argv], timeout=timeout,
                         python=args.optimum_python)

    result: dict = {}
    if not (folder / "model_index.json").exists():
        print(f"  exporting {paths['diffusers'].name} with optimum-intel ...", flush=True)
        result["export"] = optimum("export", str(folder), "0", "0", "full", "", "0", str(paths["diffusers"]))
    ours_code = CHILD_E2E_OURS.format(config=CONFIG, prompt=PROMPT)
    with_openvino = importlib.util.find_spec("openvino") is not None  # ours with --backend openvino as well
    for precision in args.precisions.split(","):
        r: dict = {}
        runs: dict = {"ours": [], "optimum_first": [], "optimum_cached": []}
        # our OpenVINO backend's model cache, emptied like OpenVINO's for each first run
        ov_env = {**os.environ, "XDG_CACHE_HOME": str(args.workdir / f"ours-openvino-cache-{precision}")}
        for _ in range(0 if steps_only else args.e2e_repeats):
            cache = args.workdir / f"optimum-cache-e2e-{precision}"
            shutil.rmtree(cache, ignore_errors=True)
            common = [str(args.size), str(args.steps), precision]
            runs["ours"].append(run_child(["-c", ours_code, str(paths["ckpt"]), *common, "cpu"]))
            runs["optimum_first"].append(optimum("e2e", str(folder), *common, str(cache), "0"))
            runs["optimum_cached"].append(optimum("e2e", str(folder), *common, str(cache), "0"))
            if with_openvino:
                shutil.rmtree(ov_env["XDG_CACHE_HOME"], ignore_errors=True)
                for key in ("ours_openvino_first", "ours_openvino_cached"):
                    runs.setdefault(key, []).append(
                        run_child(["-c", ours_code, str(paths["ckpt"]), *common, "cpu", "openvino"], env=ov_env))
        # UNet step and decode rounds, each implementation in a process of its own (OpenVINO from the caches the
        # runs above filled), alternating
        parts_code = CHILD_OURS_PARTS.format(config=CONFIG, prompt=PROMPT)
        parts_args = [str(paths["ckpt"]), str(args.size), precision, str(args.repeats)]
        for _ in range(args.e2e_repeats):
            r.setdefault("optimum_parts", []).append(
                optimum("parts", str(folder), str(args.size), "0", precision,
                        str(args.workdir / f"optimum-cache-{precision}"), str(args.repeats)))
            r.setdefault("ours_parts", []).append(run_child(["-c", parts_code, *parts_args, "torch"]))
            if with_openvino:
                r.setdefault("ours_openvino_parts", []).append(
                    run_child(["-c", parts_code, *parts_args, "openvino"], env=ov_env))
        r["e2e"] = runs
        result[precision] = r
        if runs["ours"]:
            print(f"  optimum {precision}: e2e ours {med([x['wall'] for x in runs['ours']]):.0f} s, OpenVINO first "
                  f"{med([x['wall'] for x in runs['optimum_first']]):.0f} s, cached "
                  f"{med([x['wall'] for x in runs['optimum_cached']]):.0f} s", flush=True)
    return result


def sdcpp_runs(args, paths) -> dict:
    """stable-diffusion.cpp (its Python binding, ``--sdcpp-python``) from the same .ckpt against ours, fresh
    processes alternating, fp32: UNet step and decode from its own log, end to end wall and peak RSS."""
    ours_code = CHILD_E2E_OURS.format(config=CONFIG, prompt=PROMPT)
    theirs = args.workdir / "sd-v1-det-sdcpp.safetensors"
    if not theirs.exists():  # the same tensors, named as its SD v1 detection expects (CLIP's "text_model.")
        print(f"  writing {theirs.name}", flush=True)
        run_child(["-c", CHILD_SDCPP_WEIGHTS, str(paths["ckpt"]), str(theirs)])
    runs: dict = {"ours": [], "sdcpp": []}
    for _ in range(args.e2e_repeats):
        common = [str(args.size), str(args.steps)]
        runs["ours"].append(run_child(["-c", ours_code, str(paths["ckpt"]), *common, "full", "cpu"]))
        runs["sdcpp"].append(run_child(["-c", CHILD_SDCPP.format(prompt=PROMPT), str(theirs), *common],
                                       python=args.sdcpp_python))
    print(f"  stable-diffusion.cpp: e2e ours {med([x['wall'] for x in runs['ours']]):.0f} s, sd.cpp "
          f"{med([x['wall'] for x in runs['sdcpp']]):.0f} s", flush=True)
    return runs


def child_info(args, paths) -> dict:
    """The machine, and its matmul peak per dtype."""
    dtypes = [{"full": "float32", "bf16": "bfloat16"}[p] for p in args.precisions.split(",")]
    return {"machine": machine(), "peaks": {d: matmul_peak(d) for d in dtypes}}


def matmul_peak(dtype_name: str) -> float:
    """Measured FLOP/s of a large square matmul with all threads (the machine's practical peak)."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 4096
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    features = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "features": features, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def load_snapshot() -> dict:
    """Load average and the other CPU-heavy processes (the benchmark shares this machine)."""
    ps = subprocess.run(["ps", "-eo", "pcpu,comm,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    others = [" ".join(line.split()[2:])[:80] for line in ps.splitlines()[1:8]
              if float(line.split()[0]) > 20 and "benchmark" not in line]
    return {"loadavg": open("/proc/loadavg").read().split()[:3], "others": others}


def med(values: list[float]) -> float:
    return statistics.median(values)


def build_rows(results: dict) -> list[tuple]:
    """(measure, ours, diffusers, original, unit) rows; None where not measured."""
    rows = []
    for dtype, label in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        times = results.get("unet", {}).get(dtype)
        if times:
            rows.append((f"UNet step, batch 2 ({label})", med(times["ours"]), med(times["diffusers"]),
                         med(times["original"]) if "original" in times else None, "s"))
    for dtype, label in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        times = results.get("vae", {}).get(dtype)
        if times:
            rows.append((f"VAE decode ({label})", med(times["ours"]), med(times["diffusers"]), None, "s"))
    for precision, label in (("full", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")):
        runs = results.get("e2e", {}).get(precision)
        if runs:
            rows.append((f"txt2img wall ({label})", med([r["wall"] for r in runs["ours"]]),
                         med([r["wall"] for r in runs["diffusers"]]), None, "s"))
            rows.append((f"txt2img peak RSS ({label})", max(r["rss"] for r in runs["ours"]) / GIB,
                         max(r["rss"] for r in runs["diffusers"]) / GIB, None, "GB"))
        if runs and runs.get("ours_bf16_file"):
            file_runs = runs["ours_bf16_file"]
            rows.append((f"txt2img wall ({label}, ours from bf16 file)", med([r["wall"] for r in file_runs]),
                         med([r["wall"] for r in runs["diffusers"]]), None, "s"))
            rows.append((f"txt2img peak RSS ({label}, ours from bf16 file)", max(r["rss"] for r in file_runs) / GIB,
                         max(r["rss"] for r in runs["diffusers"]) / GIB, None, "GB"))
    return rows


def write_report(results: dict, args, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_rows(results)
    m = results["machine"]
    size = f"{args.size}x{args.size}"
    lines = [f"# Benchmark: {size}, {args.steps} DDIM steps, CPU", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['features'])}), torch {m['torch']}, "
             f"{m['threads']} threads, {m['date']}. Deterministic full-size SD v1 weights (4.27 GB .ckpt); "
             f"diffusers from a folder converted from the same weights.", "",
             "| measure | ours | diffusers | ours / diffusers | original algorithm | original / ours |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, ours, theirs, original, unit in rows:
        orig = f"{original:.2f} {unit}" if original is not None else "-"
        orig_ratio = f"{original / ours:.2f}x" if original is not None else "-"
        lines.append(f"| {name} | {ours:.2f} {unit} | {theirs:.2f} {unit} | **{ours / theirs:.2f}** | {orig} | "
                     f"{orig_ratio} |")
    if "load" in results:
        lines += ["", "Loading alone (fresh process, every weight touched once; import baseline "
                      f"{results['load']['import_rss'] / GIB:.2f} GB):", "",
                  "| checkpoint | weights | load s | peak RSS | x file size |", "|---|---|---:|---:|---:|"]
        for row in results["load"]["rows"]:
            lines.append(f"| {row['file']} ({row['size'] / GIB:.2f} GB) | {row['dtype']} | {row['load']:.1f} | "
                         f"{row['rss'] / GIB:.2f} GB | {row['rss'] / row['size']:.2f} |")
    if "big" in results:
        b = results["big"]
        lines += ["", f"{args.big_size}x{args.big_size} txt2img (ours, {b['precision']}, {b['steps']} steps): peak RSS "
                      f"{b['rss'] / GIB:.2f} GB, wall {b['wall']:.0f} s."]
    if "flops" in results.get("unet", {}):
        flops = results["unet"]["flops"]
        lines += ["", f"UNet step: {flops / 1e12:.2f} TFLOP (counted by torch.utils.flop_counter with direct "
                      "convolutions; in fp32 ours computes fewer by Winograd, so its rate below is the "
                      "direct-equivalent one)."]
        for dtype, label in (("float32", "fp32"), ("bfloat16", "bf16")):
            peak = results.get("peaks", {}).get(dtype)
            times = results["unet"].get(dtype)
            if peak and times:
                lines.append(f"- {label}: matmul peak {peak / 1e9:.0f} GFLOP/s (4096^2 matmul); ours "
                             f"{flops / med(times['ours']) / 1e9:.0f} GFLOP/s = "
                             f"{flops / med(times['ours']) / peak:.0%} of peak, diffusers "
                             f"{flops / med(times['diffusers']) / peak:.0%}.")
    if "compile" in results:
        lines += ["", "`torch.compile` of our UNet (inductor, frozen weights) against our eager UNet, step batch 2:"]
        for dtype, r in results["compile"].items():
            lines.append(f"- {dtype}: compile and first call {r['compile']:.0f} s; step {med(r['compiled']):.2f} s "
                         f"compiled, {med(r['eager']):.2f} s eager ({med(r['compiled']) / med(r['eager']):.2f}); "
                         f"{_payback(r)}.")
    if "optimum" in results or "sdcpp" in results:
        lines += optimum_report(results, args)
        draw_peer_chart(results, out_dir / "benchmark-peers.png", f"{size}, {m['cpu']}, {m['cores']} cores")
    snap = results["load_before"], results["load_after"]
    lines += ["", f"Machine load during the run: load average {' '.join(snap[0]['loadavg'])} before, "
                  f"{' '.join(snap[1]['loadavg'])} after; other busy processes: "
                  f"{'; '.join(snap[0]['others'] + snap[1]['others']) or 'none'}.",
              f"Medians of {args.repeats} alternating rounds (in-process parts) and {args.e2e_repeats} fresh "
              "processes per implementation (end to end). Both in-process parts run with "
              "`ldm.backend.memory.tuned_allocator()` for both implementations; the end-to-end child of ours calls "
              "it, diffusers' runs as it comes."]
    text = "\n".join(lines) + "\n"
    (out_dir / "benchmark.md").write_text(text)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=1, default=str))
    if rows:
        draw_chart(rows, out_dir / "benchmark.png", f"{size}, {m['cpu']}, {m['cores']} cores")
    return text


OURS, OURS_OV = "ours (torch)", "ours (--backend openvino)"
OPTIMUM, SDCPP = "OpenVINO (optimum)", "stable-diffusion.cpp"
PEER_PRECISIONS = {"full": "fp32", "bf16": "bf16"}  # --precisions entry -> label


def _wall(runs: list[dict] | None) -> float | None:
    return med([x["wall"] for x in runs]) if runs else None


def _rss(*runs: list[dict] | None) -> float | None:
    values = [x["rss"] for r in runs for x in (r or [])]
    return max(values) / GIB if values else None


def peer_figures(results: dict, precision: str) -> list[tuple[str, dict[str, float | None], str]]:
    """(measure, {implementation: value}, unit) for ours on both backends, OpenVINO's pipeline and
    stable-diffusion.cpp (fp32 only) at ``precision``, from the parts ``optimum`` and ``sdcpp``."""
    r = results.get("optimum", {}).get(precision, {})
    runs, sd = r.get("e2e", {}), (results.get("sdcpp", {}) if precision == "full" else {})

    def part(key: str, name: str) -> float | None:  # median over every round of every process
        return med([t for x in r[key] for t in x["times"][name]]) if r.get(key) else None

    def sd_stage(name: str) -> float | None:
        return med([x[name] for x in sd["sdcpp"]]) if sd.get("sdcpp") else None

    ours_wall = _wall(runs.get("ours") or sd.get("ours"))
    return [("UNet step, guided (batch 2)",
             {OURS: part("ours_parts", "unet"), OURS_OV: part("ours_openvino_parts", "unet"),
              OPTIMUM: part("optimum_parts", "unet"), SDCPP: sd_stage("step")}, "s"),
            ("VAE decode",
             {OURS: part("ours_parts", "decode"), OURS_OV: part("ours_openvino_parts", "decode"),
              OPTIMUM: part("optimum_parts", "decode"), SDCPP: sd_stage("decode")}, "s"),
            ("txt2img wall, first run (empty model cache)",
             {OURS: ours_wall, OURS_OV: _wall(runs.get("ours_openvino_first")),
              OPTIMUM: _wall(runs.get("optimum_first")), SDCPP: _wall(sd.get("sdcpp"))}, "s"),
            ("txt2img wall, model cache filled",
             {OURS: ours_wall, OURS_OV: _wall(runs.get("ours_openvino_cached")),
              OPTIMUM: _wall(runs.get("optimum_cached")), SDCPP: _wall(sd.get("sdcpp"))}, "s"),
            ("txt2img peak RSS",
             {OURS: _rss(runs.get("ours"), sd.get("ours")),
              OURS_OV: _rss(runs.get("ours_openvino_first"), runs.get("ours_openvino_cached")),
              OPTIMUM: _rss(runs.get("optimum_first"), runs.get("optimum_cached")), SDCPP: _rss(sd.get("sdcpp"))},
             "GB")]


def optimum_report(results: dict, args) -> list[str]:
    """Ours (torch backend, and OpenVINO backend where measured) against OpenVINO's own pipeline (optimum-intel)
    and stable-diffusion.cpp: step, decode, end to end first and cached, peak RSS; ratios to OpenVINO's."""
    opt = results.get("optimum", {})
    lines = ["", "## Against OpenVINO's own pipeline (optimum-intel, static shapes) and stable-diffusion.cpp", ""]
    if "export" in opt:
        lines.append(f"Export of the diffusers folder to OpenVINO IR (once): {opt['export']['export']:.0f} s, "
                     f"peak RSS {opt['export']['rss'] / GIB:.2f} GB.")
    names = [OURS, OURS_OV, OPTIMUM, SDCPP]
    others = [n for n in names if n != OPTIMUM]
    lines += ["", "| measure | " + " | ".join(names) + " | " + " | ".join(f"{n} / optimum" for n in others) + " |",
              "|---|" + "---:|" * (len(names) + len(others))]
    for precision, label in PEER_PRECISIONS.items():
        if precision not in opt and not (precision == "full" and "sdcpp" in results):
            continue
        for measure, values, unit in peer_figures(results, precision):
            theirs = values[OPTIMUM]
            cells = [f"{values[n]:.2f} {unit}" if values[n] is not None else "-" for n in names]
            ratios = [f"**{values[n] / theirs:.2f}**" if None not in (values[n], theirs) else "-" for n in others]
            lines.append(f"| {measure} ({label}) | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Every implementation runs in fresh processes, alternating (OpenVINO's pipeline and "
                  "stable-diffusion.cpp from environments of their own). UNet step and decode: medians of the rounds "
                  "of one process per implementation holding only its own model (OpenVINO's from the model caches "
                  "the end-to-end runs filled); stable-diffusion.cpp's are its sampling time over the steps (Euler: "
                  "one guided UNet evaluation per step, as DDIM) and its decode as its log times them. The torch "
                  "backend and stable-diffusion.cpp have no model cache: their first and later runs are one figure."]
    return lines


def draw_peer_chart(results: dict, path: Path, subtitle: str) -> None:
    """The peer figures of every measured precision as bars relative to OpenVINO's pipeline."""
    groups = [(f"{measure} ({label})", list(values.items()), unit)
              for precision, label in PEER_PRECISIONS.items() if precision in results.get("optimum", {})
              for measure, values, unit in peer_figures(results, precision) if values[OPTIMUM] is not None]
    if groups:
        draw_bars(groups, path, "relative to OpenVINO's own pipeline (shorter is better)", subtitle, OPTIMUM)


def _payback(r: dict) -> str:
    saved = med(r["eager"]) - med(r["compiled"])
    return f"pays back after {r['compile'] / saved:.0f} steps" if saved > 0 else "never pays back"


def draw_chart(rows: list[tuple], path: Path, subtitle: str) -> None:
    """Ours, diffusers and the original algorithm: bars relative to diffusers = 1.0."""
    groups = [(name, [("ours", ours), ("diffusers", theirs), ("original", original)], unit)
              for name, ours, theirs, original, unit in rows]
    draw_bars(groups, path, "relative to diffusers (shorter is better)", subtitle, "diffusers")


PALETTE = [(40, 110, 200), (150, 150, 150), (220, 120, 50), (60, 160, 90), (170, 80, 160)]


def draw_bars(groups: list[tuple[str, list[tuple[str, float | None]], str]], path: Path, title: str,
              subtitle: str, reference: str) -> None:
    """Horizontal bars, one group per measure ``(name, [(label, value)], unit)``, each bar's length its value
    over the group's ``reference`` value; drawn with PIL. Missing values (None) are left out."""
    from PIL import Image, ImageDraw

    labels = list(dict.fromkeys(k for _, values, _ in groups for k, _ in values))  # one colour each, in order
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    groups = [(name, [(k, v) for k, v in values if v is not None], unit) for name, values, unit in groups]
    bar_h, gap, left, width = 16, 14, 300, 980
    height = 70 + sum(len(values) * bar_h + gap for _, values, _ in groups) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    d.text((10, 26), subtitle, fill="gray")
    ratio = {name: {k: v / dict(values)[reference] for k, v in values} for name, values, _ in groups}
    scale_max = max(max(r.values()) for r in ratio.values())
    unit_px = (width - left - 230) / max(scale_max, 1.0)  # room for the longest bar's label
    y = 56
    for name, values, unit in groups:
        d.text((10, y + (len(values) * bar_h) // 2 - 6), name, fill="black")
        for label, value in values:
            r = ratio[name][label]
            d.rectangle([left, y, left + r * unit_px, y + bar_h - 3], fill=colors[label])
            d.text((left + r * unit_px + 4, y + 1), f"{label} {value:.2f} {unit} ({r:.2f})", fill="black")
            y += bar_h
        y += gap
    d.line([left + unit_px, 50, left + unit_px, height - 30], fill=(0, 0, 0))
    d.text((left + unit_px - 10, height - 26), "1.0", fill="black")
    img.save(path)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="load,unet,vae,compile,e2e,big")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the in-process parts")
    parser.add_argument("--e2e-repeats", type=int, default=1, help="fresh processes per implementation")
    parser.add_argument("--big-size", type=int, default=1024)
    parser.add_argument("--big-steps", type=int, default=2)
    parser.add_argument("--big-precision", default="bf16")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (fp16 in place of fp32/bf16)")
    parser.add_argument("--precisions", default="full,bf16", help="precisions measured on CPU")
    parser.add_argument("--no-original", dest="original", action="store_false")
    parser.add_argument("--quick", action="store_true", help="256x256, 2 steps, 1 round: a smoke test")
    parser.add_argument("--optimum-python", help="python of an environment with optimum-intel[openvino]: adds "
                        "OpenVINO's own pipeline as a peer (part 'optimum')")
    parser.add_argument("--sdcpp-python", help="python of an environment with stable-diffusion-cpp-python: adds "
                        "stable-diffusion.cpp as a peer (part 'sdcpp')")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ldm-benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--report", type=Path, help="write the report of a saved benchmark.json again (no runs)")
    parser.add_argument("--child", choices=["unet", "vae", "compile", "info"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        vars(args).update(results.get("args", {}))  # the settings it was measured with
        print(write_report(results, args, args.out))
        return
    if args.quick:
        args.size, args.steps, args.repeats, args.big_size, args.big_steps = 256, 2, 1, 512, 1

    if importlib.util.find_spec("diffusers") is None:
        sys.exit("diffusers is needed for the comparison (a benchmark-only peer): pip install diffusers")

    if args.child:
        paths = ensure_assets(args.workdir)
        children = {"unet": child_unet, "vae": child_vae, "compile": child_compile, "info": child_info}
        print(json.dumps(children[args.child](args, paths)))
        return

    # This process never imports torch: pages of torch's libraries that it mapped would stay resident in the
    # end-to-end children too (the kernel does not reclaim pages another process maps), unlike a user's run.
    parts = args.parts.split(",")
    child_args = [str(Path(__file__)), "--size", str(args.size), "--repeats", str(args.repeats), "--device",
                  args.device, "--workdir", str(args.workdir), "--precisions", args.precisions]
    child_args += [] if args.original else ["--no-original"]
    paths = asset_paths(args.workdir)
    if not assets_ready(paths):
        print(f"writing the benchmark's weights under {args.workdir} ...", flush=True)
    info = run_child([*child_args, "--child", "info"])  # also writes the weights where missing
    results: dict = {"machine": info["machine"], "load_before": load_snapshot(),
                     "args": {k: getattr(args, k) for k in ("size", "steps", "repeats", "e2e_repeats", "big_size")}}
    if "load" in parts:
        print("load ...", flush=True)
        rows = []
        for path, dtype in ((paths["ckpt"], "float32"), (paths["ckpt"], "bfloat16"), (paths["bf16"], "bfloat16")):
            r = run_child(["-c", CHILD_LOAD.format(config=CONFIG), str(path), dtype])
            rows.append({"file": path.suffix, "size": path.stat().st_size, "dtype": dtype, **r})
            print(f"  {path.name} -> {dtype}: {r['rss'] / GIB:.2f} GB", flush=True)
        results["load"] = {"rows": rows, "import_rss": run_child(["-c", CHILD_IMPORT])["rss"]}
    for part in ("unet", "vae", "compile"):
        if part in parts:
            print(f"{part} ...", flush=True)
            results[part] = run_child([*child_args, "--child", part])
    if "unet" in parts:
        results["peaks"] = info["peaks"]
    if "e2e" in parts:
        results["e2e"] = {}
        for precision in (args.precisions.split(",") if args.device == "cpu" else ["fp16"]):
            print(f"e2e {precision} ...", flush=True)
            results["e2e"][precision] = e2e(args, paths, precision)
    if "big" in parts:
        print(f"big {args.big_size} ...", flush=True)
        code = CHILD_E2E_OURS.format(config=CONFIG, prompt=PROMPT)
        r = run_child(["-c", code, str(paths["ckpt"]), str(args.big_size), str(args.big_steps), args.big_precision,
                       args.device])
        results["big"] = {**r, "precision": args.big_precision, "steps": args.big_steps}
    steps_only = "optimum_steps" in parts and "optimum" not in parts
    if args.optimum_python and ("optimum" in parts or steps_only or args.parts == parser.get_default("parts")):
        print("optimum ...", flush=True)
        results["optimum"] = optimum_runs(args, paths, child_args, steps_only)
    if args.sdcpp_python and ("sdcpp" in parts or args.parts == parser.get_default("parts")):
        print("stable-diffusion.cpp ...", flush=True)
        results["sdcpp"] = sdcpp_runs(args, paths)
    results["load_after"] = load_snapshot()
    print(write_report(results, args, args.out))


if __name__ == "__main__":
    main()
