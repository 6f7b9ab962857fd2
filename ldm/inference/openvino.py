"""A loaded latent diffusion model whose networks run through OpenVINO on the CPU (:mod:`ldm.backend.openvino`).

    from ldm.inference.openvino import OpenVINOModel
    ov_model = OpenVINOModel(model, precision="fp32", model_hash=model_hash.result)
    c = ov_model.get_learned_conditioning(["a photograph of an astronaut riding a horse"])
    z, _ = DDIMSampler(ov_model).sample(S=50, conditioning=c, ...)    # every sampler runs unchanged
    x = ov_model.decode_first_stage(z)

:class:`OpenVINOModel` stands in for the model: ``apply_model``, ``decode_first_stage``, ``encode_first_stage``
and ``get_learned_conditioning`` run through OpenVINO; every other attribute (the schedule buffers, ``q_sample``,
``scale_factor``, ``get_first_stage_encoding``, the torch parts) is the torch model's, so the samplers,
image-to-image, the tiled autoencoder and :class:`~ldm.inference.pipeline.Pipeline` take it in place of the model.

The four networks are the model's own modules, converted (there is no second model definition): the UNet as the
DDPM wrapper calls it (x, t, context), what ``decode_first_stage`` computes (1 / scale_factor, ``post_quant_conv``,
decoder), what ``encode_first_stage`` computes (encoder, ``quant_conv`` -> the posterior's moments, the
distribution itself made in torch) and the CLIP text transformer (token ids -> hidden states; the tokenizer stays
in Python). Timesteps reach the UNet as float32, as the UNet's own timestep embedding casts them (DPM-Solver's are
fractional).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldm.backend.openvino import OpenVINOPart, default_cache_dir, inference_precision_hint
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.modules import FrozenCLIPEmbedder


# ---------------------------------------------------------------------------------------------- traced callables
class UNetCall(nn.Module):
    """(x (B, C, H, W), t (B,) float32, context (B, T, D)) -> eps (B, C, H, W): the UNet as ``DiffusionWrapper``
    calls it for cross-attention conditioning."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=context)


class DecodeCall(nn.Module):
    """Scaled latents z (B, 4, h, w) -> images (B, 3, f h, f w): ``LatentDiffusion.decode_first_stage``."""

    def __init__(self, first_stage: nn.Module, scale_factor: float):
        super().__init__()
        self.first_stage = first_stage
        self.scale_factor = scale_factor

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor!r}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(1.0 / self.scale_factor * z)


class EncodeCall(nn.Module):
    """Images x (B, 3, H, W) -> the posterior's moments (B, 2 embed_dim, H/f, W/f): ``encode_first_stage``."""

    def __init__(self, first_stage: nn.Module):
        super().__init__()
        self.first_stage = first_stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first_stage.encode(x).parameters


