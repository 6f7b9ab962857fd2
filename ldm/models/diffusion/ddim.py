"""DDIM sampler (Song et al. 2021) with the original's interface; the algorithm lives in ``sampling.py``."""
from __future__ import annotations

from ldm.models.diffusion.sampling import DDIMSolver, DiscreteTimeSampler


class DDIMSampler(DiscreteTimeSampler):
    """``DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)`` -> (samples, intermediates).

    eta = 0 is deterministic DDIM; eta = 1 matches DDPM's ancestral noise. ``stochastic_encode`` / ``decode``
    do img2img. The schedule follows ``model.betas.device``; nothing is moved to a fixed device.
    """
    name = "DDIM"
    solver_class = DDIMSolver


__all__ = ["DDIMSampler"]
