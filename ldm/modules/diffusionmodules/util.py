"""Building blocks of the diffusion UNet and the noise schedule (the original's ``diffusionmodules/util.py``)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ldm.modules.ops import Conv2d


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas of length ``n_timestep`` in float64.

    "linear" is Stable Diffusion's "scaled linear" schedule: linear in sqrt(beta).
    "cosine" is Nichol & Dhariwal (2021) eq. 17.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown; use linear, cosine, sqrt_linear or sqrt.")
    return betas.numpy()


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Gather ``a[t]`` per batch element and shape it to broadcast against ``x_shape``: (B, 1, 1, ...)."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def noise_like(shape: Sequence[int], device: torch.device, repeat: bool = False) -> torch.Tensor:
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def checkpoint(func: Callable, inputs: Sequence, params: Iterable, flag: bool):
    """Gradient checkpointing of ``func(*inputs)`` when ``flag`` is set and a backward pass will follow.

    At inference (no grad) this is a plain call, so ``use_checkpoint: True`` in a config costs nothing there.
    """
    if flag and torch.is_grad_enabled():
        return torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embeddings (B,) -> (B, dim), cos half first, as in the original."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 for half inputs (as the original); no copy for float32/bfloat16 inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        return super().forward(x)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


class SiLU(nn.SiLU):
    """Kept for configs and code that import ``SiLU`` from here."""


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Module:
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def _strictly_increasing_below(steps: np.ndarray, upper: int) -> np.ndarray:
    """The nearest strictly increasing integer sequence in [0, upper - 1]; the identity on one that is already.

    A repeated step moves up to the next free timestep; steps that then reach ``upper`` move down from the top.
    Needs ``len(steps) <= upper``.
    """
    out = steps.astype(np.int64)
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1] + 1)
    out[-1] = min(out[-1], upper - 1)
    for k in range(len(out) - 2, -1, -1):
        out[k] = min(out[k], out[k + 1] - 1)
    return out


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = True) -> np.ndarray:
    """The DDPM timesteps a DDIM/PLMS sampler visits, ascending, int64 in [0, num_ddpm_timesteps - 1].

    Same as the original wherever the original gives a usable schedule:
    - "uniform": every c-th step from 1, c = T // S (``range(0, T, c) + 1``). Like the original this can run
      more steps than asked (S = 334 gives 500 steps).
    - "quad": ``int(linspace(0, sqrt(0.8 T), S) ** 2) + 1``, quadratic spacing up to 0.8 T.
    Where the original breaks, the schedule has exactly S steps:
    - uniform, when ``range(0, T, c) + 1`` reaches T (the original then indexes alphas_cumprod[T] and crashes:
      S = 3, 9, 27, 36, 37, 101..111, 251..333, 501..1000 for T = 1000): S evenly spaced steps ``floor(k T / S) + 1``,
      k = 0..S-1, the original's rule with a fractional stride (S = 3 gives 1, 334, 667);
    - quad, when integer rounding repeats a timestep (S >= 30 for T = 1000; a repeated step is a wasted UNet
      call in the original): each repeat moves up to the next free timestep.
    S = T leaves no room for the +1 shift and gives every timestep 0..T-1.
    """
    T, S = int(num_ddpm_timesteps), int(num_ddim_timesteps)
    if not 1 <= S <= T:
        raise ValueError(f"the number of sampling steps must be between 1 and {T}, got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        steps = np.arange(0, T, T // S, dtype=np.int64) + 1
        if steps[-1] >= T:
            steps = np.arange(S, dtype=np.int64) * T // S + 1
    elif ddim_discr_method == "quad":
        steps = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64) + 1
    else:
        raise ValueError(f"ddim_discretize '{ddim_discr_method}' unknown; use 'uniform' or 'quad'")
    steps = _strictly_increasing_below(steps, T)
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps}")
    return steps


def make_ddim_sampling_parameters(alphacums: torch.Tensor | np.ndarray, ddim_timesteps: np.ndarray, eta: float,
                                  verbose: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigmas, alphas, alphas_prev), each (S,) float32, for DDIM (Song et al. 2021, eq. 16).

    alphas = alpha_bar[tau_i], alphas_prev = alpha_bar[tau_{i-1}] with alpha_bar[0] before the first step,
    sigmas = eta * sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)) (computed in float64).
    Tensors come back on the device of ``alphacums`` (CPU for an array).
    """
    alphacums = torch.as_tensor(alphacums)
    index = torch.as_tensor(np.asarray(ddim_timesteps, dtype=np.int64), device=alphacums.device)
    alphas = alphacums[index].float()
    alphas_prev = torch.cat([alphacums[:1], alphacums[index[:-1]]]).float()
    a, a_prev = alphas.cpu().double(), alphas_prev.cpu().double()
    sigmas = (eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))).float().to(alphacums.device)
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule "
              f"for ddim sampler {sigmas}")
    return sigmas, alphas, alphas_prev
