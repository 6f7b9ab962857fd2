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

A run after the first needs no torch model: once converted, the networks' cache entries are recorded with what
else a run asks of the model (its schedule, sizes, scale factor and tokenizer pipeline, :func:`model_facts`) under
the checkpoint's sha256 and config, and :meth:`OpenVINOModel.from_record` runs from that record (no Lightning or
transformers import, no checkpoint read: about 4 s less per SD v1 run). A record is used only as it was written
(same library versions, the model code's files unchanged, every entry intact); the torch model is still built,
from a function given, for whatever needs it (a network to convert, a fallback, an attribute only it has).

The four networks are the model's own modules, converted (there is no second model definition): the UNet as the
DDPM wrapper calls it (x, t, context), what ``decode_first_stage`` computes (1 / scale_factor, ``post_quant_conv``,
decoder), what ``encode_first_stage`` computes (encoder, ``quant_conv`` -> the posterior's moments, the
distribution itself made in torch) and the CLIP text transformer (token ids -> hidden states; the tokenizer stays
in Python). Timesteps reach the UNet as float32, as the UNet's own timestep embedding casts them (DPM-Solver's are
fractional).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldm.backend.openvino import (
    OpenVINOPart,
    check_entry,
    default_cache_dir,
    files_digest,
    inference_precision_hint,
    library_versions,
    source_modules,
)
from ldm.modules.diffusionmodules.util import extract_into_tensor
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.modules import CLIPTokenIds, FrozenCLIPEmbedder
from ldm.util import write_json_atomically


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
RECORD_FORMAT = 1  # of a model record; bump when what it holds changes
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
NEEDED = ("text_encoder", "unet", "decoder")  # the networks txt2img runs: a record without one is not used


class UNetFront(nn.Module):
    """What a sampler sees as ``model.model`` (the DDPM wrapper): calls go to the OpenVINO UNet. It holds no
    parameters (so samplers keep x in float32); ``diffusion_model`` is the torch UNet (loaded if need be)."""

    def __init__(self, owner: OpenVINOModel, conditioning_key: str):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # a plain attribute, not a submodule: no parameters here
        self.conditioning_key = conditioning_key

    @property
    def diffusion_model(self) -> nn.Module:
        return self.owner.torch_model.model.diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None,
                c_crossattn: list | None = None) -> torch.Tensor:
        if c_concat:
            raise ValueError("the OpenVINO backend runs cross-attention conditioning (SD v1), not c_concat")
        context = torch.cat(c_crossattn, 1)
        (eps,) = self.owner.unet(x.float(), t.float(), context.float(), precision=self.owner.precision)
        return eps.to(x.dtype)


