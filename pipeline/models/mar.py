"""MAR: masked autoregressive generation of continuous tokens with a diffusion loss (pure torch + timm).

Our own implementation of the method of Li et al. 2024, "Autoregressive Image Generation without
Vector Quantization" (code: LTH14/mar). References ``mar.py:N`` are lines of LTH14/mar's
``models/mar.py``; ``diffloss.py``, ``main_mar.py``, ``engine_mar.py``, ``util/misc.py`` and
``README.md`` are the other files of that repository.

The model sees an image as L = h*w continuous tokens (KL-VAE latents, C channels each, raster order,
already multiplied by the VAE's scale by the caller: ``engine_mar.py:65``) and is an MAE-style
encoder/decoder in which a random subset of tokens is masked:

* encoder (``forward_mae_encoder``, ``mar.py:172-204``): ``z_proj`` (C -> D), ``buffer_size`` extra
  slots in front that all hold the class embedding (``class_emb``; ``fake_latent`` for the null /
  unconditional condition), plus the learned position embedding over buffer + L, then ``z_proj_ln``;
  the masked tokens are DROPPED (every row must keep the same number of tokens) and the kept ones,
  buffer first, then in raster order, go through timm ViT blocks and ``encoder_norm``;
* decoder (``forward_mae_decoder``, ``mar.py:206-230``): ``decoder_embed``, the dropped positions
  refilled with ``mask_token``, position embedding, blocks, ``decoder_norm``; the buffer is cut off
  and ``diffusion_pos_embed_learned`` added: z (B, L, D') conditions the diffusion head per token;
* the head (``diffloss``, `models.diffusion_head`): a small MLP denoiser models p(x_i | z_i).

Training (``mar.py:232-260``): one random order per image (``sample_orders``, ``mar.py:152-160``);
ONE mask ratio per batch from a truncated normal on [``mask_ratio_min``, 1] with mean 1.0 and std
0.25 (``mar.py:66``), ``ceil(L * ratio)`` tokens masked, the first ones of each order
(``mar.py:162-170``); in training mode each image's class embedding is replaced by ``fake_latent``
with probability ``label_drop_prob`` (``mar.py:181-184``); the diffusion loss covers the masked
tokens only, each repeated ``diffusion_batch_mul`` times (``mar.py:232-238``, ``diffloss.py:26-33``).

Sampling (``sample_tokens``, ``mar.py:262-329``): all tokens start masked (value 0) and one random
order is drawn per image. At step s of ``num_iter`` the number of tokens left masked afterwards is
``floor(L * cos(pi/2 * (s+1) / num_iter))``, clamped to [1, still masked - 1]
(``mar.py:293-298``); the tokens at order positions from there to the currently masked count are
drawn by the diffusion head from the decoder output of this step; the last step draws all that
remain (``mar.py:302-305``). With more steps than tokens MAR's extra steps draw nothing (we skip
them). Classifier-free guidance doubles the batch with ``fake_latent`` rows (``mar.py:281-284``)
and guides the head's eps with a scale that ramps linearly with the number of tokens known after the
step, ``1 + (cfg - 1) * (L - left masked) / L`` (``"linear"``, after Muse) or stays ``cfg``
(``"constant"``) (``mar.py:312-318``). Here every sample draws its order and all its diffusion noise
from its own generator, so a sample does not depend on its batch (MAR uses the global RNGs; under
guidance it draws noise for both halves but uses only the conditional half's, which is all we draw).

Sizes (``mar.py:332-353``): base 768 x (12 + 12) blocks, 12 heads; large 1024 x (16 + 16), 16 heads;
huge 1280 x (20 + 20), 16 heads; all with mlp ratio 4 and LayerNorm eps 1e-6. Their released heads
(``README.md:111-141``): 1024 x 6, 1280 x 8, 1536 x 12. Defaults (``main_mar.py:54,79-92``, class
signature ``mar.py:25-41``): buffer 64, label drop 0.1, mask ratio min 0.7, attention and projection
dropout 0.1, ``num_sampling_steps`` "100", ``diffusion_batch_mul`` 4 (the README's training command,
``README.md:98``; the argparse default is 1). Init (``mar.py:107-129``): N(0, 0.02) for the
embeddings, tokens and position embeddings, xavier-uniform linears with zero bias, unit LayerNorms;
the head keeps its own init (it is built afterwards).

Checkpoints: MAR's ``checkpoint-last.pth`` (``util/misc.py:306-324``) is a dict with ``model`` and
``model_ema`` state dicts (plus ``optimizer``, ``epoch``, ``scaler`` and ``args``, an
``argparse.Namespace``); the parameter names of `MAR` here are exactly MAR's, so ``load_mar`` loads it
strictly. The attention head counts are not in the weights: they come from ``args.model`` or the
preset of the same size. Our trainer's checkpoints carry
``model_config`` (`MARConfig.to_dict`) instead.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from .diffusion_head import DiffusionLoss
from .sampling import CFG_SCHEDULES, cfg_scale_at, sample_seeds, seeded_batches  # noqa: F401 (re-exported)
from .state_dicts import key_problems, module_shapes, name_keys

MASK_RATIO_MEAN = 1.0     # mar.py:66: truncnorm((min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
MASK_RATIO_STD = 0.25
MASK_RATIO_MAX = 1.0
NORM_EPS = 1e-6           # mar.py:71 (z_proj_ln) and the presets' norm_layer, mar.py:336
TRAINER_FORMAT = "digit-stage1-v1"
TRAINER_FAMILIES = ("mar",)

PRESETS: dict[str, dict] = {
    # CPU-trainable in about a minute on small grids; keeps the caller's grid, channels and classes
    "tiny": dict(encoder_width=128, encoder_depth=2, encoder_heads=4, decoder_width=128, decoder_depth=2,
                 decoder_heads=4, head_width=128, head_depth=3, buffer_size=4),
    "base": dict(encoder_width=768, encoder_depth=12, encoder_heads=12, decoder_width=768, decoder_depth=12,
                 decoder_heads=12, head_width=1024, head_depth=6, buffer_size=64),
    "large": dict(encoder_width=1024, encoder_depth=16, encoder_heads=16, decoder_width=1024, decoder_depth=16,
                  decoder_heads=16, head_width=1280, head_depth=8, buffer_size=64),
    "huge": dict(encoder_width=1280, encoder_depth=20, encoder_heads=16, decoder_width=1280, decoder_depth=20,
                 decoder_heads=16, head_width=1536, head_depth=12, buffer_size=64),
}


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class MARConfig:
    """Sizes and training settings of a MAR model (defaults: MAR's class defaults, ``mar.py:25-41``)."""

    grid: tuple[int, int] = (16, 16)      # (h, w) latent tokens
    token_dim: int = 16                   # C channels per token
    num_classes: int = 1000               # 0: unconditional (only fake_latent is used)
    encoder_width: int = 1024
    encoder_depth: int = 16
    encoder_heads: int = 16
    decoder_width: int = 1024
    decoder_depth: int = 16
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    head_width: int = 1024
    head_depth: int = 3
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    grad_checkpointing: bool = False

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        object.__setattr__(self, "num_sampling_steps", str(self.num_sampling_steps))
        problems = self.problems()
        if problems:
            raise ValueError("invalid MARConfig: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if len(self.grid) != 2 or min(self.grid) < 1:
            out.append(f"grid {self.grid} must be two positive sizes")
        for name in ("token_dim", "encoder_width", "decoder_width", "encoder_heads", "decoder_heads",
                     "head_width", "buffer_size", "diffusion_batch_mul"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1")
        for name in ("num_classes", "encoder_depth", "decoder_depth", "head_depth"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0")
        for part in ("encoder", "decoder"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if heads >= 1 and width % heads:
                out.append(f"{part}_width {width} is not a multiple of {part}_heads {heads}")
        if not 0.0 < self.mask_ratio_min <= MASK_RATIO_MAX:
            out.append(f"mask_ratio_min {self.mask_ratio_min} must be in (0, 1]")
        for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append(f"{name} must be in [0, 1]")
        return out

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        """JSON-able values (the grid as a list)."""
        return {**asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "MARConfig":
        """Inverse of `to_dict`; ValueError naming unknown keys."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MARConfig keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "grid" in d:
            d["grid"] = tuple(d["grid"])
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "MARConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown MAR preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# masks, orders and schedules (small pure functions)


def _standard_normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def sample_mask_ratios(n: int, min_ratio: float = 0.7, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n,) float64 training mask ratios ~ N(1.0, 0.25^2) truncated to [min_ratio, 1] (``mar.py:66``),
    by inverse CDF from ``generator`` (the global CPU RNG when None)."""
    lo = _standard_normal_cdf((min_ratio - MASK_RATIO_MEAN) / MASK_RATIO_STD)
    hi = _standard_normal_cdf((MASK_RATIO_MAX - MASK_RATIO_MEAN) / MASK_RATIO_STD)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    ratios = MASK_RATIO_MEAN + MASK_RATIO_STD * torch.special.ndtri(lo + u * (hi - lo))
    return ratios.clamp(min_ratio, MASK_RATIO_MAX)   # only rounding can leave the interval


def num_masked_tokens(seq_len: int, ratio: float) -> int:
    """``ceil(L * ratio)`` (``mar.py:166``)."""
    return int(math.ceil(seq_len * ratio))


def random_orders(n: int, seq_len: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """(n, L) int64: one uniformly random permutation of the positions per row."""
    device = device if device is not None else (generator.device if generator is not None else None)
    return torch.rand(n, seq_len, generator=generator, device=device).argsort(dim=1)


def mask_by_order(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """(n, L) bool, True at the first ``num_masked`` positions of each row's order (``mar.py:16-19``)."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


def masked_after_steps(seq_len: int, num_iter: int) -> list[int]:
    """MAR's ``mask_len`` at each of ``num_iter`` sampling steps (``mar.py:293-298``): the tokens left
    masked after the step, ``floor(L cos(pi/2 (s+1)/num_iter))`` clamped to [1, still masked - 1].
    (After the last step none is left; MAR's clamp still reports 1 there, which its CFG ramp uses.)"""
    if seq_len < 1 or num_iter < 1:
        raise ValueError(f"need seq_len >= 1 and num_iter >= 1, got {seq_len}, {num_iter}")
    out, still_masked = [], seq_len
    for step in range(num_iter):
        target = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
        left = max(1, min(still_masked - 1, target))
        out.append(left)
        still_masked = left
    return out


def tokens_per_step(seq_len: int, num_iter: int) -> list[int]:
    """Tokens drawn at each sampling step that draws any (each >= 1, sum = L). With
    ``num_iter > L`` MAR has steps that draw nothing; they are left out, so the list is shorter."""
    counts, still_masked = [], seq_len
    left_after = masked_after_steps(seq_len, num_iter)
    for step, left in enumerate(left_after):
        left = 0 if step == len(left_after) - 1 else left
        if still_masked > left:
            counts.append(still_masked - left)
        still_masked = left
    return counts


def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) -> (n, h*w, C) in raster order (MAR's ``patchify`` with patch size 1, ``mar.py:131-139``)."""
    return latents.flatten(2).transpose(1, 2)


def tokens_to_latents(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(n, h*w, C) -> (n, C, h, w) (MAR's ``unpatchify``, ``mar.py:141-150``)."""
    h, w = grid
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


# --------------------------------------------------------------------------------------------
# the model


def _transformer_block(width: int, heads: int, config: MARConfig) -> Block:
    return Block(width, heads, config.mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=NORM_EPS),
                 proj_drop=config.proj_dropout, attn_drop=config.attn_dropout)


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MAR(nn.Module):
    """MAR's masked encoder/decoder with its diffusion head; parameter names as LTH14/mar's ``MAR``."""

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        self.grad_checkpointing = config.grad_checkpointing
        c, L = config, config.seq_len
        enc, dec = c.encoder_width, c.decoder_width
        self.class_emb = nn.Embedding(c.num_classes, enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.z_proj = nn.Linear(c.token_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=NORM_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + c.buffer_size, enc))
        self.encoder_blocks = nn.ModuleList(_transformer_block(enc, c.encoder_heads, c) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(enc, eps=NORM_EPS)
        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + c.buffer_size, dec))
        self.decoder_blocks = nn.ModuleList(_transformer_block(dec, c.decoder_heads, c) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dec, eps=NORM_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, dec))
        self.initialize_weights()
        # built after initialize_weights, so the head keeps its own (zero-output) init, as in MAR
        self.diffloss = DiffusionLoss(c.token_dim, dec, depth=c.head_depth, width=c.head_width,
                                      num_sampling_steps=c.num_sampling_steps,
                                      diffusion_batch_mul=c.diffusion_batch_mul,
                                      grad_checkpointing=c.grad_checkpointing)

    def initialize_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            if p.numel():
                nn.init.normal_(p, std=0.02)
        self.apply(_init_linear_and_norm)

    @property
    def latent_grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    def extra_repr(self) -> str:
        c = self.config
        return (f"grid={c.grid[0]}x{c.grid[1]}, token_dim={c.token_dim}, classes={c.num_classes}, "
                f"encoder={c.encoder_width}x{c.encoder_depth}, decoder={c.decoder_width}x{c.decoder_depth}, "
                f"head={c.head_width}x{c.head_depth}, buffer={c.buffer_size}")

    # ---- conditions

    def class_embedding(self, labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """(B, D): ``class_emb(labels)``, or ``fake_latent`` for every row when labels is None."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        if self.config.num_classes == 0:
            raise ValueError("an unconditional MAR (num_classes 0) takes no labels")
        return self.class_emb(labels)

    def _drop_labels(self, embedding: torch.Tensor) -> torch.Tensor:
        """Each row replaced by ``fake_latent`` with probability ``label_drop_prob`` (global RNG)."""
        drop = (torch.rand(embedding.shape[0]) < self.config.label_drop_prob).to(embedding.device)
        return torch.where(drop[:, None], self.fake_latent.to(embedding.dtype), embedding)

    # ---- encoder / decoder

    def _blocks(self, blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False) if recompute else block(h)
        return h

    def _kept_with_buffer(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, buffer + L) bool: the positions the encoder sees (the buffer always)."""
        buffer = torch.ones(mask.shape[0], self.config.buffer_size, dtype=torch.bool, device=mask.device)
        return torch.cat([buffer, ~mask], dim=1)

    def _encode(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        h = self.z_proj(x)
        B, _, D = h.shape
        slots = class_embedding.to(h.dtype).unsqueeze(1).expand(B, self.config.buffer_size, D)
        h = self.z_proj_ln(torch.cat([slots, h], dim=1) + self.encoder_pos_embed_learned)
        h = h[self._kept_with_buffer(mask)].reshape(B, -1, D)
        return self.encoder_norm(self._blocks(self.encoder_blocks, h))

    def _decode(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.decoder_embed(h)
        kept = self._kept_with_buffer(mask)
        full = self.mask_token.to(h.dtype).expand(kept.shape[0], kept.shape[1], -1).clone()
        full[kept] = h.reshape(-1, h.shape[-1])
        h = self._blocks(self.decoder_blocks, full + self.decoder_pos_embed_learned)
        h = self.decoder_norm(h)[:, self.config.buffer_size:]
        return h + self.diffusion_pos_embed_learned

    def _condition(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        return self._decode(self._encode(x, mask, class_embedding), mask)

    def _check_tokens(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.seq_len, self.token_dim):
            raise ValueError(f"expected tokens (B, {self.seq_len}, {self.token_dim}), got {tuple(x.shape)}")

    def condition(self, x: torch.Tensor, mask: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, D') decoder output that conditions the head (MAR's ``forward_mae_encoder`` +
        ``forward_mae_decoder``), raster order. x (B, L, C) tokens; mask (B, L) True = to predict, the
        same count in every row; labels (B,) or None (null condition). In training mode labels are
        dropped with ``label_drop_prob``, as MAR does."""
        self._check_tokens(x)
        mask = mask.bool()
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(x.shape)}")
        kept = (~mask).sum(dim=1)
        if kept.numel() and not bool((kept == kept[0]).all()):
            raise ValueError(f"every row must mask the same number of tokens, got kept counts {kept.tolist()}")
        embedding = self.class_embedding(labels, x.shape[0])
        if self.training and labels is not None and self.config.label_drop_prob > 0:
            embedding = self._drop_labels(embedding)
        return self._condition(x, mask, embedding)

    def head(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(N, 2C) raw output of the diffusion MLP (eps, variance value) for x_t (N, C), steps t (N,), z (N, D')."""
        return self.diffloss.net(x_t, t, z)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training loss for tokens x (B, L, C) and labels (B,) or None; randomness from the global RNG."""
        self._check_tokens(x)
        B, L, _ = x.shape
        orders = random_orders(B, L).to(x.device)
        ratio = sample_mask_ratios(1, self.config.mask_ratio_min).item()
        mask = mask_by_order(orders, num_masked_tokens(L, ratio))
        z = self.condition(x, mask, labels)
        return self.diffloss.loss(x.detach(), z, mask)


# --------------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def _draw_batch(model: MAR, labels, generators: list[torch.Generator], num_iter: int, cfg_scale: float,
                cfg_schedule: str, temperature: float) -> torch.Tensor:
    B, L, C = len(generators), model.seq_len, model.token_dim
    device, dtype = model.fake_latent.device, model.fake_latent.dtype
    orders = torch.cat([random_orders(1, L, generator=g) for g in generators]).to(device)
    tokens = torch.zeros(B, L, C, device=device, dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    embedding = model.class_embedding(labels, B)
    guided = cfg_scale != 1.0
    if guided:
        embedding = torch.cat([embedding, model.fake_latent.expand(B, -1)])
    left_after = masked_after_steps(L, num_iter)
    still_masked = L
    for step, left in enumerate(left_after):
        last = step == len(left_after) - 1
        count = still_masked - (0 if last else left)
        if count == 0:
            continue            # MAR's empty steps (num_iter > L): nothing drawn, nothing changes
        mask_next = torch.zeros_like(mask) if last else mask_by_order(orders, left)
        to_draw = mask & ~mask_next
        z = model._condition(torch.cat([tokens, tokens]) if guided else tokens,
                             torch.cat([mask, mask]) if guided else mask, embedding)
        rows = z[:B][to_draw]                         # sample-major: sample b's tokens are rows b*count...
        row_generators = [g for g in generators for _ in range(count)]
        scale = cfg_scale_at(cfg_scale, cfg_schedule, L - left, L)
        if guided and scale != 1.0:
            rows = torch.cat([rows, z[B:][to_draw]])
            drawn = model.diffloss.sample(rows, temperature, row_generators, cfg=scale)[: B * count]
        else:
            drawn = model.diffloss.sample(rows, temperature, row_generators)
        tokens[to_draw] = drawn.to(dtype)
        mask, still_masked = mask_next, still_masked - count
    return tokens


def mar_sample(model: MAR, n: int, *, labels=None, seeds=None, num_iter: int = 64, cfg_scale: float = 1.0,
               cfg_schedule: str = "linear", temperature: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """Draw n token grids (n, L, C), raster order, in the scaled latent space the model was trained on.

    labels: (n,) class ids or one id for all (None: the null condition ``fake_latent``).
    seeds: one int per sample (default 0..n-1); sample i draws its order and every diffusion noise from
    its own generator, so it depends only on seeds[i], labels[i] and the settings, not on its batch.
    cfg_scale != 1: classifier-free guidance against the null condition, ramped by ``cfg_schedule``.
    temperature: scales the diffusion sampling noise. The model is put in eval mode for the call."""
    device = model.fake_latent.device
    seeds = sample_seeds(n, seeds)
    cfg_scale_at(cfg_scale, cfg_schedule, 0, 1)        # rejects an unknown schedule before any work
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    if labels is not None:
        if model.config.num_classes == 0:
            raise ValueError("an unconditional MAR (num_classes 0) takes no labels")
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1 and n > 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise ValueError(f"{labels.numel()} labels for {n} samples")
    elif cfg_scale != 1.0 and model.config.num_classes == 0:
        raise ValueError("classifier-free guidance needs a class-conditional model")
    empty = torch.zeros(0, model.seq_len, model.token_dim, device=device)
    return seeded_batches(model, seeds, labels, None, batch_size, lambda lab, _ctx, gens: _draw_batch(
        model, lab, gens, num_iter, cfg_scale, cfg_schedule, temperature), empty=empty)


# --------------------------------------------------------------------------------------------
# loading


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """1 + the highest block index under ``prefix`` (gaps then show up as missing keys)."""
    indices = [int(k[len(prefix):].split(".", 1)[0]) for k in state
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(indices) + 1 if indices else 0


def _heads(width: int, depth: int, part: str, model_name: Optional[str]) -> int:
    """Heads (not visible in the weights): MAR's named preset, else the preset of that size, else width // 64."""
    named = PRESETS.get((model_name or "").removeprefix("mar_"))
    candidates = ([named] if named else []) + list(PRESETS.values())
    for p in candidates:
        if (p[f"{part}_width"], p[f"{part}_depth"]) == (width, depth):
            return p[f"{part}_heads"]
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def _mlp_ratio(state: Mapping[str, torch.Tensor], encoder_width: int, decoder_width: int) -> float:
    for part, width in (("encoder", encoder_width), ("decoder", decoder_width)):
        fc1 = state.get(f"{part}_blocks.0.mlp.fc1.weight")
        if fc1 is not None:
            return fc1.shape[0] / width
    return 4.0


INFERENCE_KEYS = ("class_emb.weight", "z_proj.weight", "decoder_embed.weight", "encoder_pos_embed_learned",
                  "diffusion_pos_embed_learned", "diffloss.net.input_proj.weight")


def infer_mar_config(state: Mapping[str, torch.Tensor], model_name: Optional[str] = None, **overrides) -> MARConfig:
    """A `MARConfig` whose module has the shapes of ``state`` (a MAR state dict): grid from the
    position embeddings (square), widths, depths, token and class counts from tensor shapes and block
    counts; heads from ``model_name`` (``mar_base`` ...) or the preset of that size, else width // 64.
    ``overrides`` replace inferred or default fields (e.g. a non-square ``grid``)."""
    missing = [k for k in INFERENCE_KEYS if k not in state]
    if missing:
        raise ValueError(f"not a MAR state dict: missing keys: {name_keys(missing)}")
    seq_len = state["diffusion_pos_embed_learned"].shape[1]
    buffer = state["encoder_pos_embed_learned"].shape[1] - seq_len
    side = math.isqrt(seq_len)
    grid = overrides.pop("grid", None) or (side, side)
    if grid[0] * grid[1] != seq_len:
        raise ValueError(f"{seq_len} position embeddings are not a square grid; pass grid=(h, w)")
    enc_width, token_dim = state["z_proj.weight"].shape
    dec_width = state["decoder_embed.weight"].shape[0]
    enc_depth, dec_depth = _block_count(state, "encoder_blocks."), _block_count(state, "decoder_blocks.")
    sizes = dict(
        grid=tuple(grid), token_dim=token_dim, num_classes=state["class_emb.weight"].shape[0],
        encoder_width=enc_width, encoder_depth=enc_depth,
        encoder_heads=_heads(enc_width, enc_depth, "encoder", model_name),
        decoder_width=dec_width, decoder_depth=dec_depth,
        decoder_heads=_heads(dec_width, dec_depth, "decoder", model_name),
        mlp_ratio=_mlp_ratio(state, enc_width, dec_width),
        buffer_size=buffer, head_width=state["diffloss.net.input_proj.weight"].shape[0],
        head_depth=_block_count(state, "diffloss.net.res_blocks."))
    return MARConfig(**{**sizes, **overrides})


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint dict, tensors memory-mapped where the format allows; plain data only
    (``argparse.Namespace`` is allowed for MAR's ``args``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:        # mmap needs the zip format; older files load without it
                ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]})") from e
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got a {type(ck).__name__}")
    return ck


def _pick(path: Path, ck: dict, ema_key: str, ema: bool) -> tuple[str, Mapping[str, torch.Tensor]]:
    """(name, state dict): the EMA weights when asked for and present, else ``model``."""
    key = ema_key if ema and ck.get(ema_key) is not None else "model"
    if not isinstance(ck.get(key), Mapping):
        raise ValueError(f"{path}: no {key!r} state dict (top-level keys: {', '.join(map(str, ck))})")
    return key, ck[key]


def load_mar(path, ema: bool = True, *, device="cpu", **overrides) -> MAR:
    """A `MAR` in eval mode from LTH14/mar's ``checkpoint-last.pth`` (sizes inferred from the tensors,
    `infer_mar_config`) or from our trainer's checkpoint (``format`` "digit-stage1-v1", family "mar",
    built from ``model_config``). EMA weights (``model_ema`` / ``ema``) when ``ema`` and present.
    ``overrides``: `MARConfig` fields that do not change shapes (``num_sampling_steps``, heads ...).
    ValueError naming the file and the missing / unexpected / mis-shaped keys when they do not match."""
    path = Path(path)
    ck = _read_checkpoint(path)
    if ck.get("format") == TRAINER_FORMAT:
        if ck.get("family") not in TRAINER_FAMILIES:
            raise ValueError(f"{path}: a {ck.get('family')!r} checkpoint, not a MAR one")
        key, state = _pick(path, ck, "ema", ema)
        config = MARConfig.from_dict({**ck["model_config"], **overrides})
    elif "model" in ck or "model_ema" in ck:
        key, state = _pick(path, ck, "model_ema", ema)
        try:
            config = infer_mar_config(state, getattr(ck.get("args"), "model", None), **overrides)
        except ValueError as e:
            raise ValueError(f"{path}: {key!r}: {e}") from e
    else:
        raise ValueError(f"{path}: neither a MAR checkpoint nor ours (top-level keys: {', '.join(map(str, ck))})")
    with torch.device("meta"):
        model = MAR(config)
    problems = key_problems(module_shapes(model), state)
    if problems:
        raise ValueError(f"{path}: {key!r} does not match MAR ({model.extra_repr()}): " + " | ".join(problems))
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()
