"""Exponential moving average of a model's parameters, stored as buffers (checkpoint keys ``model_ema.*``)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """Shadow copies of ``model``'s trainable parameters.

    Buffer names are the parameter names with the dots removed (``diffusion_modelinput_blocks00weight``),
    plus ``decay`` and ``num_updates``, exactly as in the original and in the "full" SD checkpoints.
    With ``use_num_upates`` the decay warms up as min(decay, (1 + n) / (10 + n)).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params: list[torch.Tensor] = []

    def forward(self, model: nn.Module) -> None:
        """One EMA update: shadow -= (1 - decay) * (shadow - param)."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        one_minus_decay = 1.0 - decay
        with torch.no_grad():
            shadow = dict(self.named_buffers())
            for name, param in model.named_parameters():
                if param.requires_grad:
                    s_name = self.m_name2s_name[name]
                    if shadow[s_name].dtype != param.dtype:
                        shadow[s_name] = shadow[s_name].type_as(param)
                        setattr(self, s_name, shadow[s_name])
                    shadow[s_name].sub_(one_minus_decay * (shadow[s_name] - param))
                else:
                    assert name not in self.m_name2s_name

    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into ``model``'s parameters."""
        shadow = dict(self.named_buffers())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(shadow[self.m_name2s_name[name]])
                else:
                    assert name not in self.m_name2s_name

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save copies of ``parameters`` for a later :meth:`restore`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by :meth:`store` (e.g. after evaluating with EMA weights)."""
        with torch.no_grad():
            for c_param, param in zip(self.collected_params, parameters):
                param.copy_(c_param)
        self.collected_params = []
