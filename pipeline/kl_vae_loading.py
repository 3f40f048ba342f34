"""Reading MAR's KL-VAE checkpoint (``kl16.ckpt``: ``{"model": state_dict}``, LDM AutoencoderKL key
names) into `models.kl_vae.KLAutoencoder` for the pipeline's stages, through ``io.load_torch`` (so
Lightning-format files with foreign objects load too; no code from the file runs). The plain public
API is ``models.kl_vae.load_kl_vae``. Nothing is ever downloaded."""
from __future__ import annotations

import os

import torch

from .io import ForeignObject, load_torch
from .models.kl_vae import KLAutoencoder, assign_kl_state, checkpoint_state_dict, preset as kl_preset


def kl_vae_state_dict(obj, path) -> dict[str, torch.Tensor]:
    """``models.kl_vae.checkpoint_state_dict`` for objects read by ``io.load_torch``: a foreign
    object (a pickled class standing in for the state dict) is a ValueError naming ``path``."""
    inner = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) and not isinstance(
        obj, ForeignObject) else obj
    if isinstance(obj, ForeignObject) or isinstance(inner, ForeignObject):
        kind = (inner if isinstance(inner, ForeignObject) else obj).origin
        raise ValueError(f"KL-VAE checkpoint {path} holds {kind}, not a state dict "
                         f"(expected MAR's {{'model': state_dict}})")
    return checkpoint_state_dict(obj, path)


def load_kl_vae(path, preset: str = "kl16") -> KLAutoencoder:
    """A ``KLAutoencoder`` (eval mode, CPU, float32) from the checkpoint file at ``path``; every key
    must match the preset's exactly (after dropping ``loss.*``), else a ValueError naming the file
    and the missing / unexpected / mis-shaped keys."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"KL-VAE checkpoint not found: {path} (nothing is downloaded; "
                                f"place MAR's kl16.ckpt there yourself)")
    sd = kl_vae_state_dict(load_torch(path, foreign_objects=True), path)
    model = KLAutoencoder(kl_preset(preset))
    assign_kl_state(model, sd, f"KL-VAE checkpoint {path} (preset {preset!r})")
    return model.eval()
