"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant) built from weights already on this machine.

Nothing is downloaded. Two files are needed: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``) and the
LPIPS v0.1 linear heads (``vgg.pth``). They are looked up in the folder given, then in torch hub's checkpoint
folder. Module names match the original (``net.slice1.0.weight``, ``lin0.model.1.weight``, ``scaling_layer``),
so autoencoder checkpoints that carry ``loss.perceptual_loss.*`` load unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VGG_FILE = "vgg16-397923af.pth"
LPIPS_FILE = "vgg.pth"
# LPIPS taps VGG16 ``features`` after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.
SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)


def _search_dirs(weights_dir: str | None) -> list[Path]:
    dirs = [Path(weights_dir).expanduser()] if weights_dir else []
    return dirs + [Path(torch.hub.get_dir()) / "checkpoints"]


def find_weights(name: str, weights_dir: str | None = None) -> Path:
    """The first existing ``name`` in the search folders, or a one-line FileNotFoundError saying what to do."""
    dirs = _search_dirs(weights_dir)
    for folder in dirs:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"LPIPS needs {name} on this machine (nothing is downloaded); looked in {', '.join(map(str, dirs))}: "
        f"copy it there, or set lossconfig.params.perceptual_weight: 0.0, "
        f"or use ldm.modules.losses.ReconstructionKLLoss")


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the input statistics the LPIPS VGG expects."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 convolution weighting the channels of one feature difference (dropout kept for key names)."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class VGG16Slices(nn.Module):
    """VGG16 ``features`` cut into the five LPIPS stages; layers keep their torchvision indices as names."""

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        for i, (start, stop) in enumerate(SLICE_BOUNDS, start=1):
            stage = nn.Sequential()
            for index in range(start, stop):
                stage.add_module(str(index), features[index])
            setattr(self, f"slice{i}", stage)

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load torchvision's ``vgg16`` state dict (``features.<i>.*`` keys; the classifier is not used)."""
        own = {}
        for i, (start, stop) in enumerate(SLICE_BOUNDS, start=1):
            for index in range(start, stop):
                for param in ("weight", "bias"):
                    key = f"features.{index}.{param}"
                    if key in state_dict:
                        own[f"slice{i}.{index}.{param}"] = state_dict[key]
        self.load_state_dict(own, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i in range(1, len(SLICE_BOUNDS) + 1):
            x = getattr(self, f"slice{i}")(x)
            feats.append(x)
        return feats


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise feature vectors along the channel axis."""
    return x / (torch.sqrt((x ** 2).sum(dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance between images (B, 3, H, W) in [-1, 1] -> (B, 1, 1, 1). Frozen."""

    def __init__(self, weights_dir: str | None = None, use_dropout: bool = True):
        super().__init__()
        vgg_file, lin_file = find_weights(VGG_FILE, weights_dir), find_weights(LPIPS_FILE, weights_dir)
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        self.net.load_torchvision(torch.load(vgg_file, map_location="cpu", weights_only=True))
        for i, chn in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(chn, use_dropout=use_dropout))
        heads = {k: v for k, v in torch.load(lin_file, map_location="cpu", weights_only=True).items()
                 if k.startswith("lin")}
        missing, unexpected = self.load_state_dict(heads, strict=False)
        missing = [k for k in missing if k.startswith("lin")]
        if missing or unexpected:
            raise ValueError(f"{lin_file} is not an LPIPS v0.1 VGG head file (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); use the vgg.pth of the lpips/taming packages")
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        feats0 = self.net(self.scaling_layer(input))
        feats1 = self.net(self.scaling_layer(target))
        total = 0.0
        for i, (f0, f1) in enumerate(zip(feats0, feats1)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            total = total + getattr(self, f"lin{i}")(diff).mean(dim=(2, 3), keepdim=True)
        return total
