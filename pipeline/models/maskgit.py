"""Mask-predict transformer (MaskGIT): DiGIT's non-autoregressive stage 2, and MaskGIT over VQ tokens.

The GPT's embeddings and blocks (``models/gpt.py``) without the causal mask. The input is the
condition (class or BOS), an optional context grid (the DiGIT tokens, stage 2) and the predicted
grid (the VQ tokens), in which some positions hold the ``[MASK]`` code (``vocab_size``, an extra
row of the token table that the head never predicts). Every position sees every other; logits are
read at the grid positions:

    input  = [cond, c_0, ..., c_{C-1}, x_0, ..., x_{T-1}]     x_i a code or [MASK]
    output =                          logits for x_0 .. x_{T-1}

Training (the official DiGIT choice, ``model_nar.py``): per image mask ``ceil(n cos(pi/2 u))``
(at least one) of the n grid tokens, u ~ U(0, 1), chosen uniformly at random
(``random_mask``); cross-entropy on the masked positions only (``objectives.MaskedTokenCE``).
Iterative decoding lives in ``models/mask_sampling.py``; its schedule is ``decode_schedule``.
"""
from __future__ import annotations

import math

import torch

from pipeline.models.gpt import GPTConfig, TokenTransformer


class MaskPredictor(TokenTransformer):
    """Bidirectional transformer over [cond, context, grid with [MASK] codes]; same config and
    presets as the GPT (``GPTConfig``), so the paper's 219M size is ``GPTConfig.preset("base")``."""

    def __init__(self, config: GPTConfig):
        super().__init__(config, causal=False, extra_codes=1)

    @property
    def mask_code(self) -> int:
        return self.config.vocab_size

    def forward(self, tokens: torch.Tensor, labels=None, context=None) -> torch.Tensor:
        """tokens (B, T) of codes and [MASK] -> logits (B, T, vocab_size) at every grid position."""
        if tokens.shape[1] != self.config.block_size:
            raise ValueError(f"a mask-predict model takes whole grids of {self.config.block_size} tokens, "
                             f"got {tokens.shape[1]}")
        x = self._embed(tokens, labels, context)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 1 + self.config.context_len:]))


def mask_counts(n: int, u: torch.Tensor) -> torch.Tensor:
    """How many of n tokens to mask for draws u in [0, 1): ceil(n cos(pi/2 u)), in [1, n]."""
    return torch.ceil(n * torch.cos(u.double() * (math.pi / 2))).long().clamp_(1, n)


def random_mask(batch_size: int, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch_size, n) bool: per row ``mask_counts`` positions chosen uniformly at random. Draws
    from ``generator`` (or the global torch RNG), so the trainer's per-step reseeding makes it
    reproducible."""
    u = torch.rand(batch_size, generator=generator, device=device)
    counts = mask_counts(n, u)
    scores = torch.rand(batch_size, n, generator=generator, device=device)
    rank = scores.argsort(dim=1).argsort(dim=1)        # rank of each position in a random order
    return rank < counts[:, None]


def decode_schedule(n: int, iterations: int) -> list[int]:
    """Tokens still masked after each of the ``iterations`` decoding steps: after step t < T-1,
    floor(n cos(pi/2 (t+1)/T)), at least 1 and at most one fewer than were masked before it (so
    every step fixes a token); 0 after the last step."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    left, out = n, []
    for t in range(iterations - 1):
        scheduled = math.floor(n * math.cos(math.pi / 2 * (t + 1) / iterations))
        left = max(1, min(left - 1, scheduled))
        out.append(left)
    return out + [0]
