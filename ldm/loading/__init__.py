"""Checkpoints to modules: safe reading (``.ckpt``, ``.safetensors``, diffusers folders), strict matching, and
building a model from its config without holding the weights twice. Knows no model class: models are built from
their config's ``target:`` strings."""
