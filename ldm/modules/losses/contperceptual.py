"""Autoencoder losses for ``AutoencoderKL``: reconstruction + KL, optionally with LPIPS and a PatchGAN.

Both losses share the original's form: per-image sums over pixels of a Laplace-style negative log-likelihood
``rec / exp(logvar) + logvar`` (``logvar`` a scalar parameter, 0 by default) plus ``kl_weight`` times the KL
divergence of the posterior from N(0, I), averaged over the batch. They are called as
``loss(inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer=..., split=...)`` and return
``(loss, log_dict)``; ``optimizer_idx`` 1 is the discriminator's turn.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init
from ldm.modules.losses.vqperceptual import adopt_weight, hinge_d_loss, vanilla_d_loss


def _nll_and_kl(rec_loss: torch.Tensor, logvar: torch.Tensor, posteriors: DiagonalGaussianDistribution,
                weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, weighted nll, kl), each summed per image and averaged over the batch."""
    batch = rec_loss.shape[0]
    nll = rec_loss / torch.exp(logvar) + logvar
    weighted = nll if weights is None else weights * nll
    kl = posteriors.kl()
    return nll.sum() / batch, weighted.sum() / batch, kl.sum() / kl.shape[0]


class ReconstructionKLLoss(nn.Module):
    """Offline loss: L1 (+ ``l2_weight`` * squared error) reconstruction NLL + ``kl_weight`` * KL. No extra weights."""

    def __init__(self, kl_weight: float = 1.0, logvar_init: float = 0.0, pixelloss_weight: float = 1.0,
                 l2_weight: float = 0.0):
        super().__init__()
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.l2_weight = l2_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: DiagonalGaussianDistribution,
                optimizer_idx: int = 0, global_step: int = 0, last_layer: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, split: str = "train", weights: torch.Tensor | None = None):
        if optimizer_idx != 0:
            raise ValueError("ReconstructionKLLoss has no discriminator: call it with optimizer_idx=0")
        diff = inputs.contiguous() - reconstructions.contiguous()
        rec_loss = self.pixel_weight * diff.abs() + self.l2_weight * diff ** 2
        nll_loss, weighted_nll_loss, kl_loss = _nll_and_kl(rec_loss, self.logvar, posteriors, weights)
        loss = weighted_nll_loss + self.kl_weight * kl_loss
        log = {f"{split}/total_loss": loss.detach().mean(), f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(), f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean()}
        return loss, log


class LPIPSWithDiscriminator(nn.Module):
    """The original SD autoencoder loss: L1 + LPIPS reconstruction NLL, KL, and a hinge/vanilla PatchGAN
    whose generator term is weighted adaptively (Esser et al. 2021, eq. 7) and starts at ``disc_start``.

    LPIPS needs VGG16 and LPIPS weights on this machine (see :mod:`ldm.modules.losses.lpips`); with
    ``perceptual_weight: 0`` it is not built.
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 lpips_weights_dir: str | None = None):
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', not '{disc_loss}'")
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            from ldm.modules.losses.lpips import LPIPS

            self.perceptual_loss = LPIPS(lpips_weights_dir).eval()
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm)
        self.discriminator.apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor) -> torch.Tensor:
        """||grad nll|| / ||grad g_loss|| at the decoder's last layer, clamped to [0, 1e4], times disc_weight."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _disc_input(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional is set but no cond was given")
            return x.contiguous()
        if not self.disc_conditional:
            raise ValueError("cond was given but disc_conditional is False")
        return torch.cat((x.contiguous(), cond), dim=1)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: DiagonalGaussianDistribution,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, split: str = "train", weights: torch.Tensor | None = None):
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 1:
            logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
            logits_fake = self.discriminator(self._disc_input(reconstructions.detach(), cond))
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
            log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
                   f"{split}/logits_real": logits_real.detach().mean(),
                   f"{split}/logits_fake": logits_fake.detach().mean()}
            return d_loss, log
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), not {optimizer_idx}")

        rec_loss = (inputs.contiguous() - reconstructions.contiguous()).abs() * self.pixel_weight
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss, weighted_nll_loss, kl_loss = _nll_and_kl(rec_loss, self.logvar, posteriors, weights)

        logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
        g_loss = -torch.mean(logits_fake)
        if self.disc_factor > 0.0 and last_layer is not None and torch.is_grad_enabled():
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        else:  # validation (no graph) or no adversarial term
            d_weight = torch.tensor(0.0, device=inputs.device)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.clone().detach().mean(), f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(), f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(), f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor), f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log
