"""Reading taming-format VQGAN checkpoints (taming-transformers, MAGE's converted MaskGIT VQGAN)
into `models.vqgan.VQGAN`. Nothing is ever downloaded."""
from __future__ import annotations

import os
import pickle

import torch

from .models.state_dicts import key_problems, module_shapes
from .models.vqgan import PRESETS, VQGAN, VQGANConfig


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise
    # Lightning .ckpt files may pickle callback/hparams objects; the user chose this local file.
    return torch.load(path, map_location="cpu", weights_only=False)


def read_taming_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a taming checkpoint (``{"state_dict": ...}`` or a bare state dict), without
    the ``loss.*`` ones (discriminator, LPIPS); ValueError naming the file if it is unusable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path} (nothing is downloaded; "
                                f"place the taming/MAGE checkpoint there yourself)")
    try:
        obj = _torch_load(path)
    except Exception as e:  # truncated zip, bad pickle, EOF, ...
        raise ValueError(f"cannot read VQGAN checkpoint {path} (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"VQGAN checkpoint {path} holds {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in sd.items() if not str(k).startswith("loss.")}
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"VQGAN checkpoint {path}: non-tensor entries {bad[:10]}")
    return sd


def load_taming_checkpoint(path, config: VQGANConfig | None = None,
                           strict: bool = True) -> VQGAN:
    """Load a taming-format VQGAN checkpoint (``{"state_dict": ...}`` or a bare state dict).

    ``config`` defaults to the ``mage_vqgan`` preset. ``loss.*`` keys (discriminator, LPIPS) are
    dropped; everything else must match our module's keys and shapes exactly. Nothing is ever
    downloaded.
    """
    sd = read_taming_state_dict(path)
    config = config or PRESETS["mage_vqgan"]
    model = VQGAN(config)
    own = module_shapes(model)
    problems = key_problems(own, sd)
    if strict and problems:
        hint = _variant_hint(sd, config)
        raise ValueError(f"VQGAN checkpoint {os.fspath(path)} does not match config "
                         f"(variant={config.variant}): " + " | ".join(problems + ([hint] if hint else [])))
    wrong = {k for k in set(own) & set(sd) if own[k] != tuple(sd[k].shape)}
    model.load_state_dict({k: v.float() for k, v in sd.items() if k not in wrong}, strict=strict)
    model.eval()
    return model


def _variant_hint(sd: dict, config: VQGANConfig) -> str | None:
    """A phrase naming the other variant when the keys look like it, else None."""
    has_attn = any(".attn" in k or k.startswith("quant_conv") for k in sd)
    if has_attn == (config.variant == "taming"):
        return None
    other = "taming" if has_attn else "maskgit"
    return (f"the keys look like variant={other!r} (taming has attention and "
            f"quant_conv; MAGE's MaskGIT-converted VQGAN has neither)")
