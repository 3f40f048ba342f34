"""Reading MAR's KL-VAE checkpoint (``kl16.ckpt``: ``{"model": state_dict}``, LDM AutoencoderKL key
names) into `models.kl_vae.KLAutoencoder`. Nothing is ever downloaded."""
from __future__ import annotations

import os

import torch

from .io import ForeignObject, load_torch
from .models.kl_vae import KLAutoencoder, assign_kl_state, preset as kl_preset


def _plain_dict(obj) -> bool:
    return isinstance(obj, dict) and not isinstance(obj, ForeignObject)


def kl_vae_state_dict(obj, path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded KL-VAE checkpoint: MAR's ``{"model": sd}``, an LDM/Lightning
    ``{"state_dict": sd}`` or a bare state dict; ``loss.*`` keys (discriminator, LPIPS) dropped.
    ValueError naming ``path`` when it holds no state dict."""
    sd = obj
    if _plain_dict(obj):
        for key in ("model", "state_dict"):
            if key in obj:
                sd = obj[key]
                break
    if not _plain_dict(sd):
        kind = sd.origin if isinstance(sd, ForeignObject) else type(sd).__name__
        raise ValueError(f"KL-VAE checkpoint {path} holds {kind}, not a state dict "
                         f"(expected MAR's {{'model': state_dict}})")
    sd = {str(k): v for k, v in sd.items() if not str(k).startswith("loss.")}
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"KL-VAE checkpoint {path}: non-tensor entries {bad[:10]}")
    return sd


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
