"""Training objectives: the loss of one micro-batch, given the model. The trainer owns the rest.

An objective takes the model (possibly wrapped by DDP or ``torch.compile``) and a dict of
tensors with one row per sample (what the batch source returned, on the device) and returns a
scalar loss. Any randomness it draws (masks, diffusion timesteps) comes from the torch RNG,
which the trainer reseeds from (seed, step, rank) before every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models.maskgit import random_mask


@dataclass(frozen=True)
class NextTokenCE:
    """Next-token cross-entropy of a causal GPT over ``tokens`` (raster order), with label
    smoothing; conditioned on ``labels`` when the model is class-conditional and on the
    ``context`` grid (stage 2: the loss covers the predicted grid only)."""
    label_smoothing: float = 0.0
    conditional: bool = False

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["tokens"]
        labels = batch["labels"] if self.conditional else None
        _, loss = model(x, labels=labels, targets=x, label_smoothing=self.label_smoothing,
                        context=batch.get("context"))
        return loss


@dataclass(frozen=True)
class MaskedTokenCE:
    """Mask-predict cross-entropy (MaskGIT, DiGIT's NAR stage 2): per sample, ``random_mask``
    replaces a cosine-distributed number of the grid's ``tokens`` by [MASK]; the loss (with label
    smoothing) covers the masked positions only. The ``context`` grid is never masked."""
    mask_code: int
    label_smoothing: float = 0.0
    conditional: bool = False

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["tokens"]
        masked = random_mask(x.shape[0], x.shape[1], device=x.device)
        inputs = x.masked_fill(masked, self.mask_code)
        logits = model(inputs, batch["labels"] if self.conditional else None, batch.get("context"))
        return F.cross_entropy(logits[masked].float(), x[masked], label_smoothing=self.label_smoothing)


@dataclass(frozen=True)
class LatentDiffusionLoss:
    """MAR's diffusion loss over continuous tokens, as MAR trains from cached latents: ``tokens``
    holds each token's KL posterior [mean, log-variance] (B, L, 2C); a latent is sampled from it
    (torch RNG), multiplied by ``latent_scale`` and given to the model, whose forward draws its own
    masks / orders / timesteps and returns the loss (``models/mar.py``, ``models/mar_causal.py``)."""
    latent_scale: float
    conditional: bool = False

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mean, logvar = batch["tokens"].float().chunk(2, dim=-1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * self.latent_scale
        return model(latents, batch["labels"] if self.conditional else None)
