"""Training losses of the first stage (the original's ``ldm.modules.losses``)."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator, ReconstructionKLLoss

__all__ = ["LPIPSWithDiscriminator", "ReconstructionKLLoss"]
