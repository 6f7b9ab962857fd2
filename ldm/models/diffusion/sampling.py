"""One sampling core for DDIM, PLMS and DPM-Solver++: guidance, x0 prediction, update rules, loop and front.

Notation: alpha_bar_t = ``model.alphas_cumprod[t]``, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
A *solver* takes one step at a time (``step(x, i) -> (x_next, pred_x0)``); :func:`run_steps` walks it with
the original's progress bar, callbacks and intermediates; :class:`Sampler` is the original's public interface
(``sample``, ``make_schedule``, ``stochastic_encode``, ``decode``) over both. ``DDIMSampler``, ``PLMSSampler``
and ``DPMSolverSampler`` only choose a solver.

Randomness is drawn where and as the original draws it (``x_T`` with ``torch.randn(shape, device=...)`` when not
given; one ``noise_like`` draw per DDIM update, also when eta = 0; ``randn_like`` in ``q_sample`` for masks), so a
seed gives the same images and leaves the generator in the same state. With ``generator=`` (one CPU
``torch.Generator`` per sample), ``sample`` and ``decode`` draw each sample's noise from its own generator
instead, so a sample does not depend on the others of its batch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps, noise_like

Conditioning = torch.Tensor | list | dict | None
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- conditioning
def conditioning_rows(c: Conditioning) -> int | None:
    """Batch size of a conditioning: a tensor (B, ...), a list of them, or a dict of either (None for None)."""
    if c is None:
        return None
    if isinstance(c, dict):
        return conditioning_rows(next(iter(c.values()))) if c else None
    if isinstance(c, (list, tuple)):
        return conditioning_rows(c[0]) if c else None
    return c.shape[0]


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], c: Conditioning) -> Conditioning:
    if isinstance(c, dict):
        return {k: _map_tensors(fn, v) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return [_map_tensors(fn, v) for v in c]
    return c if c is None else fn(c)


def match_rows(c: Conditioning, n: int, name: str = "conditioning") -> Conditioning:
    """``c`` with exactly n rows: as is, one row repeated, or its first n rows. Fewer rows (but one) is an error."""
    rows = conditioning_rows(c)
    if rows is None or rows == n:
        return c
    if rows == 1:
        return _map_tensors(lambda t: t.expand(n, *t.shape[1:]), c)
    if rows > n:
        return _map_tensors(lambda t: t[:n], c)
    raise ValueError(f"{name} has {rows} rows but {n} samples are made; pass one row per sample or a single row")


def concat_conditioning(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """``torch.cat([uncond, cond])`` through lists and ``{"c_concat": [...], "c_crossattn": [...]}`` dicts."""
    if isinstance(cond, dict):
        return {k: concat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return [concat_conditioning(u, c) for u, c in zip(uncond, cond, strict=True)]
    return torch.cat([uncond, cond])


# ---------------------------------------------------------------------------------------------- guidance
def guided_eps(model: Any, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning = None,
               scale: float = 1.0) -> torch.Tensor:
    """Noise prediction with classifier-free guidance (Ho & Salimans 2022): eps_u + scale (eps_c - eps_u).

    x: (B, C, H, W), t: (B,). The unconditional and conditional passes share one UNet call on a 2B batch,
    unconditional rows first, as the original; scale 1 or no ``uncond`` is a single conditional pass.
    """
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond)
    eps_uncond, eps_cond = model.apply_model(torch.cat([x] * 2), torch.cat([t] * 2),
                                             concat_conditioning(uncond, cond)).chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------------------------- update rules
def predict_x0(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sigma_t eps) / alpha_t, with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)."""
    return (x - sigma * eps) / alpha


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, sqrt_alpha_prev: torch.Tensor, dir_coef: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """DDIM eq. 12 (Song et al. 2021): x_{t-1} = sqrt(a_{t-1}) x_0 + sqrt(1 - a_{t-1} - sigma_t^2) eps + sigma_t z.

    ``dir_coef`` is sqrt(1 - a_{t-1} - sigma_t^2) ("direction pointing to x_t"); ``noise`` is sigma_t z.
    """
    return sqrt_alpha_prev * x0 + dir_coef * eps + noise