class TextCall(nn.Module):
    """Token ids (B, T) -> the CLIP text transformer's last hidden states (B, T, D)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=input_ids).last_hidden_state


# ---------------------------------------------------------------------------------------------- the model
class UNetFront(nn.Module):
    """What a sampler sees as ``model.model`` (the DDPM wrapper): calls go to the OpenVINO UNet. It holds no
    parameters (so samplers keep x in float32) and ``diffusion_model`` is the torch UNet (for its geometry)."""

    def __init__(self, owner: OpenVINOModel, wrapper: nn.Module):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # plain attributes, not submodules: no parameters here
        object.__setattr__(self, "diffusion_model", wrapper.diffusion_model)
        self.conditioning_key = wrapper.conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None,
                c_crossattn: list | None = None) -> torch.Tensor:
        if c_concat:
            raise ValueError("the OpenVINO backend runs cross-attention conditioning (SD v1), not c_concat")
        context = torch.cat(c_crossattn, 1)
        (eps,) = self.owner.unet(x.float(), t.float(), context.float(), precision=self.owner.precision)
        return eps.to(x.dtype)


class OpenVINOModel:
    """A loaded ``LatentDiffusion`` whose UNet, autoencoder and CLIP text encoder run through OpenVINO on the CPU.

    ``model``: the torch model (its weights are read to convert, once per checkpoint; any stored dtype).
    ``precision``: ``fp32`` or ``bf16`` (where :func:`ldm.backend.openvino.cpu_computes_bf16`). ``model_hash``:
    the checkpoint's hash, or a function returning it (called when a network is first looked up), part of the
    cache key. ``cache_dir``: where converted networks are kept (``"default"``:
    :func:`~ldm.backend.openvino.default_cache_dir`; None: nothing written). ``say``: receives one-line notices
    (conversions, damaged cache entries). ``release_weights``: called with a torch part once OpenVINO holds it
    (e.g. :func:`ldm.backend.memory.release_file_pages`). ``fallback``: a network OpenVINO cannot convert or
    compile runs in torch, with a notice, instead of failing. Every other attribute is the torch model's. A network
    is converted, or read from the cache, and compiled at its first call with a new input shape.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32",
                 model_hash: str | Callable[[], str | None] | None = None, cache_dir: str | Path | None = "default",
                 say: Callable[[str], None] | None = None, release_weights: Callable[[nn.Module], Any] | None = None,
                 fallback: bool = False):
        wrapper = model.model
        if getattr(wrapper, "conditioning_key", None) != "crossattn":
            raise ValueError(f"the OpenVINO backend runs cross-attention models (SD v1); this one's conditioning_key "
                             f"is {getattr(wrapper, 'conditioning_key', None)!r}")
        inference_precision_hint(precision)  # fails now where the precision cannot run
        self.torch_model = model
        self.precision = precision
        cache = default_cache_dir() if cache_dir == "default" else None if cache_dir is None else Path(cache_dir)
        common = {"cache_dir": cache, "model_hash": model_hash if callable(model_hash) else lambda: model_hash,
                  "say": say or (lambda message: None),
                  "release_weights": release_weights, "fallback": fallback}
        unet = wrapper.diffusion_model
        multiple = 2 ** (len(getattr(unet, "channel_mult", (1,))) - 1)  # the UNet's downsampling
        self.unet = OpenVINOPart("unet", UNetCall(unet), unet,
                                 [{0: ("batch", 1), 2: ("height", multiple), 3: ("width", multiple)},
                                  {0: ("batch", 1)}, {0: ("batch", 1)}], keep=1, **common)
        first_stage = model.first_stage_model
        self.decoder = OpenVINOPart("decoder", DecodeCall(first_stage, float(model.scale_factor)), first_stage,
                                    [{0: ("batch", 1), 2: ("height", 1), 3: ("width", 1)}], keep=2, **common)
        factor = 2 ** (len(first_stage.encoder.down) - 1) if hasattr(first_stage, "encoder") else 8
        self.encoder = OpenVINOPart("encoder", EncodeCall(first_stage), first_stage,
                                    [{0: ("batch", 1), 2: ("height", factor), 3: ("width", factor)}], keep=2,
                                    **common)
        self.text_encoder = None
        cond_stage = model.cond_stage_model
        if isinstance(cond_stage, FrozenCLIPEmbedder) and model.cond_stage_forward is None:
            self.text_encoder = OpenVINOPart("text_encoder", TextCall(cond_stage.transformer), cond_stage.transformer,
                                             [{0: ("batch", 1)}], keep=2, **common)
        self.model = UNetFront(self, wrapper)

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("torch_model")
        if model is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(model, name)

    def __repr__(self) -> str:
        return f"OpenVINOModel({type(self.torch_model).__name__}, precision={self.precision!r})"

    @property
    def parts(self) -> list[OpenVINOPart]:
        """The networks run through OpenVINO: text encoder (where it is CLIP), UNet, decoder, encoder."""
        return [p for p in (self.text_encoder, self.unet, self.decoder, self.encoder) if p is not None]

    # -------------------------------------------------------------- the model's interface
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        """UNet prediction for x_noisy (B, C, h, w) at t (B,) under ``cond`` (a tensor (B, T, D), a list of them or
        ``{"c_crossattn": [...]}``), as ``LatentDiffusion.apply_model``."""
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1]; a bf16 decode that overflows is redone
        in float32."""
        (x,) = self.decoder(z.float(), precision=self.precision)
        if self.precision != "fp32" and not torch.isfinite(x).all():
            (x,) = self.decoder(z.float(), precision="fp32")
        return x

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] -> the first stage's posterior."""
        (moments,) = self.encoder(x.float(), precision=self.precision)
        return DiagonalGaussianDistribution(moments)

    @torch.no_grad()
    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Prompts -> CLIP hidden states (B, 77, D) (the tokenizer in Python, the transformer in OpenVINO); other
        conditioning stages run in torch."""
        if self.text_encoder is None or not isinstance(c, (list, tuple)):
            return self.torch_model.get_learned_conditioning(c)
        tokens = self.torch_model.cond_stage_model.tokenize(list(c))
        (hidden,) = self.text_encoder(tokens, precision=self.precision)
        return hidden

    def release(self) -> None:
        """Drop every compiled network (their memory); the next calls compile again, from the cache."""
        for part in self.parts:
            part.release()
