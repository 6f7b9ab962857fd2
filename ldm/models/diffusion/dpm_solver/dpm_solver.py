"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models") as the original Stable Diffusion repository ships it: multistep, order 2, data prediction,
time-uniform steps, first order at the last step when there are fewer than 15 steps.

The discrete schedule is seen in continuous time as the original's ``NoiseScheduleVP('discrete')``: DDPM step
n = 0..N-1 sits at t_n = (n + 1) / N and log alpha_t (alpha_t = sqrt(alpha_bar)) is piecewise linear in t;
sigma_t = sqrt(1 - alpha_t^2), lambda_t = log(alpha_t / sigma_t) (half log-SNR). The solver integrates from
t = 1 to t = 1 / N; the UNet sees the label (t - 1 / N) N in [0, N - 1].
"""
from __future__ import annotations

import torch

from ldm.models.diffusion.sampling import EpsFn, NoiseOptions, predict_x0


class NoiseScheduleVP:
    """Continuous-time VP schedule from a discrete ``alphas_cumprod`` (N,), piecewise linear in log alpha."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.total_N = alphas_cumprod.shape[0]
        self.T = 1.0
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:].to(alphas_cumprod.device)
        self.log_alpha_array = 0.5 * torch.log(alphas_cumprod.float())

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t, linear between the keypoints (and along the end segments outside them)."""
        right = torch.searchsorted(self.t_array, t.reshape(-1).contiguous()).clamp(1, self.total_N - 1)
        t0, t1 = self.t_array[right - 1], self.t_array[right]
        y0, y1 = self.log_alpha_array[right - 1], self.log_alpha_array[right]
        return (y0 + (t.reshape(-1) - t0) * (y1 - y0) / (t1 - t0)).reshape(t.shape)

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The UNet's (fractional) timestep label for continuous time t: (t - 1/N) N."""
        return (t - 1.0 / self.total_N) * self.total_N

    def time_steps(self, num_steps: int, skip_type: str = "time_uniform") -> torch.Tensor:
        """num_steps + 1 times from T = 1 down to 1/N, uniform in t (or in sqrt(t) for "time_quadratic")."""
        t_T, t_0 = self.T, 1.0 / self.total_N
        if skip_type == "time_uniform":
            steps = torch.linspace(t_T, t_0, num_steps + 1)
        elif skip_type == "time_quadratic":
            steps = torch.linspace(t_T ** 0.5, t_0 ** 0.5, num_steps + 1).pow(2)
        else:
            raise ValueError(f"skip_type '{skip_type}' unknown; use 'time_uniform' or 'time_quadratic'")
        return steps.to(self.t_array.device)


def dpm_solver_pp_update(x: torch.Tensor, x0: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor,
                         alpha_t: torch.Tensor, h: torch.Tensor, x0_prev: torch.Tensor | None = None,
                         h_prev: torch.Tensor | None = None) -> torch.Tensor:
    """One DPM-Solver++ step from s to t (Alg. 2, "2M"; first order without history, which is DDIM).

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D with h = lambda_t - lambda_s and
    D = x0 (first order) or x0 + (x0 - x0_prev) / (2 r), r = h_prev / h (second order, multistep).
    """
    if x0_prev is None:
        d = x0
    else:
        d = x0 + (0.5 * h / h_prev) * (x0 - x0_prev)
    return (sigma_t / sigma_s) * x - (alpha_t * torch.expm1(-h)) * d


class DPMSolverPPSolver:
    """Multistep DPM-Solver++(2M) over ``num_steps`` intervals of ``times`` (descending, num_steps + 1 entries).

    One model evaluation per step; step i uses the data prediction at times[i] and the one of the step before.
    """

    def __init__(self, ns: NoiseScheduleVP, times: torch.Tensor, eps_fn: EpsFn, options: NoiseOptions,
                 lower_order_final: bool = True):
        self.ns, self.times, self.eps_fn, self.options = ns, times, eps_fn, options
        self.num_steps = len(times) - 1
        self.lower_order_final = lower_order_final
        self.alphas = ns.marginal_alpha(times)
        self.sigmas = ns.marginal_std(times)
        self.lambdas = ns.marginal_lambda(times)
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0, h) of the previous step

    def q_sample(self, x0: torch.Tensor, i: int) -> torch.Tensor:
        """x0 diffused to times[i]: alpha x0 + sigma noise (inpainting masks)."""
        return self.alphas[i] * x0 + self.sigmas[i] * torch.randn_like(x0)

    def step(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i: x at times[i] (B, C, H, W) -> (x at times[i + 1], predicted x_0)."""
        s = self.times[i].expand(x.shape[0])
        eps = self.eps_fn(x, self.ns.model_time(s)).float()
        x32 = x.float()
        x0 = predict_x0(x32, eps, self.alphas[i], self.sigmas[i])
        if self.options.quantize is not None:
            x0 = self.options.quantize(x0)
        h = self.lambdas[i + 1] - self.lambdas[i]
        last = i == self.num_steps - 1
        first_order = self.prev is None or (last and self.lower_order_final and self.num_steps < 15)
        x0_prev, h_prev = (None, None) if first_order else self.prev
        x_next = dpm_solver_pp_update(x32, x0, self.sigmas[i], self.sigmas[i + 1], self.alphas[i + 1], h,
                                      x0_prev, h_prev)
        self.prev = (x0, h)
        return x_next.to(x.dtype), x0.to(x.dtype)