def plms_eps(eps: torch.Tensor, old_eps: Sequence[torch.Tensor]) -> torch.Tensor:
    """PNDM's pseudo linear multistep (Liu et al. 2022, eq. 12): Adams-Bashforth on the last 1-3 eps (newest last).

    The first step has no history; :class:`PLMSSolver` then uses the pseudo improved Euler step instead.
    """
    if len(old_eps) == 1:
        return (3 * eps - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


# ---------------------------------------------------------------------------------------------- solvers
@dataclass
class DiscreteSchedule:
    """Per-step coefficients for DDIM / PLMS; step index i runs over ascending timesteps, sampling walks down.

    All tensors (n,) float32 on the model's device: ``alphas[i]`` = alpha_bar at ``timesteps[i]``, ``alphas_prev[i]``
    = alpha_bar at ``timesteps[i - 1]`` (alpha_bar[0] for i = 0), ``sigmas`` the DDIM noise scales (eta).
    """
    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor

    def __post_init__(self):
        self.sqrt_alphas = self.alphas.sqrt()
        self.sqrt_alphas_prev = self.alphas_prev.sqrt()
        self.dir_coefs = (1.0 - self.alphas_prev - self.sigmas ** 2).sqrt()

    def __len__(self) -> int:
        return len(self.timesteps)

    def first(self, n: int) -> DiscreteSchedule:
        """The schedule of the n least noisy steps (what img2img's ``decode`` runs)."""
        return DiscreteSchedule(self.timesteps[:n], self.alphas[:n], self.alphas_prev[:n], self.sigmas[:n],
                                self.sqrt_one_minus_alphas[:n])


Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: Sequence[int], device: torch.device, generators: Generators = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) on ``device``: from the global generator (the original's
    ``noise_like``), or row k from ``generators[k]`` (CPU generators; a single one serves every row in turn)."""
    if generators is None:
        return noise_like(shape, device)
    if isinstance(generators, torch.Generator):
        return torch.randn(tuple(shape), generator=generators).to(device)
    if len(generators) < shape[0]:
        raise ValueError(f"{len(generators)} generators for {shape[0]} samples; give one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators[:shape[0]]]).to(device)


@dataclass
class NoiseOptions:
    """The original's knobs on the DDIM noise sigma_t z: ``temperature`` scales it, ``noise_dropout`` drops it;
    ``generators`` (one per sample) make each sample's noise its own."""
    temperature: float = 1.0
    noise_dropout: float = 0.0
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None
    generators: Generators = None