def model_facts(model: nn.Module) -> dict:
    """What a run needs of a loaded ``LatentDiffusion`` besides its networks' weights (kept in its record, so a run
    from the cache builds no torch model): geometry, scale factor, schedule, tokenizer settings, sizes."""
    unet = model.model.diffusion_model
    first_stage = model.first_stage_model
    cond_stage = model.cond_stage_model
    facts = {
        "class": type(model).__name__, "channels": int(model.channels), "image_size": int(model.image_size),
        "num_downs": int(getattr(model, "num_downs", 3)), "scale_factor": float(model.scale_factor),
        "parameterization": model.parameterization, "num_timesteps": int(model.num_timesteps),
        "conditioning_key": model.model.conditioning_key,
        "unet_downsampling": 2 ** (len(getattr(unet, "channel_mult", (1,))) - 1),
        "encoder_factor": 2 ** (len(first_stage.encoder.down) - 1) if hasattr(first_stage, "encoder") else 8,
        "unet_parameters": sum(p.numel() for p in model.model.parameters()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "global_step": getattr(model, "checkpoint_global_step", None),
        "schedule": {name: getattr(model, name).float().tolist() for name in SCHEDULE},
    }
    if isinstance(cond_stage, FrozenCLIPEmbedder) and model.cond_stage_forward is None:
        facts["tokenizer"] = CLIPTokenIds.state(cond_stage)  # None: no run without the torch model
    return facts


class OpenVINOModel:
    """A loaded ``LatentDiffusion`` whose UNet, autoencoder and CLIP text encoder run through OpenVINO on the CPU.

    ``model``: the torch model (its weights are read to convert, once per checkpoint; any stored dtype).
    ``precision``: ``fp32`` or ``bf16`` (where :func:`ldm.backend.openvino.cpu_computes_bf16`). ``model_hash``:
    the checkpoint's hash, or a function returning it (called when a network is first looked up), part of the
    cache key. ``cache_dir``: where converted networks are kept (``"default"``:
    :func:`~ldm.backend.openvino.default_cache_dir`; None: nothing written). ``say``: receives one-line notices
    (conversions, damaged cache entries). ``release_weights``: called with a torch part once OpenVINO holds it
    (e.g. :func:`ldm.backend.memory.release_file_pages`). ``fallback``: a network OpenVINO cannot convert or
    compile runs in torch, with a notice, instead of failing. ``identity``: what names this model (JSON, or a
    function returning it; e.g. the checkpoint's sha256 and its config): its cache entries and facts are recorded
    under it (``models/`` in the cache), from which :meth:`from_record` runs it later without building the torch
    model. Every other attribute is the torch model's. A network is converted, or read from the cache, and
    compiled at its first call with a new input shape.
    """

    def __init__(self, model: nn.Module | None, precision: str = "fp32",
                 model_hash: str | Callable[[], str | None] | None = None, cache_dir: str | Path | None = "default",
                 say: Callable[[str], None] | None = None, release_weights: Callable[[nn.Module], Any] | None = None,
                 fallback: bool = False, identity: Any = None, *,
                 load: Callable[[], nn.Module] | None = None, facts: dict | None = None):
        if model is not None:
            wrapper = model.model
            if getattr(wrapper, "conditioning_key", None) != "crossattn":
                raise ValueError(f"the OpenVINO backend runs cross-attention models (SD v1); this one's "
                                 f"conditioning_key is {getattr(wrapper, 'conditioning_key', None)!r}")
        inference_precision_hint(precision)  # fails now where the precision cannot run
        self._torch_model, self._load = model, load
        self.precision = precision
        self.say = say or (lambda message: None)
        facts = facts if facts is not None else model_facts(model)
        if model is None:  # what the torch model would answer, from its record
            self.__dict__.update(_facts_attributes(facts))
        self.facts = facts
        cache = default_cache_dir() if cache_dir == "default" else None if cache_dir is None else Path(cache_dir)
        self.cache_dir, self.identity = cache, identity
        self._record_data: dict | None = None
        common = {"cache_dir": cache, "model_hash": model_hash if callable(model_hash) else lambda: model_hash,
                  "say": self.say, "release_weights": release_weights, "fallback": fallback,
                  "on_entry": self._remember}
        batch = {0: ("batch", 1)}
        multiple, factor = facts["unet_downsampling"], facts["encoder_factor"]
        self.unet = OpenVINOPart("unet", None, None, [{**batch, 2: ("height", multiple), 3: ("width", multiple)},
                                                      batch, batch], keep=1, modules=self._unet_modules, **common)
        self.decoder = OpenVINOPart("decoder", None, None, [{**batch, 2: ("height", 1), 3: ("width", 1)}], keep=2,
                                    modules=self._decoder_modules, **common)
        self.encoder = OpenVINOPart("encoder", None, None, [{**batch, 2: ("height", factor), 3: ("width", factor)}],
                                    keep=2, modules=self._encoder_modules, **common)
        self.text_encoder = None
        if "tokenizer" in facts:  # CLIP
            self.text_encoder = OpenVINOPart("text_encoder", None, None, [batch], keep=2,
                                             modules=self._text_modules, **common)
        self.model = UNetFront(self, facts["conditioning_key"])

    @classmethod
    def from_record(cls, identity: Any, load: Callable[[], nn.Module], precision: str = "fp32",
                    cache_dir: str | Path = "default", **kwargs: Any) -> OpenVINOModel | None:
        """The model an earlier run recorded under ``identity`` (see ``identity``), with no torch model built: the
        cached networks, the schedule and the tokenizer are all a run needs. ``load`` builds the torch model
        should something else be asked of it (a network to convert, a fallback, an attribute only it has).
        None where there is no record, or it is unreadable, or made with other code, libraries or cache entries.
        Other arguments as for the constructor."""
        cache = default_cache_dir() if cache_dir == "default" else Path(cache_dir)
        data = read_record(record_path(cache, identity))
        if data is None:
            return None
        model = cls(None, precision, cache_dir=cache, identity=identity, load=load, facts=data["facts"], **kwargs)
        for part in model.parts:
            found = data["entries"].get(part.name)
            if found is not None:
                part.bind(cache / found["dir"], found["key"], found["types"])
        model._record_data = data
        return model

    # -------------------------------------------------------------- the torch model, when needed
    def _torch(self) -> nn.Module:
        model = self.__dict__.get("_torch_model")
        if model is None:
            load = self.__dict__.get("_load")
            if load is None:
                raise AttributeError("torch_model")
            model = self._torch_model = load()
        return model

    @property
    def torch_model(self) -> nn.Module:
        """The torch ``LatentDiffusion`` (built now if this model came from its record)."""
        return self._torch()

    def _unet_modules(self):
        unet = self._torch().model.diffusion_model
        return UNetCall(unet), unet

    def _decoder_modules(self):
        first_stage = self._torch().first_stage_model
        return DecodeCall(first_stage, float(self.facts["scale_factor"])), first_stage

    def _encoder_modules(self):
        first_stage = self._torch().first_stage_model
        return EncodeCall(first_stage), first_stage

    def _text_modules(self):
        transformer = self._torch().cond_stage_model.transformer
        return TextCall(transformer), transformer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._torch(), name)

    def __repr__(self) -> str:
        return f"OpenVINOModel({self.facts['class']}, precision={self.precision!r})"

    @property
    def parts(self) -> list[OpenVINOPart]:
        """The networks run through OpenVINO: text encoder (where it is CLIP), UNet, decoder, encoder."""
        return [p for p in (self.text_encoder, self.unet, self.decoder, self.encoder) if p is not None]

    @property
    def prompt_tokenizer(self):
        """What turns prompts into the text encoder's token ids (``tokenize``, ``count_tokens``, ``max_length``)."""
        tokens = self.__dict__.get("_prompt_tokens")
        if tokens is None:
            model = self.__dict__.get("_torch_model")
            if model is not None:
                tokens = model.cond_stage_model
            else:
                tokens = CLIPTokenIds(**self.facts["tokenizer"])
            self._prompt_tokens = tokens
        return tokens

    # -------------------------------------------------------------- the record
    def _remember(self, part: OpenVINOPart) -> None:
        """Add ``part``'s cache entry to the record file (written whole, atomically); a record that cannot be
        written only costs later runs the torch model's build."""
        identity = self.identity() if callable(self.identity) else self.identity
        if identity is None or self.cache_dir is None or part.entry is None:
            return
        record = record_path(self.cache_dir, identity)
        data = self._record_data
        if data is None:
            model = self._torch()
            modules = set(source_modules(model))
            for p in self.parts:
                if p.has_modules():
                    modules |= source_modules(p.call)
            files = {name: getattr(sys.modules[name], "__file__", None) for name in sorted(modules)}
            data = {"format": RECORD_FORMAT, "versions": library_versions(),
                    "code": {"files": files, "sha256": files_digest(files)},
                    "facts": self.facts, "entries": {}}
            self._record_data = data
        data["entries"][part.name] = {"dir": part.entry.name, "key": part.entry_key, "types": part.entry_types}
        with contextlib.suppress(OSError):
            write_json_atomically(record, data, prefix=".tmp-record-")

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
            return self._torch().get_learned_conditioning(c)
        (hidden,) = self.text_encoder(self.prompt_tokenizer.tokenize(list(c)), precision=self.precision)
        return hidden

    def release(self) -> None:
        """Drop every compiled network (their memory); the next calls compile again, from the cache."""
        for part in self.parts:
            part.release()

    def set_aside(self, name: str) -> None:
        """Drop the compiled networks of the torch model's part ``name`` (``model``: the UNet,
        ``first_stage_model``: the autoencoder, ``cond_stage_model``: the text encoder) while another part runs,
        as the pipeline does with a torch model's weights; its next call compiles it again, from the cache."""
        parts = {"model": [self.unet], "first_stage_model": [self.decoder, self.encoder],
                 "cond_stage_model": [self.text_encoder]}.get(name, [])
        for part in parts:
            if part is not None:
                part.release()


