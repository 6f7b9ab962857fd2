"""DPMSolverSampler: DPM-Solver++(2M) behind the original samplers' interface (``sample``, img2img)."""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.dpm_solver.dpm_solver import DPMSolverPPSolver, NoiseScheduleVP
from ldm.models.diffusion.sampling import EpsFn, NoiseOptions, Sampler

_SKIP_TYPES = {"uniform": "time_uniform", "quad": "time_quadratic"}


class DPMSolverSampler(Sampler):
    """``DPMSolverSampler(model).sample(S, batch_size, shape, conditioning, ...)`` -> (samples, intermediates).

    S steps cost S UNet evaluations. Deterministic: eta must be 0. Unlike the original, S = 1 works (one first
    order step), intermediates are returned as for DDIM, masks/x0 and callbacks are honoured, and img2img works
    (``stochastic_encode`` / ``decode``).
    """
    name = "DPM-Solver"

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any):
        super().__init__(model, schedule, **kwargs)
        self.alphas_cumprod = self._float32(model.alphas_cumprod)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Set ``timesteps``: ddim_num_steps + 1 continuous times from 1 down to 1/N ("uniform" in t or "quad"
        in sqrt(t)); ``ddim_timesteps`` holds the UNet's labels for them."""
        if ddim_eta != 0:
            raise ValueError(f"DPM-Solver++ is deterministic: eta must be 0, got {ddim_eta} "
                             "(use DDIMSampler for eta > 0)")
        if ddim_discretize not in _SKIP_TYPES:
            raise ValueError(f"ddim_discretize '{ddim_discretize}' unknown; use 'uniform' or 'quad'")
        num_steps = int(ddim_num_steps)
        if not 1 <= num_steps <= self.ddpm_num_timesteps:
            raise ValueError(f"the number of sampling steps must be between 1 and {self.ddpm_num_timesteps}, "
                             f"got {ddim_num_steps}")
        self.noise_schedule = NoiseScheduleVP(self.alphas_cumprod)
        self.timesteps = self.noise_schedule.time_steps(num_steps, _SKIP_TYPES[ddim_discretize])
        self.ddim_timesteps = self.noise_schedule.model_time(self.timesteps[:-1]).flip(0).cpu().numpy()
        if verbose:
            print(f"Selected times for DPM-Solver++: {self.timesteps.tolist()}")

    def num_schedule_steps(self, use_original_steps: bool = False) -> int:
        self._require_schedule()
        if use_original_steps:
            raise ValueError("DPMSolverSampler has no use_original_steps; use DDIMSampler for that")
        return len(self.timesteps) - 1

    def make_solver(self, eps_fn: EpsFn, num_steps: int, options: NoiseOptions,
                    use_original_steps: bool = False) -> DPMSolverPPSolver:
        total = self.num_schedule_steps(use_original_steps)
        return DPMSolverPPSolver(self.noise_schedule, self.timesteps[total - num_steps:], eps_fn, options)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor | int, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        """img2img's forward diffusion of x0 (B, C, H, W) to the level where ``decode(x, c, t)`` starts: the
        time t steps above the end of the schedule (t (B,) in 0..S; S is t = 1, the end of the forward process).
        """
        total = self.num_schedule_steps(use_original_steps)
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(x0.shape[0])
        if t.min() < 0 or t.max() > total:
            raise ValueError(f"t must be between 0 and {total}, got {t.tolist()}")
        times = self.timesteps[total - t]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if noise is None:
            noise = torch.randn_like(x0)
        alpha = self.noise_schedule.marginal_alpha(times).reshape(shape)
        sigma = self.noise_schedule.marginal_std(times).reshape(shape)
        return (alpha * x0.to(self.device) + sigma * noise.to(self.device)).to(x0.dtype)


__all__ = ["DPMSolverSampler"]
