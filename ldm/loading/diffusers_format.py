"""The diffusers folder layout of an SD v1 model, both ways: key table, component configs, schedule.

A diffusers folder (``StableDiffusionPipeline.save_pretrained``, a Hugging Face hub snapshot) splits the model
into ``unet/``, ``vae/``, ``text_encoder/`` (each a ``config.json`` and a weights file), ``tokenizer/``,
``scheduler/`` and ``model_index.json``. The original single-file checkpoint holds the same tensors under the
``ldm`` module paths (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``)
plus the noise schedule (``betas``, ``alphas_cumprod``, ...).

The key table is derived from the layout, block by block: the UNet's ``input_blocks`` / ``middle_block`` /
``output_blocks`` are diffusers' ``down_blocks`` / ``mid_block`` / ``up_blocks`` (resnets, attentions,
down- and upsamplers), the autoencoder's ``down``/``mid``/``up`` likewise (its up levels numbered the other
way round). Each row maps a module prefix and names how the module's own tensors are called on each side
(:data:`SUFFIXES`); the autoencoder's mid attention is the one place where the tensors change shape (1x1
convolutions here, linear layers there: a view, never a copy). The text encoder's keys are transformers'
``CLIPTextModel`` keys under ``cond_stage_model.transformer.``; files written by transformers 4 nest them
under ``text_model.``, files written by transformers 5 do not, and both are read.

Nothing here imports diffusers: it is a file format, read and written with torch, safetensors and json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ldm.errors import LdmError

DIFFUSERS_VERSION = "0.42.1"  # the version whose loader this layout was checked against (tests/test_diffusers_format)
COMPONENTS = ("unet", "vae", "text_encoder")
# component -> (module prefix of our state dict, weight file stem, diffusers/transformers class)
PARTS = {
    "unet": ("model.diffusion_model.", "diffusion_pytorch_model", ("diffusers", "UNet2DConditionModel")),
    "vae": ("first_stage_model.", "diffusion_pytorch_model", ("diffusers", "AutoencoderKL")),
    "text_encoder": ("cond_stage_model.transformer.", "model", ("transformers", "CLIPTextModel")),
}
TEXT_MODEL_PREFIX = "text_model."  # transformers < 5 nest CLIPTextModel's modules under it
IGNORED_TEXT_KEYS = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")

# How the tensors of one kind of module are named: our sub-module -> diffusers' sub-module. "plain" modules
# (convolutions, norms, the spatial transformers: same names on both sides) keep their names.
SUFFIXES: dict[str, dict[str, str]] = {
    "plain": {},
    "resnet": {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"},
    "vae_resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                   "nin_shortcut": "conv_shortcut"},
    "vae_attention": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
}
# diffusers before 0.14 named the autoencoder's attention tensors differently; its files are still on the hub
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# the row kinds whose modules are closed sets (any other sub-module name is an error)
STRICT_KINDS = ("resnet", "vae_resnet", "vae_attention")


class DiffusersFormatError(LdmError):
    """A model or folder that does not fit the SD v1 diffusers layout; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """What the key table depends on: the UNet's levels (with or without attention) and res blocks per level,
    and the autoencoder's levels and res blocks per level."""

    unet_attention: tuple[bool, ...]
    unet_res_blocks: int
    vae_levels: int
    vae_res_blocks: int


def _get(mapping: Any, key: str, default: Any = None) -> Any:
    value = mapping.get(key, default) if mapping is not None else default
    return default if value is None else value


def layout_from_ldm(params: Mapping) -> Layout:
    """The layout of a ``LatentDiffusion`` config's ``model.params`` (a plain or OmegaConf mapping)."""
    unet = _get(_get(params, "unet_config", {}), "params", {})
    ae = _get(_get(_get(params, "first_stage_config", {}), "params", {}), "ddconfig", {})
    mults = list(_get(unet, "channel_mult", (1, 2, 4, 8)))
    attention_resolutions = [int(r) for r in _get(unet, "attention_resolutions", ())]
    return Layout(unet_attention=tuple(2 ** level in attention_resolutions for level in range(len(mults))),
                  unet_res_blocks=int(_get(unet, "num_res_blocks", 2)),
                  vae_levels=len(list(_get(ae, "ch_mult", (1, 2, 4, 4)))),
                  vae_res_blocks=int(_get(ae, "num_res_blocks", 2)))


