"""PLMS sampler (PNDM's pseudo linear multistep, Liu et al. 2022) with the original's interface.

The algorithm lives in ``sampling.py``; unlike the original, ``stochastic_encode`` / ``decode`` (img2img) work.
"""
from __future__ import annotations

from ldm.models.diffusion.sampling import DiscreteTimeSampler, PLMSSolver


class PLMSSampler(DiscreteTimeSampler):
    """``PLMSSampler(model).sample(S, batch_size, shape, conditioning, ...)`` -> (samples, intermediates).

    Deterministic: eta must be 0. S steps cost S + 1 UNet evaluations (the first step is a Heun step).
    """
    name = "PLMS"
    solver_class = PLMSSolver

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta} (use DDIMSampler for eta > 0)")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)


__all__ = ["PLMSSampler"]
