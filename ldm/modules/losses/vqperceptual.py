"""GAN loss helpers shared by the autoencoder losses (names as in the original ``vqperceptual`` module)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before step ``threshold``, ``weight`` from then on (delays the adversarial loss)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: mean(relu(1 - D(x))) / 2 + mean(relu(1 + D(x_rec))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss: mean(softplus(-D(x))) / 2 + mean(softplus(D(x_rec))) / 2."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