def _single(value: Any, what: str) -> int:
    """``layers_per_block`` may be a per-block list in newer diffusers configs; SD v1 has one number."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise DiffusersFormatError(f"{what} differs between blocks ({list(value)}); an SD v1 model has one "
                                       f"number of layers per block")
        value = value[0]
    return int(value)


def layout_from_diffusers(unet_config: Mapping, vae_config: Mapping, folder: str | Path = "folder") -> Layout:
    """The layout of a diffusers folder's ``unet/config.json`` and ``vae/config.json``."""
    down = list(_get(unet_config, "down_block_types", ()))
    up = list(_get(unet_config, "up_block_types", ()))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    if not down or any(t not in kinds for t in down) or any(t not in up_kinds for t in up):
        raise DiffusersFormatError(f"{folder}: the UNet's blocks {down} / {up} are not those of an SD v1 model "
                                   f"(CrossAttnDownBlock2D/DownBlock2D, CrossAttnUpBlock2D/UpBlock2D)")
    attention = tuple(kinds[t] for t in down)
    if tuple(up_kinds[t] for t in up) != attention[::-1]:
        raise DiffusersFormatError(f"{folder}: the UNet's up blocks {up} do not mirror its down blocks {down}")
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise DiffusersFormatError(f"{folder}: the UNet's mid block {mid} is not UNetMidBlock2DCrossAttn (SD v1)")
    vae_down = list(_get(vae_config, "down_block_types", ()))
    if not vae_down or any(t != "DownEncoderBlock2D" for t in vae_down) or any(
            t != "UpDecoderBlock2D" for t in _get(vae_config, "up_block_types", ())):
        raise DiffusersFormatError(f"{folder}: the autoencoder's blocks are not those of an SD v1 model "
                                   f"(DownEncoderBlock2D, UpDecoderBlock2D)")
    return Layout(unet_attention=attention,
                  unet_res_blocks=_single(_get(unet_config, "layers_per_block", 2), "the UNet's layers_per_block"),
                  vae_levels=len(vae_down),
                  vae_res_blocks=_single(_get(vae_config, "layers_per_block", 2), "the autoencoder's layers_per_block"))


