"""Denoising diffusion models as LightningModules: pixel-space ``DDPM`` and ``LatentDiffusion`` (Stable Diffusion).

``DDPM`` owns the noise schedule (buffers with the original names), the forward process ``q_sample`` and the
training loss ``p_losses``. ``LatentDiffusion`` adds the first stage (autoencoder, images <-> latents) and the
conditioning stage (e.g. CLIP text), and routes conditioning to the UNet through ``DiffusionWrapper``.
Notation follows Ho et al. (2020): alpha_bar_t = ``alphas_cumprod[t]``, x_t = sqrt(alpha_bar_t) x_0 +
sqrt(1 - alpha_bar_t) eps.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.models.autoencoder import IdentityFirstStage
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, noise_like
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import count_params, default, exists, instantiate_from_config, isimage, ismap, log_txt_as_img

__conditioning_keys__ = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}


def disabled_train(self, mode: bool = True):
    """Overwrite ``model.train`` so that frozen stages stay in eval mode."""
    return self


def uniform_on_device(r1: float, r2: float, shape: Sequence[int], device) -> torch.Tensor:
    return (r1 - r2) * torch.rand(*shape, device=device) + r2


class DDPM(pl.LightningModule):
    """Gaussian diffusion in image space with a UNet noise (or x0) predictor."""

    def __init__(self,
                 unet_config: dict,
                 timesteps: int = 1000,
                 beta_schedule: str = "linear",
                 loss_type: str = "l2",
                 ckpt_path: str | None = None,
                 ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False,
                 monitor: str = "val/loss",
                 use_ema: bool = True,
                 first_stage_key: str = "image",
                 image_size: int = 256,
                 channels: int = 3,
                 log_every_t: int = 100,
                 clip_denoised: bool = True,
                 linear_start: float = 1e-4,
                 linear_end: float = 2e-2,
                 cosine_s: float = 8e-3,
                 given_betas: Sequence[float] | None = None,
                 original_elbo_weight: float = 0.0,
                 v_posterior: float = 0.0,
                 l_simple_weight: float = 1.0,
                 conditioning_key: str | None = None,
                 parameterization: str = "eps",
                 scheduler_config: dict | None = None,
                 use_positional_encodings: bool = False,
                 learn_logvar: bool = False,
                 logvar_init: float = 0.0,
                 ucg_training: dict | None = None,
                 ):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0', not '{parameterization}'")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.loss_type = loss_type
        # classifier-free guidance training: {batch key: {"p": drop probability, "val": replacement}}
        self.ucg_training = {k: dict(v) for k, v in (ucg_training or {}).items()}
        self.learn_logvar = learn_logvar
        self.logvar = torch.full(fill_value=logvar_init, size=(self.num_timesteps,))
        if self.learn_logvar:
            self.logvar = nn.Parameter(self.logvar, requires_grad=True)

    # ------------------------------------------------------------------ schedule
    def register_schedule(self, given_betas=None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        """Compute the schedule in float64 and register it as float32 buffers with the original names."""
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                       linear_end=linear_end, cosine_s=cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])

        (timesteps,) = betas.shape
        self.num_timesteps = int(timesteps)
        self.linear_start = linear_start
        self.linear_end = linear_end
        assert alphas_cumprod.shape[0] == self.num_timesteps, "alphas have to be defined for each timestep"

        to_torch = partial(torch.tensor, dtype=torch.float32)
        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        # q(x_t | x_0)
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(np.log(1.0 - alphas_cumprod)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod - 1)))
        # q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        # log of the variance clipped: the posterior variance is 0 at the start of the chain
        self.register_buffer("posterior_log_variance_clipped", to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        self.register_buffer("posterior_mean_coef1",
                             to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2",
                             to_torch((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)))

        if self.parameterization == "eps":
            lvlb_weights = self.betas ** 2 / (
                2 * self.posterior_variance * to_torch(alphas) * (1 - self.alphas_cumprod))
        else:
            lvlb_weights = 0.5 * np.sqrt(torch.Tensor(alphas_cumprod)) / (2.0 * 1 - torch.Tensor(alphas_cumprod))
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)
        assert not torch.isnan(self.lvlb_weights).any()

    @contextmanager
    def ema_scope(self, context: str | None = None):
        """Within the block the UNet holds its EMA weights (when ``use_ema``); they are swapped back after."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                print(f"{context}: Switched to EMA weights")
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    print(f"{context}: Restored training weights")

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load weights from a checkpoint file (strict; keys starting with ``ignore_keys`` are dropped)."""
        from ldm.loading.checkpoint import load_weights_into

        target = self.model if only_model else self
        load_weights_into(target, path, ignore_prefixes=tuple(ignore_keys))
        print(f"Restored from {path}")

    # ------------------------------------------------------------------ diffusion math
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7)."""
        posterior_mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        posterior_variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool):
        model_out = self.model(x, t)
        x_recon = model_out
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        if clip_denoised:
            x_recon.clamp_(-1.0, 1.0)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True, repeat_noise: bool = False):
        """One ancestral step x_t -> x_{t-1}."""
        b = x.shape[0]
        model_mean, _, model_log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        noise = noise_like(x.shape, x.device, repeat_noise)
        nonzero_mask = (1 - (t == 0).float()).reshape(b, *((1,) * (len(x.shape) - 1)))  # no noise when t == 0
        return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise

    @torch.no_grad()
    def p_sample_loop(self, shape: Sequence[int], return_intermediates: bool = False):
        device = self.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device)
        intermediates = [img]
        for i in reversed(range(0, self.num_timesteps)):
            img = self.p_sample(img, torch.full((b,), i, device=device, dtype=torch.long),
                                clip_denoised=self.clip_denoised)
            if i % self.log_every_t == 0 or i == self.num_timesteps - 1:
                intermediates.append(img)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False):
        return self.p_sample_loop((batch_size, self.channels, self.image_size, self.image_size),
                                  return_intermediates=return_intermediates)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diffuse x_0 to x_t: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise.  x_start: (B, C, H, W), t: (B,)."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        if self.loss_type == "l2":
            return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")
        raise NotImplementedError(f"unknown loss type '{self.loss_type}'")

    def _loss_target(self, x_start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise if self.parameterization == "eps" else x_start

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_out = self.model(x_noisy, t)
        loss = self.get_loss(model_out, self._loss_target(x_start, noise), mean=False).mean(dim=[1, 2, 3])
        log_prefix = "train" if self.training else "val"
        loss_dict = {f"{log_prefix}/loss_simple": loss.mean()}
        loss_simple = loss.mean() * self.l_simple_weight
        loss_vlb = (self.lvlb_weights[t] * loss).mean()
        loss = loss_simple + self.original_elbo_weight * loss_vlb
        loss_dict.update({f"{log_prefix}/loss_vlb": loss_vlb, f"{log_prefix}/loss": loss})
        return loss, loss_dict

    def forward(self, x: torch.Tensor, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, t, *args, **kwargs)

    # ------------------------------------------------------------------ training (Lightning)
    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """Batch images (B, H, W, C) -> (B, C, H, W) float."""
        x = batch[k]
        if len(x.shape) == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: dict):
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def drop_conditioning(self, batch: dict) -> dict:
        """A copy of ``batch`` where each entry of ``batch[key]`` is replaced by ``ucg_training[key]["val"]``
        (default ``""``) with probability ``ucg_training[key]["p"]``: the unconditional examples that
        classifier-free guidance needs (Ho & Salimans 2022; SD v1 dropped 10 % of captions)."""
        if not self.ucg_training:
            return batch
        batch = dict(batch)
        for key, spec in self.ucg_training.items():
            if key not in batch:
                raise KeyError(f"ucg_training names batch key '{key}', but the batch has {sorted(batch)}")
            value = "" if spec.get("val") is None else spec["val"]
            entries = batch[key]
            drop = torch.rand(len(entries)) < float(spec["p"])
            if isinstance(entries, torch.Tensor):
                mask = drop.to(entries.device).reshape(-1, *([1] * (entries.dim() - 1)))
                batch[key] = torch.where(mask, torch.as_tensor(value, dtype=entries.dtype, device=entries.device),
                                         entries)
            else:
                batch[key] = [value if d else entry for entry, d in zip(entries, drop.tolist())]
        return batch

    def training_step(self, batch: dict, batch_idx: int):
        loss, loss_dict = self.shared_step(self.drop_conditioning(batch))
        batch_size = len(batch[self.first_stage_key])
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True,
                 on_epoch=False, batch_size=batch_size)
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, logger=True, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        batch_size = len(batch[self.first_stage_key])
        _, loss_dict_no_ema = self.shared_step(batch)
        self.log_dict(loss_dict_no_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True,
                      batch_size=batch_size, sync_dist=True)
        if self.use_ema:
            with self.ema_scope():
                _, loss_dict_ema = self.shared_step(batch)
            loss_dict_ema = {key + "_ema": loss_dict_ema[key] for key in loss_dict_ema}
            self.log_dict(loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True,
                          batch_size=batch_size, sync_dist=True)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def _get_rows_from_list(self, samples: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C, H, W)] * n -> one grid image (C, B*H, n*W) with a row per batch element."""
        from torchvision.utils import make_grid

        n_imgs_per_row = len(samples)
        denoise_grid = torch.stack(samples).permute(1, 0, 2, 3, 4).flatten(0, 1)
        return make_grid(denoise_grid, nrow=n_imgs_per_row)

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 2, sample: bool = True,
                   return_keys: Sequence[str] | None = None, **kwargs) -> dict:
        log = {}
        x = self.get_input(batch, self.first_stage_key)
        N = min(x.shape[0], N)
        x = x.to(self.device)[:N]
        log["inputs"] = x
        if sample:
            with self.ema_scope("Plotting"):
                samples = self.sample(batch_size=N)
            log["samples"] = samples
        if return_keys:
            return {key: log[key] for key in return_keys if key in log}
        return log

    def configure_optimizers(self):
        params = list(self.model.parameters())
        if self.learn_logvar:
            params = params + [self.logvar]
        return torch.optim.AdamW(params, lr=self.learning_rate)


class LatentDiffusion(DDPM):
    """Diffusion on the latents of a frozen first stage, conditioned by a (frozen or trainable) cond stage.

    Images x (B, 3, H, W) in [-1, 1] are encoded to z = scale_factor * E(x); the UNet denoises z under the
    conditioning c; ``decode_first_stage`` maps latents back to images.
    """

    def __init__(self,
                 first_stage_config: dict,
                 cond_stage_config: dict | str,
                 num_timesteps_cond: int | None = None,
                 cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False,
                 concat_mode: bool = True,
                 cond_stage_forward: str | None = None,
                 conditioning_key: str | None = None,
                 scale_factor: float = 1.0,
                 scale_by_std: bool = False,
                 *args, **kwargs):
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        assert self.num_timesteps_cond <= kwargs.get("timesteps", 1000)
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config.params.ddconfig.ch_mult) - 1
        except (AttributeError, KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.bbox_tokenizer = None
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    def make_cond_schedule(self) -> None:
        self.cond_ids = torch.full(size=(self.num_timesteps,), fill_value=self.num_timesteps - 1, dtype=torch.long)
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
        self.cond_ids[:self.num_timesteps_cond] = ids

    def register_schedule(self, given_betas=None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        super().register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    @torch.no_grad()
    def on_train_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """With ``scale_by_std``, set scale_factor = 1 / std(z) from the first training batch (LDM sec. 4.3.2);
        under data parallelism the std is averaged over the ranks so that all replicas agree."""
        if (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            assert self.scale_factor == 1.0, "rather not use custom rescaling and std-rescaling simultaneously"
            x = super().get_input(batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach().float()
            std = z.flatten().std()
            if self._trainer is not None:
                std = self.trainer.strategy.reduce(std, reduce_op="mean")
            self.scale_factor.copy_(1.0 / std)  # in place: the buffer stays the one DDP broadcasts
            print(f"setting self.scale_factor to {self.scale_factor}")

    # ------------------------------------------------------------------ stages
    def instantiate_first_stage(self, config: dict) -> None:
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = disabled_train
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

    def instantiate_cond_stage(self, config: dict | str) -> None:
        if not self.cond_stage_trainable:
            if config == "__is_first_stage__":
                print("Using first stage also as cond stage.")
                self.cond_stage_model = self.first_stage_model
            elif config == "__is_unconditional__":
                print(f"Training {self.__class__.__name__} as an unconditional model.")
                self.cond_stage_model = None
            else:
                model = instantiate_from_config(config)
                self.cond_stage_model = model.eval()
                self.cond_stage_model.train = disabled_train
                for param in self.cond_stage_model.parameters():
                    param.requires_grad = False
        else:
            assert config != "__is_first_stage__"
            assert config != "__is_unconditional__"
            self.cond_stage_model = instantiate_from_config(config)

    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Encode raw conditioning (e.g. a list of prompts) with the cond stage: -> (B, M, context_dim) for CLIP."""
        if self.cond_stage_forward is None:
            if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
                c = self.cond_stage_model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)
        else:
            assert hasattr(self.cond_stage_model, self.cond_stage_forward)
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        return c

    def get_first_stage_encoding(self, encoder_posterior) -> torch.Tensor:
        """Posterior sample (or tensor) times ``scale_factor``: the latent the UNet works on."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1]."""
        return self.differentiable_decode_first_stage(z)

    def differentiable_decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                                          force_not_quantize: bool = False) -> torch.Tensor:
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Images (B, 3, H, W) in [-1, 1] -> the first stage's posterior (a DiagonalGaussianDistribution)."""
        return self.first_stage_model.encode(x)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: str | None = None, return_original_cond: bool = False, bs: int | None = None):
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()

        if self.model.conditioning_key is not None:
            cond_key = default(cond_key, self.cond_stage_key)
            if cond_key != self.first_stage_key:
                if cond_key in ["caption", "coordinates_bbox", "txt"]:
                    xc = batch[cond_key]
                elif cond_key == "class_label":
                    xc = batch
                else:
                    xc = super().get_input(batch, cond_key).to(self.device)
            else:
                xc = x
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            else:
                c = xc
            if bs is not None:
                c = c[:bs]
        else:
            c = None
            xc = None
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: dict, **kwargs):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x: torch.Tensor, c: Any, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            assert c is not None
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[t].to(self.device)
                c = self.q_sample(x_start=c, t=tc, noise=torch.randn_like(c.float()))
        return self.p_losses(x, c, t, *args, **kwargs)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False):
        """UNet prediction for x_noisy (B, C, h, w) at t (B,) under ``cond`` (tensor, list of tensors or
        a dict ``{"c_concat": [...], "c_crossattn": [...]}``)."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Training loss at timesteps t: ||target - model(x_t, t, c)||^2 with target eps or x_0 (Ho et al. eq. 14)."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)

        prefix = "train" if self.training else "val"
        target = self._loss_target(x_start, noise)
        loss_simple = self.get_loss(model_output, target, mean=False).mean([1, 2, 3])
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}

        logvar_t = self.logvar.to(t.device)[t]
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()

        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def p_mean_variance(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool):
        model_out = self.apply_model(x, t, c)
        x_recon = model_out
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        if clip_denoised:
            x_recon.clamp_(-1.0, 1.0)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool = False,
                 repeat_noise: bool = False, temperature: float = 1.0):
        b = x.shape[0]
        model_mean, _, model_log_variance = self.p_mean_variance(x=x, c=c, t=t, clip_denoised=clip_denoised)
        noise = noise_like(x.shape, x.device, repeat_noise) * temperature
        nonzero_mask = (1 - (t == 0).float()).reshape(b, *((1,) * (len(x.shape) - 1)))
        return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise

    @torch.no_grad()
    def p_sample_loop(self, cond: Any, shape: Sequence[int], return_intermediates: bool = False,
                      x_T: torch.Tensor | None = None, timesteps: int | None = None, log_every_t: int | None = None):
        """Ancestral sampling over all ``timesteps`` (1000 UNet calls; use DDIMSampler for fast sampling)."""
        log_every_t = default(log_every_t, self.log_every_t)
        device = self.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device) if x_T is None else x_T
        intermediates = [img]
        timesteps = default(timesteps, self.num_timesteps)
        for i in reversed(range(0, timesteps)):
            ts = torch.full((b,), i, device=device, dtype=torch.long)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[ts].to(cond.device)
                cond = self.q_sample(x_start=cond, t=tc, noise=torch.randn_like(cond))
            img = self.p_sample(img, cond, ts, clip_denoised=self.clip_denoised)
            if i % log_every_t == 0 or i == timesteps - 1:
                intermediates.append(img)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, cond: Any, batch_size: int = 16, return_intermediates: bool = False,
               x_T: torch.Tensor | None = None, shape: Sequence[int] | None = None, **kwargs):
        shape = default(shape, (batch_size, self.channels, self.image_size, self.image_size))
        if isinstance(cond, dict):
            cond = {key: cond[key][:batch_size] if not isinstance(cond[key], list)
                    else [c[:batch_size] for c in cond[key]] for key in cond}
        elif cond is not None:
            cond = [c[:batch_size] for c in cond] if isinstance(cond, list) else cond[:batch_size]
        return self.p_sample_loop(cond, shape, return_intermediates=return_intermediates, x_T=x_T)

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int, **kwargs):
        if ddim:
            from ldm.models.diffusion.ddim import DDIMSampler

            shape = (self.channels, self.image_size, self.image_size)
            return DDIMSampler(self).sample(ddim_steps, batch_size, shape, cond, verbose=False, **kwargs)
        return self.sample(cond=cond, batch_size=batch_size, return_intermediates=True, **kwargs)

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 4, sample: bool = True, ddim_steps: int = 50,
                   ddim_eta: float = 1.0, return_keys: Sequence[str] | None = None, plot_denoise_rows: bool = False,
                   unconditional_guidance_scale: float = 1.0, **kwargs) -> dict:
        """Images for the training logger: inputs, reconstructions, conditioning and samples (EMA weights)."""
        use_ddim = ddim_steps is not None
        log = {}
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        N = min(x.shape[0], N)
        log["inputs"] = x
        log["reconstruction"] = xrec
        if self.model.conditioning_key is not None:
            if self.cond_stage_key in ["caption", "txt"]:
                log["conditioning"] = log_txt_as_img((x.shape[2], x.shape[3]), batch[self.cond_stage_key][:N],
                                                     size=x.shape[2] // 25)
            elif isimage(xc) or ismap(xc):
                log["conditioning"] = xc
        if sample:
            with self.ema_scope("Plotting"):
                samples, _ = self.sample_log(cond=c, batch_size=N, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta)
            log["samples"] = self.decode_first_stage(samples)
            if unconditional_guidance_scale > 1.0 and self.model.conditioning_key == "crossattn":
                uc = self.get_learned_conditioning(len(c) * [""])
                with self.ema_scope("Plotting"):
                    samples_cfg, _ = self.sample_log(
                        cond=c, batch_size=N, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta,
                        unconditional_guidance_scale=unconditional_guidance_scale, unconditional_conditioning=uc)
                log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(samples_cfg)
        if return_keys:
            return {key: log[key] for key in return_keys if key in log}
        return log

    def configure_optimizers(self):
        """AdamW over the UNet (and a trainable cond stage / logvar); optional LambdaLR from ``scheduler_config``."""
        lr = self.learning_rate
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            print(f"{self.__class__.__name__}: Also optimizing conditioner params!")
            params = params + list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        opt = torch.optim.AdamW(params, lr=lr)
        if self.use_scheduler:
            scheduler = instantiate_from_config(self.scheduler_config)
            lr_scheduler = {"scheduler": LambdaLR(opt, lr_lambda=scheduler.schedule), "interval": "step",
                            "frequency": 1}
            return [opt], [lr_scheduler]
        return opt


class DiffusionWrapper(pl.LightningModule):
    """Holds the UNet as ``diffusion_model`` and feeds it the conditioning the way ``conditioning_key`` says."""

    def __init__(self, diff_model_config: dict, conditioning_key: str | None):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm"):
            raise ValueError(f"conditioning_key '{conditioning_key}' unknown; "
                             "use concat, crossattn, hybrid, adm or null")
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None,
                c_crossattn: list | None = None) -> torch.Tensor:
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if self.conditioning_key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if self.conditioning_key == "hybrid":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))
        return self.diffusion_model(x, t, y=c_crossattn[0])  # adm


class Layout2ImgDiffusion(LatentDiffusion):
    """Not supported: the original's layout-to-image model needs the bbox tokenizer and its data."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Layout2ImgDiffusion is not supported by this implementation")


__all__ = ["DDPM", "LatentDiffusion", "DiffusionWrapper", "IdentityFirstStage", "disabled_train",
           "uniform_on_device", "count_params"]
