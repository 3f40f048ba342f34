"""Reading taming-format VQGAN checkpoints (taming-transformers, MAGE's converted MaskGIT VQGAN)
into `models.vqgan.VQGAN`. Nothing is ever downloaded."""
from __future__ import annotations

import os

import torch

from .io import ForeignObject, load_torch
from .models.state_dicts import key_problems, module_shapes
from .models.vqgan import PRESETS, VQGAN, VQGANConfig


def read_taming_object(path):
    """What a taming/Lightning checkpoint file holds. Objects other than tensors and containers
    (Lightning callbacks, hparams) load as inert ``io.ForeignObject``s: no code from the file runs.
    ValueError naming the file when it is unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path} (nothing is downloaded; "
                                f"place the taming/MAGE checkpoint there yourself)")
    return load_torch(path, foreign_objects=True)


def taming_state_dict(obj, path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded taming checkpoint (``{"state_dict": ...}`` or a bare state dict),
    without the ``loss.*`` ones (discriminator, LPIPS); ValueError naming ``path`` if unusable."""
    sd = obj.get("state_dict", obj) if _plain_dict(obj) else obj
    if not _plain_dict(sd):
        raise ValueError(f"VQGAN checkpoint {path} holds {_kind(sd)}, not a state dict")
    sd = {k: v for k, v in sd.items() if not str(k).startswith("loss.")}
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"VQGAN checkpoint {path}: non-tensor entries {bad[:10]}")
    return sd


def read_taming_state_dict(path) -> dict[str, torch.Tensor]:
    """``taming_state_dict`` of the file at ``path``."""
    return taming_state_dict(read_taming_object(path), os.fspath(path))


def _plain_dict(obj) -> bool:
    return isinstance(obj, dict) and not isinstance(obj, ForeignObject)


def _kind(obj) -> str:
    """What an object is, for errors: the class a ForeignObject stands for, else its type."""
    return obj.origin if isinstance(obj, ForeignObject) else type(obj).__name__


def load_taming_checkpoint(path, config: VQGANConfig | None = None,
                           strict: bool = True) -> VQGAN:
    """Load a taming-format VQGAN checkpoint (``{"state_dict": ...}`` or a bare state dict).

    ``config`` defaults to the ``mage_vqgan`` preset. ``loss.*`` keys (discriminator, LPIPS) are
    dropped; everything else must match our module's keys and shapes exactly. Nothing is ever
    downloaded.
    """
    return taming_model(read_taming_state_dict(path), path, config, strict)


def taming_model(sd: dict[str, torch.Tensor], path, config: VQGANConfig | None = None,
                 strict: bool = True) -> VQGAN:
    """A ``VQGAN`` (eval mode) from a taming state dict read from ``path`` (named in errors)."""
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