# ---------------------------------------------------------------------------------------------- key table
def key_table(layout: Layout) -> list[tuple[str, str, str]]:
    """Rows (our module prefix, diffusers module prefix as ``component/...``, kind) for ``layout``.

    Prefixes end in a dot; a key is mapped by its longest prefix in the table and the row's :data:`SUFFIXES`.
    """
    rows: list[tuple[str, str, str]] = []

    def row(ours: str, theirs: str, kind: str = "plain") -> None:
        rows.append((ours + ".", theirs + ".", kind))

    # UNet: input_blocks -> down_blocks, middle_block -> mid_block, output_blocks -> up_blocks
    u, d = "model.diffusion_model.", "unet/"
    row(u + "time_embed.0", d + "time_embedding.linear_1")
    row(u + "time_embed.2", d + "time_embedding.linear_2")
    row(u + "input_blocks.0.0", d + "conv_in")
    levels, n = len(layout.unet_attention), layout.unet_res_blocks
    block = 1
    for level, attention in enumerate(layout.unet_attention):
        for r in range(n):
            row(f"{u}input_blocks.{block}.0", f"{d}down_blocks.{level}.resnets.{r}", "resnet")
            if attention:
                row(f"{u}input_blocks.{block}.1", f"{d}down_blocks.{level}.attentions.{r}")
            block += 1
        if level != levels - 1:
            row(f"{u}input_blocks.{block}.0.op", f"{d}down_blocks.{level}.downsamplers.0.conv")
            block += 1
    row(u + "middle_block.0", d + "mid_block.resnets.0", "resnet")
    row(u + "middle_block.1", d + "mid_block.attentions.0")
    row(u + "middle_block.2", d + "mid_block.resnets.1", "resnet")
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        attention = layout.unet_attention[level]
        for r in range(n + 1):
            row(f"{u}output_blocks.{block}.0", f"{d}up_blocks.{up}.resnets.{r}", "resnet")
            if attention:
                row(f"{u}output_blocks.{block}.1", f"{d}up_blocks.{up}.attentions.{r}")
            if level and r == n:
                row(f"{u}output_blocks.{block}.{2 if attention else 1}.conv", f"{d}up_blocks.{up}.upsamplers.0.conv")
            block += 1
    row(u + "out.0", d + "conv_norm_out")
    row(u + "out.2", d + "conv_out")

    # autoencoder: encoder.down.i -> down_blocks.i, decoder.up.i -> up_blocks.(levels - 1 - i)
    f, v = "first_stage_model.", "vae/"
    levels, n = layout.vae_levels, layout.vae_res_blocks
    for part in ("encoder", "decoder"):
        row(f"{f}{part}.conv_in", f"{v}{part}.conv_in")
        row(f"{f}{part}.mid.block_1", f"{v}{part}.mid_block.resnets.0", "vae_resnet")
        row(f"{f}{part}.mid.attn_1", f"{v}{part}.mid_block.attentions.0", "vae_attention")
        row(f"{f}{part}.mid.block_2", f"{v}{part}.mid_block.resnets.1", "vae_resnet")
        row(f"{f}{part}.norm_out", f"{v}{part}.conv_norm_out")
        row(f"{f}{part}.conv_out", f"{v}{part}.conv_out")
    for level in range(levels):
        for r in range(n):
            row(f"{f}encoder.down.{level}.block.{r}", f"{v}encoder.down_blocks.{level}.resnets.{r}", "vae_resnet")
        if level != levels - 1:
            row(f"{f}encoder.down.{level}.downsample.conv", f"{v}encoder.down_blocks.{level}.downsamplers.0.conv")
        up = levels - 1 - level
        for r in range(n + 1):
            row(f"{f}decoder.up.{level}.block.{r}", f"{v}decoder.up_blocks.{up}.resnets.{r}", "vae_resnet")
        if level != 0:
            row(f"{f}decoder.up.{level}.upsample.conv", f"{v}decoder.up_blocks.{up}.upsamplers.0.conv")
    row(f + "quant_conv", v + "quant_conv")
    row(f + "post_quant_conv", v + "post_quant_conv")

    # text encoder: CLIPTextModel's keys, written in the transformers 4 nesting (read both ways)
    row("cond_stage_model.transformer", "text_encoder/" + TEXT_MODEL_PREFIX.rstrip("."))
    return rows


def _prefix_of(key: str, table: Mapping[str, Any]) -> str | None:
    """The longest prefix of ``key`` (ending in a dot) that is in ``table``."""
    end = key.rfind(".")
    while end > 0:
        if key[:end + 1] in table:
            return key[:end + 1]
        end = key.rfind(".", 0, end)
    return None


def _to_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t  # a 1x1 convolution kernel: a view


