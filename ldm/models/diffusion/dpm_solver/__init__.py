"""DPM-Solver++ for Stable Diffusion (``from ldm.models.diffusion.dpm_solver import DPMSolverSampler``)."""
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