class _Schedule:
    """``q_sample`` and ``get_first_stage_encoding`` of ``LatentDiffusion`` over a record's schedule."""

    def __init__(self, facts: dict):
        self.sqrt_alphas_cumprod = torch.tensor(facts["schedule"]["sqrt_alphas_cumprod"], dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = torch.tensor(facts["schedule"]["sqrt_one_minus_alphas_cumprod"],
                                                          dtype=torch.float32)
        self.scale_factor = facts["scale_factor"]

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4), as ``DDPM.q_sample``."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """Posterior sample (or tensor) times ``scale_factor``, as ``LatentDiffusion.get_first_stage_encoding``."""
        z = encoder_posterior.sample() if isinstance(encoder_posterior, DiagonalGaussianDistribution) \
            else encoder_posterior
        return self.scale_factor * z


def _facts_attributes(facts: dict) -> dict:
    """The attributes a model from its record answers itself: the schedule buffers (float32, as the torch model
    registers them), its sizes and scale factor, ``q_sample`` and ``get_first_stage_encoding``."""
    schedule = _Schedule(facts)
    attributes = {name: torch.tensor(values, dtype=torch.float32) for name, values in facts["schedule"].items()}
    attributes.update({name: facts[name] for name in ("channels", "image_size", "num_downs", "scale_factor",
                                                       "parameterization", "num_timesteps")})
    attributes.update(q_sample=schedule.q_sample, get_first_stage_encoding=schedule.get_first_stage_encoding)
    return attributes


def record_path(cache_dir: str | Path, identity: Any) -> Path:
    """Where the record of a model lives in the OpenVINO cache ``cache_dir``: ``models/<digest>.json``, the digest
    of ``identity`` (JSON: e.g. the checkpoint's sha256 and the config's model entry)."""
    digest = hashlib.sha256(json.dumps([RECORD_FORMAT, identity], sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "models" / f"{digest[:32]}.json"


def read_record(path: Path) -> dict | None:
    """A model record, when it can be used as it stands: same format, library versions and code (the files it
    lists unchanged), every network txt2img needs present, and each entry intact; else None."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != RECORD_FORMAT or data.get("versions") != library_versions():
            return None
        files = data["code"]["files"]
        if files_digest(files) != data["code"]["sha256"]:
            return None
        if not data["facts"].get("tokenizer") or not all(name in data["entries"] for name in NEEDED):
            return None  # the torch model would be built anyway
        cache = path.parent.parent
        for found in data["entries"].values():
            check_entry(cache / found["dir"], found["key"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return data