def _to_conv(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t


class KeyMap:
    """Our keys <-> diffusers keys (``component/key``) for one :class:`Layout`."""

    def __init__(self, layout: Layout):
        self.rows = key_table(layout)
        self.to_theirs = {ours: (theirs, kind) for ours, theirs, kind in self.rows}
        self.to_ours = {theirs: (ours, kind) for ours, theirs, kind in self.rows}
        self.inverse = {kind: {b: a for a, b in table.items()} for kind, table in SUFFIXES.items()}
        self.inverse["vae_attention"].update({old: self.inverse["vae_attention"][new]
                                              for old, new in LEGACY_VAE_ATTENTION.items()})

    def diffusers_key(self, key: str) -> str | None:
        """Our ``key`` -> ``component/key`` in the diffusers layout, or None when it has no place there."""
        prefix = _prefix_of(key, self.to_theirs)
        if prefix is None:
            return None
        theirs, kind = self.to_theirs[prefix]
        module, _, leaf = key[len(prefix):].rpartition(".")
        if kind == "plain":
            return theirs + key[len(prefix):]
        if module not in SUFFIXES[kind]:
            return None
        return f"{theirs}{SUFFIXES[kind][module]}.{leaf}"

    def our_key(self, key: str) -> str | None:
        """``component/key`` of a diffusers folder -> our key, or None when the table has no place for it."""
        prefix = _prefix_of(key, self.to_ours)
        if prefix is None:
            return None
        ours, kind = self.to_ours[prefix]
        module, _, leaf = key[len(prefix):].rpartition(".")
        if kind == "plain":
            return ours + key[len(prefix):]
        if module not in self.inverse[kind]:
            return None
        return f"{ours}{self.inverse[kind][module]}.{leaf}"

    def is_vae_attention_kernel(self, our_key: str) -> bool:
        prefix = _prefix_of(our_key, self.to_theirs)
        return (prefix is not None and self.to_theirs[prefix][1] == "vae_attention"
                and our_key.endswith(".weight") and not our_key[len(prefix):].startswith("norm."))


def to_diffusers(state_dict: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, dict[str, torch.Tensor]]:
    """Our model tensors -> {component: {key: tensor}} in the diffusers layout (views, no copies).

    ``state_dict`` holds the module weights only (no schedule buffers, no EMA copies); a key with no place in
    the layout is an error that names it.
    """
    keys = KeyMap(layout)
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    unplaced = []
    for key, tensor in state_dict.items():
        theirs = keys.diffusers_key(key)
        if theirs is None:
            unplaced.append(key)
            continue
        component, name = theirs.split("/", 1)
        out[component][name] = _to_linear(tensor) if keys.is_vae_attention_kernel(key) else tensor
    if unplaced:
        raise DiffusersFormatError(f"{len(unplaced)} tensors have no place in the diffusers layout of an SD v1 "
                                   f"model: {_names(unplaced)}")
    return out


def from_diffusers(components: Mapping[str, Mapping[str, torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    """{component: {key: tensor}} of a diffusers folder -> our keys (views, no copies).

    Text-encoder keys may come in the transformers 4 nesting (``text_model.*``) or the transformers 5 one; its
    ``position_ids`` are dropped. A key the table has no place for is kept as ``component/key``, so that the
    strict loader names it among the unexpected keys; two files giving one key is an error.
    """
    keys = KeyMap(layout)
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for component, tensors in components.items():
        for name, tensor in tensors.items():
            if component == "text_encoder":
                if name in IGNORED_TEXT_KEYS:
                    continue
                if not name.startswith(TEXT_MODEL_PREFIX):
                    name = TEXT_MODEL_PREFIX + name
            ours = keys.our_key(f"{component}/{name}")
            if ours is None:
                ours = f"{component}/{name}"
            elif keys.is_vae_attention_kernel(ours):
                tensor = _to_conv(tensor)
            if ours in out:
                raise DiffusersFormatError(f"{component}: {sources[ours]} and {name} are the same weight "
                                           f"({ours}); remove one")
            out[ours], sources[ours] = tensor, name
    return out


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---------------------------------------------------------------------------------------------- schedule
def scheduler_config(params: Mapping) -> dict:
    """The DDIM scheduler config of the original schedule: ``linear_start``/``linear_end``/``timesteps`` of
    the config, its "linear" beta schedule (linear in sqrt(beta): diffusers' ``scaled_linear``), the first
    timestep 1 (``steps_offset``), alpha_cumprod[0] after the last step (``set_alpha_to_one`` False) and no
    clipping of x0, as the original DDIM sampler does."""
    schedules = {"linear": "scaled_linear", "sqrt_linear": "linear"}
    schedule = str(_get(params, "beta_schedule", "linear"))
    if schedule not in schedules or _get(params, "given_betas") is not None:
        raise DiffusersFormatError(f"beta_schedule {schedule} has no diffusers equivalent here; SD v1 uses linear")
    parameterization = str(_get(params, "parameterization", "eps"))
    if parameterization != "eps":
        raise DiffusersFormatError(f"parameterization {parameterization}: only eps (SD v1) is supported")
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": float(_get(params, "linear_start", 1e-4)), "beta_end": float(_get(params, "linear_end", 2e-2)),
        "beta_schedule": schedules[schedule], "num_train_timesteps": int(_get(params, "timesteps", 1000)),
        "trained_betas": None, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
        "prediction_type": "epsilon", "timestep_spacing": "leading", "skip_prk_steps": True,
    }


def schedule_buffers(config: Mapping) -> dict[str, torch.Tensor]:
    """The schedule buffers of the original state dict (``betas``, ``alphas_cumprod``, ...) for a diffusers
    scheduler config, computed as ``DDPM.register_schedule`` does: in float64, stored as float32."""
    n = int(_get(config, "num_train_timesteps", 1000))
    start, end = float(_get(config, "beta_start", 1e-4)), float(_get(config, "beta_end", 2e-2))
    schedule = _get(config, "beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise DiffusersFormatError(f"scheduler beta_schedule {schedule} is not one of SD v1's (scaled_linear)")
    if str(_get(config, "prediction_type", "epsilon")) != "epsilon":
        raise DiffusersFormatError(f"scheduler prediction_type {config.get('prediction_type')}: only epsilon "
                                   f"(SD v1) is supported")
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    variance = betas * (1.0 - prev) / (1.0 - cumprod)  # Ho et al. eq. 7, v_posterior = 0
    values = [betas, cumprod, prev, cumprod.sqrt(), (1.0 - cumprod).sqrt(), (1.0 - cumprod).log(),
              (1.0 / cumprod).sqrt(), (1.0 / cumprod - 1).sqrt(), variance, variance.clamp(min=1e-20).log(),
              betas * prev.sqrt() / (1.0 - cumprod), (1.0 - prev) * alphas.sqrt() / (1.0 - cumprod)]
    return {key: value.float() for key, value in zip(SCHEDULE_KEYS, values)}


# ---------------------------------------------------------------------------------------------- configs
def _heads_per_level(unet: Mapping) -> list[int]:
    """Attention heads of each UNet level, as ``UNetModel`` chooses them (num_heads, or channels per head)."""
    model_channels = int(unet["model_channels"])
    num_heads, head_channels = int(_get(unet, "num_heads", -1)), int(_get(unet, "num_head_channels", -1))
    heads = []
    for mult in _get(unet, "channel_mult", (1, 2, 4, 8)):
        ch = model_channels * int(mult)
        heads.append(num_heads if head_channels == -1 else ch // head_channels)
    return heads


def unet_config(params: Mapping) -> dict:
    """``unet/config.json`` for a ``LatentDiffusion`` config's params; unsupported UNet options are errors."""
    unet = _get(_get(params, "unet_config", {}), "params", {})
    # the UNet options SD v1 has, with their defaults: any other value has no place in the diffusers layout
    sd_v1 = {"use_spatial_transformer": (True, False), "resblock_updown": (False, False),
             "use_scale_shift_norm": (False, False), "conv_resample": (True, True)}
    other = [f"{name}: {not want}" for name, (want, default) in sd_v1.items()
             if bool(_get(unet, name, default)) != want]
    if other:
        raise DiffusersFormatError(f"the UNet has {', '.join(other)}, which the SD v1 diffusers layout cannot hold")
    if _get(unet, "num_classes") is not None or int(_get(unet, "dims", 2)) != 2:
        raise DiffusersFormatError("the UNet is class-conditional or not 2-D; the SD v1 diffusers layout cannot "
                                   "hold it")
    mults = [int(m) for m in _get(unet, "channel_mult", (1, 2, 4, 8))]
    if mults[0] != 1:
        raise DiffusersFormatError(f"the UNet's channel_mult {mults} does not start with 1; diffusers' conv_in "
                                   f"and time embedding cannot hold it")
    heads = _heads_per_level(unet)
    upsample_heads = int(_get(unet, "num_heads_upsample", -1))
    if upsample_heads not in (-1, int(_get(unet, "num_heads", -1))) and int(_get(unet, "num_head_channels", -1)) == -1:
        raise DiffusersFormatError("the UNet has other head counts up than down (num_heads_upsample); diffusers "
                                   "cannot hold it")
    context_dim = _get(unet, "context_dim")
    if not isinstance(context_dim, int):
        dims = [int(d) for d in context_dim] if context_dim is not None else []
        if len(set(dims)) != 1:
            raise DiffusersFormatError(f"the UNet's context_dim {context_dim} is not one number; the SD v1 "
                                       f"diffusers layout needs one cross-attention width")
        context_dim = dims[0]
    depth = _get(unet, "transformer_depth", 1)
    layout = layout_from_ldm(params)
    channels = int(unet["model_channels"])
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,  # diffusers' name for the head count
        "block_out_channels": [channels * m for m in mults],
        "center_input_sample": False,
        "cross_attention_dim": int(context_dim),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.unet_attention],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": int(unet["in_channels"]),
        "layers_per_block": layout.unet_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": int(unet["out_channels"]),
        "sample_size": int(_get(params, "image_size", 64)),
        "transformer_layers_per_block": int(depth),
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(layout.unet_attention)],
        "use_linear_projection": False,
        "upcast_attention": False,
    }


def vae_config(params: Mapping) -> dict:
    """``vae/config.json`` for a ``LatentDiffusion`` config's params (``scaling_factor``: its scale_factor)."""
    first = _get(_get(params, "first_stage_config", {}), "params", {})
    ae = _get(first, "ddconfig", {})
    mults = [int(m) for m in _get(ae, "ch_mult", (1, 2, 4, 4))]
    if list(_get(ae, "attn_resolutions", ())) or not bool(_get(ae, "double_z", True)) or mults[0] != 1:
        raise DiffusersFormatError("the autoencoder has attention inside its levels, a single z or a first "
                                   "ch_mult other than 1; the SD v1 diffusers layout cannot hold it")
    if int(_get(first, "embed_dim", 4)) != int(ae["z_channels"]):
        raise DiffusersFormatError(f"the autoencoder's embed_dim {first.get('embed_dim')} differs from its "
                                   f"z_channels {ae['z_channels']}; diffusers' AutoencoderKL has one latent width")
    if bool(_get(params, "scale_by_std", False)):
        raise DiffusersFormatError("scale_by_std: the scale factor lives in the checkpoint; set scale_by_std: False "
                                   "and scale_factor to its value")
    layout = layout_from_ldm(params)
    ch = int(ae["ch"])
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [ch * m for m in mults],
        "down_block_types": ["DownEncoderBlock2D"] * layout.vae_levels,
        "in_channels": int(ae["in_channels"]),
        "latent_channels": int(ae["z_channels"]),
        "layers_per_block": layout.vae_res_blocks,
        "norm_num_groups": 32,
        "out_channels": int(ae["out_ch"]),
        "sample_size": int(_get(params, "image_size", 64)) * 2 ** (layout.vae_levels - 1),
        "scaling_factor": float(_get(params, "scale_factor", 1.0)),
        "up_block_types": ["UpDecoderBlock2D"] * layout.vae_levels,
    }


def model_index(safety_checker: bool) -> dict:
    """``model_index.json`` of a ``StableDiffusionPipeline`` (with or without the safety checker)."""
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": ["transformers", "CLIPImageProcessor"] if safety_checker else [None, None],
        "requires_safety_checker": safety_checker,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if safety_checker else [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": list(PARTS["text_encoder"][2]),
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": list(PARTS["unet"][2]),
        "vae": list(PARTS["vae"][2]),
    }


def check_fits(folder: str | Path, params: Mapping) -> None:
    """Refuse a diffusers folder whose settings that no tensor shape shows differ from the config's: the noise
    schedule, the latent scale factor and the UNet's head counts (each named, with both values)."""
    folder = Path(folder)
    if _get(params, "unet_config") is None or _get(params, "first_stage_config") is None:
        return  # not a latent diffusion config: the strict key check speaks
    theirs = _read_json(folder / "scheduler" / "scheduler_config.json")
    ours = scheduler_config(params)
    a, b = schedule_buffers(theirs)["betas"], schedule_buffers(ours)["betas"]
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=0):
        settings = ", ".join(f"{name} {theirs.get(name)}" for name in (
            "beta_start", "beta_end", "beta_schedule", "num_train_timesteps") if name in theirs)
        raise DiffusersFormatError(f"{folder}: the scheduler's noise schedule ({settings}) differs from the "
                                   f"config's (linear_start {ours['beta_start']}, linear_end {ours['beta_end']}, "
                                   f"timesteps {ours['num_train_timesteps']}); use the config the folder was made "
                                   f"from")
    vae = _read_json(folder / "vae" / "config.json")
    scale = float(_get(vae, "scaling_factor", 0.18215))
    factor = float(_get(params, "scale_factor", 1.0))
    if abs(scale - factor) > 1e-6 * abs(factor):
        raise DiffusersFormatError(f"{folder}: the autoencoder's scaling_factor {scale} differs from the config's "
                                   f"scale_factor {factor}; use the config the folder was made from")
    unet = _read_json(folder / "unet" / "config.json")
    layout = layout_from_diffusers(unet, vae, folder)
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    levels = len(layout.unet_attention)
    heads = [int(h) for h in heads] if isinstance(heads, (list, tuple)) else [int(heads)] * levels
    want = _heads_per_level(_get(_get(params, "unet_config", {}), "params", {}))
    used = [level for level in range(levels) if layout.unet_attention[level] or level == levels - 1]  # + mid
    if len(heads) != len(want) or any(heads[level] != want[level] for level in used):
        raise DiffusersFormatError(f"{folder}: the UNet has {heads} attention heads per level, the config "
                                   f"{want}; use the config the folder was made from")


