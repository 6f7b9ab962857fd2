"""The KL-regularised autoencoder (first stage of latent diffusion): images <-> Gaussian latent posteriors."""
from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(pl.LightningModule):
    """Encoder -> ``quant_conv`` -> posterior N(mean, var) on (B, embed_dim, H/f, W/f); ``post_quant_conv`` -> Decoder.

    Images are (B, 3, H, W) in [-1, 1]. ``lossconfig`` names the training loss module (``torch.nn.Identity``
    at inference, so its weights are not part of the model).
    """

    def __init__(self, ddconfig: dict, lossconfig: dict, embed_dim: int, ckpt_path: str | None = None,
                 ignore_keys: Sequence[str] = (), image_key: str = "image", colorize_nlabels: int | None = None,
                 monitor: str | None = None):
        super().__init__()
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        # Lightning 2 has no optimizer_idx: a loss with a discriminator is trained with manual optimization
        self.automatic_optimization = not self.has_discriminator
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load an autoencoder checkpoint; keys starting with ``ignore_keys`` and training-loss keys are skipped."""
        from ldm.loading.checkpoint import load_weights_into

        load_weights_into(self, path, ignore_prefixes=tuple(ignore_keys), optional_prefixes=("loss.",))
        print(f"Restored from {path}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """Batch images (B, H, W, C) -> (B, C, H, W) float."""
        x = batch[k]
        if len(x.shape) == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ training (Lightning)
    @property
    def has_discriminator(self) -> bool:
        return isinstance(getattr(self.loss, "discriminator", None), nn.Module)

    def _loss_step(self) -> int:
        """The step the loss sees (``disc_start``): batches seen. With a discriminator, Lightning 2 counts both
        optimizers' steps in ``global_step``, i.e. two per batch."""
        return self.global_step // 2 if self.has_discriminator else self.global_step

    def training_step(self, batch: dict, batch_idx: int):
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        step = self._loss_step()
        aeloss, log_dict_ae = self.loss(inputs, reconstructions, posterior, 0, step,
                                        last_layer=self.get_last_layer(), split="train")
        self.log("aeloss", aeloss, prog_bar=True, logger=True, on_step=True, on_epoch=True,
                 batch_size=inputs.shape[0])
        self.log_dict(log_dict_ae, prog_bar=False, logger=True, on_step=True, on_epoch=False,
                      batch_size=inputs.shape[0])
        if self.automatic_optimization:
            return aeloss

        opt_ae, opt_disc = self.optimizers()
        self.toggle_optimizer(opt_ae)
        opt_ae.zero_grad()
        self.manual_backward(aeloss)
        opt_ae.step()
        self.untoggle_optimizer(opt_ae)

        self.toggle_optimizer(opt_disc)
        discloss, log_dict_disc = self.loss(inputs, reconstructions.detach(), posterior, 1, step,
                                            last_layer=self.get_last_layer(), split="train")
        opt_disc.zero_grad()
        self.manual_backward(discloss)
        opt_disc.step()
        self.untoggle_optimizer(opt_disc)
        self.log("discloss", discloss, prog_bar=True, logger=True, on_step=True, on_epoch=True,
                 batch_size=inputs.shape[0])
        self.log_dict(log_dict_disc, prog_bar=False, logger=True, on_step=True, on_epoch=False,
                      batch_size=inputs.shape[0])
        return None

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        step = self._loss_step()
        aeloss, log_dict_ae = self.loss(inputs, reconstructions, posterior, 0, step,
                                        last_layer=self.get_last_layer(), split="val")
        log = dict(log_dict_ae)
        if self.has_discriminator:
            _, log_dict_disc = self.loss(inputs, reconstructions, posterior, 1, step,
                                         last_layer=self.get_last_layer(), split="val")
            log.update(log_dict_disc)
        self.log_dict(log, batch_size=inputs.shape[0], sync_dist=True)
        return log

    def configure_optimizers(self):
        """Adam (betas 0.5, 0.9) over encoder, decoder and the two 1x1 convs; a second one for the discriminator."""
        lr = self.learning_rate
        params = (list(self.encoder.parameters()) + list(self.decoder.parameters())
                  + list(self.quant_conv.parameters()) + list(self.post_quant_conv.parameters()))
        opt_ae = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
        if not self.has_discriminator:
            return opt_ae
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        return [opt_ae, opt_disc]

    @torch.no_grad()
    def log_images(self, batch: dict, only_inputs: bool = False, **kwargs) -> dict:
        log = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            xrec, posterior = self(x)
            if x.shape[1] > 3:  # colorize with random projection
                assert xrec.shape[1] > 3
                x, xrec = self.to_rgb(x), self.to_rgb(xrec)
            log["samples"] = self.decode(torch.randn_like(posterior.sample()))
            log["reconstructions"] = xrec
        log["inputs"] = x
        return log

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        assert self.image_key == "segmentation"
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing (pixel-space diffusion through the latent-diffusion code)."""

    def __init__(self, *args, vq_interface: bool = False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def forward(self, x, *args, **kwargs):
        return x