class DDIMSolver:
    """DDIM (Song et al. 2021): one eps evaluation and one eq. 12 update per timestep, from the top down."""

    def __init__(self, model: Any, schedule: DiscreteSchedule, eps_fn: EpsFn, options: NoiseOptions):
        self.model, self.schedule, self.eps_fn, self.options = model, schedule, eps_fn, options
        self.num_steps = len(schedule)

    def _index(self, i: int) -> int:
        return self.num_steps - 1 - i

    def _timestep(self, i: int, x: torch.Tensor) -> torch.Tensor:
        index = self._index(min(i, self.num_steps - 1))
        return torch.full((x.shape[0],), int(self.schedule.timesteps[index]), device=x.device, dtype=torch.long)

    def q_sample(self, x0: torch.Tensor, i: int) -> torch.Tensor:
        """x0 diffused to the timestep of step i (inpainting masks), as the original: ``model.q_sample``."""
        return self.model.q_sample(x0, self._timestep(i, x0))

    def _update(self, x: torch.Tensor, eps: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, opt = self.schedule, self.options
        x32, eps = x.float(), eps.float()
        x0 = predict_x0(x32, eps, s.sqrt_alphas[index], s.sqrt_one_minus_alphas[index])
        if opt.quantize is not None:
            x0 = opt.quantize(x0)
        noise = s.sigmas[index] * draw_noise(x.shape, x.device, opt.generators) * opt.temperature
        if opt.noise_dropout > 0.0:
            noise = F.dropout(noise, p=opt.noise_dropout)
        x_prev = ddim_update(x0, eps, s.sqrt_alphas_prev[index], s.dir_coefs[index], noise)
        return x_prev.to(x.dtype), x0.to(x.dtype)

    def step(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i (0 = noisiest) of the run: x_t (B, C, H, W) -> (x_{t-1}, predicted x_0)."""
        return self._update(x, self.eps_fn(x, self._timestep(i, x)), self._index(i))


class PLMSSolver(DDIMSolver):
    """PLMS = PNDM's pseudo linear multistep (Liu et al. 2022): a DDIM update with an extrapolated eps.

    The first step is a pseudo improved Euler (Heun) step (two eps evaluations); later steps use Adams-Bashforth
    of order 2, 3, 4 on the eps history (one evaluation each).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.old_eps: list[torch.Tensor] = []

    def step(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._index(i)
        eps = self.eps_fn(x, self._timestep(i, x))
        if not self.old_eps:
            x_next, _ = self._update(x, eps, index)
            eps_prime = (eps + self.eps_fn(x_next, self._timestep(i + 1, x))) / 2
        else:
            eps_prime = plms_eps(eps, self.old_eps)
        self.old_eps = [*self.old_eps[-2:], eps]
        return self._update(x, eps_prime, index)


def run_steps(solver: Any, x: torch.Tensor, *, desc: str, verbose: bool = True,
              callback: Callable[[int], None] | None = None,
              img_callback: Callable[[torch.Tensor, int], None] | None = None, log_every_t: int = 100,
              mask: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Walk ``solver`` from its noisiest step down: -> (x, {"x_inter": [...], "pred_x0": [...]}) as the original.

    With ``mask`` (1 keeps x0), each step first replaces the kept region by x0 diffused to the current noise level.
    """
    n = solver.num_steps
    intermediates = {"x_inter": [x], "pred_x0": [x]}
    for i in tqdm(range(n), desc=desc, total=n, disable=not verbose):
        index = n - i - 1
        if mask is not None:
            x = (solver.q_sample(x0, i) * mask + (1.0 - mask) * x).to(x.dtype)
        x, pred_x0 = solver.step(x, i)
        if callback:
            callback(i)
        if img_callback:
            img_callback(pred_x0, i)
        if index % log_every_t == 0 or index == n - 1:
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x, intermediates


# ---------------------------------------------------------------------------------------------- fronts
def _float_dtype(model: Any) -> torch.dtype:
    """The dtype of the UNet's weights (float32 when there are none to ask)."""
    module = getattr(model, "model", model)
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return t[:n] if t is not None and t.dim() > 0 and t.shape[0] > n else t


class Sampler:
    """The original samplers' public interface over one loop; subclasses supply the schedule and the solver.

    Buffers live in float32 on the model's device (``model.betas.device``); x is kept in the UNet's dtype.
    """
    name = "DDIM"

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any):
        """``schedule`` and ``kwargs`` are the original's and unused (the schedule is the model's)."""
        if getattr(model, "parameterization", "eps") != "eps":
            raise ValueError(f"{type(self).__name__} needs a model that predicts noise (parameterization 'eps'), "
                             f"not '{model.parameterization}'")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps

    @property
    def device(self) -> torch.device:
        return self.model.betas.device

    def _float32(self, t: torch.Tensor) -> torch.Tensor:
        """A schedule tensor as the samplers keep it: float32 on the model's device."""
        return t.detach().to(device=self.device, dtype=torch.float32)

    # -------------------------------------------------------------- subclass hooks
    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        raise NotImplementedError

    def num_schedule_steps(self, use_original_steps: bool = False) -> int:
        """Steps of the current schedule (what ``decode`` can run at most)."""
        raise NotImplementedError

    def make_solver(self, eps_fn: EpsFn, num_steps: int, options: NoiseOptions, use_original_steps: bool = False):
        """A solver for the ``num_steps`` least noisy steps of the current schedule."""
        raise NotImplementedError

    # -------------------------------------------------------------- shared front
    def _require_schedule(self) -> None:
        if not hasattr(self, "ddim_timesteps"):
            raise ValueError(f"{type(self).__name__} has no schedule yet; call make_schedule(ddim_num_steps=...) "
                             "or sample(...) first")

    def _eps_fn(self, cond: Conditioning, uncond: Conditioning, scale: float, score_corrector: Any = None,
                corrector_kwargs: dict | None = None) -> EpsFn:
        def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = guided_eps(self.model, x, t, cond, uncond, scale)
            if score_corrector is not None:
                eps = score_corrector.modify_score(self.model, eps, x, t, cond, **(corrector_kwargs or {}))
            return eps
        return eps_fn

    def _quantizer(self, quantize_x0: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not quantize_x0:
            return None
        first_stage = getattr(self.model, "first_stage_model", None)
        if not hasattr(first_stage, "quantize"):
            raise ValueError("quantize_x0=True needs a VQ first stage with a quantize() method; this model has none")
        return lambda x0: first_stage.quantize(x0)[0]

    @torch.no_grad()
    def sample(self,
               S: int,
               batch_size: int,
               shape: Sequence[int],
               conditioning: Conditioning = None,
               callback: Callable[[int], None] | None = None,
               normals_sequence: Any = None,
               img_callback: Callable[[torch.Tensor, int], None] | None = None,
               quantize_x0: bool = False,
               eta: float = 0.0,
               mask: torch.Tensor | None = None,
               x0: torch.Tensor | None = None,
               temperature: float = 1.0,
               noise_dropout: float = 0.0,
               score_corrector: Any = None,
               corrector_kwargs: dict | None = None,
               verbose: bool = True,
               x_T: torch.Tensor | None = None,
               log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Conditioning = None,
               generator: Generators = None,
               **kwargs: Any) -> tuple[torch.Tensor, dict]:
        """Draw samples (B, C, H, W) with S steps: -> (samples, {"x_inter": [...], "pred_x0": [...]}).

        shape: (C, H, W). x_T: the starting noise (B, C, H, W), else ``torch.randn`` on the model's device.
        Conditioning rows decide the batch when they differ from ``batch_size`` (with a warning, like the
        original): a partial last batch of k < batch_size rows makes k samples from the first k rows of x_T;
        more rows than batch_size use the first batch_size; a single row is shared by every sample.
        ``unconditional_conditioning`` (one row or one per sample) and ``unconditional_guidance_scale`` give
        classifier-free guidance. ``mask`` (1 = keep) with ``x0`` (B, C, H, W) inpaints. ``generator`` (not in
        the original): CPU generators, one per sample, for x_T (when not given) and the noise drawn while sampling.
        """
        if kwargs:
            warnings.warn(f"{type(self).__name__}.sample ignores unknown arguments {sorted(kwargs)}")
        rows = conditioning_rows(conditioning)
        if rows is not None and rows != batch_size:
            n = rows if 1 < rows < batch_size else batch_size
            warnings.warn(f"Got {rows} conditionings but batch-size is {batch_size}: making {n} samples")
        else:
            n = batch_size
        conditioning = match_rows(conditioning, n)
        unconditional_conditioning = match_rows(unconditional_conditioning, n, "unconditional_conditioning")
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0, the latents (B, C, H, W) to keep where mask is 1")

        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        C, H, W = shape
        size = (batch_size, C, H, W)
        if verbose:
            print(f"Data shape for {self.name} sampling is {size}, eta {eta}")
        if x_T is None:
            x_T = torch.randn(size, device=self.device) if generator is None else draw_noise(size, self.device,
                                                                                            generator)
        img = x_T
        if img.shape[0] < n:
            raise ValueError(f"x_T has {img.shape[0]} rows but {n} samples are made")
        img = img[:n].to(device=self.device, dtype=_float_dtype(self.model))

        options = NoiseOptions(temperature, noise_dropout, self._quantizer(quantize_x0), generator)
        eps_fn = self._eps_fn(conditioning, unconditional_conditioning, unconditional_guidance_scale,
                              score_corrector, corrector_kwargs)
        solver = self.make_solver(eps_fn, self.num_schedule_steps(), options)
        if verbose:
            print(f"Running {self.name} Sampling with {solver.num_steps} timesteps")
        return run_steps(solver, img, desc=f"{self.name} Sampler", verbose=verbose, callback=callback,
                         img_callback=img_callback, log_every_t=log_every_t, mask=_rows(mask, n), x0=_rows(x0, n))

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Conditioning, t_start: int,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Conditioning = None,
               use_original_steps: bool = False, verbose: bool = True,
               generator: Generators = None) -> torch.Tensor:
        """img2img: denoise ``x_latent`` (B, C, H, W) from ``stochastic_encode(x0, t_start)`` with the t_start
        least noisy steps of the schedule (``make_schedule`` first). t_start = 0 returns x_latent unchanged.
        ``generator``: as in :meth:`sample`, for the noise drawn while sampling (eta > 0).
        """
        self._require_schedule()
        total = self.num_schedule_steps(use_original_steps)
        t_start = int(t_start)
        if not 0 <= t_start <= total:
            raise ValueError(f"t_start must be between 0 and {total} (the schedule's steps), got {t_start}")
        n = x_latent.shape[0]
        eps_fn = self._eps_fn(match_rows(cond, n), match_rows(unconditional_conditioning, n,
                                                              "unconditional_conditioning"),
                              unconditional_guidance_scale)
        solver = self.make_solver(eps_fn, t_start, NoiseOptions(generators=generator), use_original_steps)
        if verbose:
            print(f"Running {self.name} Sampling with {t_start} timesteps")
        x = x_latent.to(device=self.device, dtype=_float_dtype(self.model))
        x, _ = run_steps(solver, x, desc="Decoding image", verbose=verbose)
        return x


class DiscreteTimeSampler(Sampler):
    """DDIM and PLMS: the DDPM timesteps of ``make_ddim_timesteps`` and the DDIM coefficients on them."""
    solver_class: type[DDIMSolver] = DDIMSolver

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Pick the timesteps (see ``make_ddim_timesteps``) and their DDIM coefficients; sets the original's
        attributes ``ddim_timesteps`` (numpy int64), ``ddim_alphas``, ``ddim_alphas_prev``, ``ddim_sigmas``,
        ``ddim_sqrt_one_minus_alphas`` and ``ddim_sigmas_for_original_num_steps`` (float32 tensors)."""
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        model = self.model
        alphas_cumprod = model.alphas_cumprod.detach().float()
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("the model's alphas_cumprod must have one value per timestep")
        self.alphas_cumprod = self._float32(alphas_cumprod)
        self.alphas_cumprod_prev = self._float32(model.alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod.cpu(), self.ddim_timesteps,
                                                                    eta=ddim_eta, verbose=verbose)
        self.ddim_sigmas, self.ddim_alphas, self.ddim_alphas_prev = (self._float32(t) for t in (sigmas, alphas,
                                                                                                alphas_prev))
        self.ddim_sqrt_one_minus_alphas = (1.0 - self.ddim_alphas).sqrt()
        # eta-scaled DDPM posterior std for decode(use_original_steps=True), Ho et al. eq. 7
        acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.ddim_sigmas_for_original_num_steps = ddim_eta * torch.sqrt(
            (1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev))

    def num_schedule_steps(self, use_original_steps: bool = False) -> int:
        self._require_schedule()
        return self.ddpm_num_timesteps if use_original_steps else len(self.ddim_timesteps)

    def discrete_schedule(self, use_original_steps: bool = False) -> DiscreteSchedule:
        """The current schedule's coefficients; with ``use_original_steps`` every DDPM timestep 0..T-1."""
        self._require_schedule()
        if use_original_steps:
            return DiscreteSchedule(np.arange(self.ddpm_num_timesteps), self.alphas_cumprod,
                                    self.alphas_cumprod_prev, self.ddim_sigmas_for_original_num_steps,
                                    self.sqrt_one_minus_alphas_cumprod)
        return DiscreteSchedule(self.ddim_timesteps, self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas,
                                self.ddim_sqrt_one_minus_alphas)

    def make_solver(self, eps_fn: EpsFn, num_steps: int, options: NoiseOptions,
                    use_original_steps: bool = False) -> DDIMSolver:
        return self.solver_class(self.model, self.discrete_schedule(use_original_steps).first(num_steps), eps_fn,
                                 options)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor | int, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        """img2img's forward diffusion of x0 (B, C, H, W) to schedule step t (B,), as the original:
        sqrt(a) x0 + sqrt(1 - a) noise with a = ``ddim_alphas[t]`` (or ``alphas_cumprod[t]`` with original steps).

        ``decode(x, c, t)`` then starts one step below that level, as in the original. t may equal the number
        of steps (strength 1.0, which crashed the original): that level is the last DDPM timestep, T - 1.
        """
        self._require_schedule()
        if use_original_steps:
            sqrt_alphas, sqrt_one_minus = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_alphas = torch.cat([self.ddim_alphas.sqrt(), self.sqrt_alphas_cumprod[-1:]])
            sqrt_one_minus = torch.cat([self.ddim_sqrt_one_minus_alphas, self.sqrt_one_minus_alphas_cumprod[-1:]])
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(x0.shape[0])
        if t.min() < 0 or t.max() >= len(sqrt_alphas):
            raise ValueError(f"t must be between 0 and {len(sqrt_alphas) - 1}, got {t.tolist()}")
        if noise is None:
            noise = torch.randn_like(x0)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x0, noise = x0.to(self.device), noise.to(self.device)
        return (sqrt_alphas[t].reshape(shape) * x0 + sqrt_one_minus[t].reshape(shape) * noise).to(x0.dtype)