# ---------------------------------------------------------------------------------------------- folders
def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder in the diffusers layout (``model_index.json``, or ``unet/`` and ``vae/``)."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (
        (path / "unet" / "config.json").is_file() and (path / "vae" / "config.json").is_file()))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffusersFormatError(f"{path} is missing; the diffusers folder is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffusersFormatError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{path} is not a JSON object")
    return data


def weight_files(folder: str | Path, component: str) -> list[Path]:
    """The weight files of one component: ``.safetensors`` preferred over ``.bin``, the plain file over an
    ``fp16`` variant, a sharded checkpoint through its index. Empty when there are none."""
    sub, stem = Path(folder) / component, PARTS[component][1]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (sub / name).is_file():
            return [sub / name]
        index = sub / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise DiffusersFormatError(f"{index} has no weight_map")
            return [sub / str(f) for f in dict.fromkeys(weight_map.values())]
    return []


def all_weight_files(folder: str | Path) -> list[Path]:
    return [path for component in COMPONENTS for path in weight_files(folder, component)]


def _default_reader(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_folder(folder: str | Path,
                read_file: Callable[[Path], Mapping[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers folder in the original layout (module weights and schedule buffers).

    ``read_file`` reads one weight file (default: safetensors / ``torch.load(weights_only=True)``); the loader
    passes its memory-mapping reader, so the tensors are views of the files. A component without weights is
    left out (the strict loader then names what is missing).
    """
    folder = Path(folder)
    read_file = read_file or _default_reader
    layout = layout_from_diffusers(_read_json(folder / "unet" / "config.json"),
                                   _read_json(folder / "vae" / "config.json"), folder)
    components: dict[str, dict[str, torch.Tensor]] = {}
    for component in COMPONENTS:
        tensors: dict[str, torch.Tensor] = {}
        for path in weight_files(folder, component):
            for key, value in read_file(path).items():
                if key in tensors:
                    raise DiffusersFormatError(f"{key} is in more than one weight file of {folder / component}")
                tensors[key] = value
        components[component] = tensors
    state_dict = from_diffusers(components, layout)
    state_dict.update(schedule_buffers(_read_json(folder / "scheduler" / "scheduler_config.json")))
    return state_dict
