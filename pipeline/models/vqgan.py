"""VQGAN tokenizer (DiGIT steps 6-7) in pure torch, state-dict compatible with taming-transformers.

Two architecture variants share one set of module names (``encoder.down.{i}.block.{j}.conv1`` ...):

* ``variant="taming"``: CompVis taming-transformers ``VQModel`` (``configs/imagenet_vqgan.yaml``):
  attention blocks at ``attn_resolutions`` and in the middle, biased convs, stride-2 conv
  downsampling with (0,1,0,1) padding, ``num_res_blocks + 1`` blocks per decoder level,
  ``quant_conv`` / ``post_quant_conv`` 1x1 convs around the quantizer, pixels in [-1, 1].
* ``variant="maskgit"``: the VQGAN that MAGE ships (``vqgan_jax_strongaug.ckpt``, converted from
  the MaskGIT JAX tokenizer; MAGE's fork of taming, ``taming/modules/diffusionmodules/model.py``).
  Same config numbers as taming's f16/1024 model, but: no attention at all, bias-free convs in the
  residual blocks and in ``encoder.conv_in``, the 1x1 ``nin_shortcut`` maps out->out and is applied
  to the residual branch (``nin(h) + h``), average-pool downsampling (no ``downsample.conv``), 1x1
  ``encoder.conv_out``, ``num_res_blocks`` blocks per decoder level, no ``quant_conv`` /
  ``post_quant_conv``, pixels in [0, 1]. DiGIT uses this one (the ``mage_vqgan`` preset).

Whatever the variant, the public API takes and returns images in [-1, 1]; a [0, 1] model is
rescaled inside ``encode`` / ``decode``. Taming-format checkpoint files are read by
`pipeline.vqgan_loading`; this module does no file IO.

Quantizer: nearest codebook row by squared distance (z^2 + e^2 - 2 z.e, as taming), straight-through
gradient, loss ``beta * ||sg(zq) - z||^2 + ||zq - sg(z)||^2`` (taming's VectorQuantizer2 with
legacy=False; ``legacy_loss=True`` swaps beta onto the other term like taming's default).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("taming", "maskgit")


@dataclass(frozen=True)
class VQGANConfig:
    # quantizer
    embed_dim: int = 256
    n_embed: int = 1024
    beta: float = 0.25
    legacy_loss: bool = False
    # taming ddconfig
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 256
    double_z: bool = False
    dropout: float = 0.0
    variant: str = "taming"

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.double_z:
            raise ValueError("double_z=True is a KL-autoencoder setting; a VQGAN needs double_z=False")
        if self.variant == "maskgit" and self.embed_dim != self.z_channels:
            raise ValueError("maskgit variant has no quant_conv: embed_dim must equal z_channels")
        for c in {self.ch * m for m in self.ch_mult} | {self.ch}:
            if c % 32:
                raise ValueError(f"channel count {c} not divisible by 32 (GroupNorm groups)")

    @property
    def grid_size(self) -> int:
        n = self.resolution
        for _ in range(len(self.ch_mult) - 1):
            n //= 2  # pad(0,1)+conv3/s2 and avg_pool2 both give floor(n/2)
        return n

    @property
    def pixel_range(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.variant == "maskgit" else (-1.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, VQGANConfig] = {
    # CompVis taming-transformers configs/imagenet_vqgan.yaml (f16, 1024 codes).
    "taming_f16_1024": VQGANConfig(),
    # MAGE config/vqgan.yaml: same numbers, MaskGIT-converted architecture (what DiGIT decodes with).
    "mage_vqgan": VQGANConfig(variant="maskgit"),
    # Fashion-MNIST 28 px -> 7x7 tokens (28 -> 14 -> 7), trained here; taming architecture.
    "tiny": VQGANConfig(embed_dim=32, n_embed=256, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=(), resolution=28, in_channels=3, out_ch=3, z_channels=32),
}


def preset(name: str, **overrides) -> VQGANConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown VQGAN preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# building blocks (parameter names follow taming)

def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float, maskgit: bool):
        super().__init__()
        self.maskgit = maskgit
        bias = not maskgit
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        if c_in != c_out:
            # taming: shortcut on the input (c_in -> c_out); MAGE/MaskGIT: on the branch (out -> out)
            self.nin_shortcut = nn.Conv2d(c_out if maskgit else c_in, c_out, 1, bias=bias)
        else:
            self.nin_shortcut = None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(h if self.maskgit else x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 conv projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)   # b, hw, c
        k = self.k(h).flatten(2)                   # b, c, hw
        v = self.v(h).flatten(2)                   # b, c, hw
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)  # b, hw(query), hw(key)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0) if with_conv else None

    def forward(self, x):
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(attns)
    return m


def _mid(c: int, cfg: VQGANConfig) -> nn.Module:
    maskgit = cfg.variant == "maskgit"
    m = nn.Module()
    m.block_1 = ResnetBlock(c, c, cfg.dropout, maskgit)
    if not maskgit:
        m.attn_1 = AttnBlock(c)
    m.block_2 = ResnetBlock(c, c, cfg.dropout, maskgit)
    return m


def _run_mid(m: nn.Module, h):
    h = m.block_1(h)
    if hasattr(m, "attn_1"):
        h = m.attn_1(h)
    return m.block_2(h)


def _run_level(level: nn.Module, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        maskgit = cfg.variant == "maskgit"
        use_attn = not maskgit
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=not maskgit)
        res, c = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, cfg.ch * mult, cfg.dropout, maskgit))
                c = cfg.ch * mult
                if use_attn and res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c))
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c, with_conv=not maskgit)
                res //= 2
            self.down.append(level)
        self.mid = _mid(c, cfg)
        self.norm_out = group_norm(c)
        k = 1 if maskgit else 3
        self.conv_out = nn.Conv2d(c, cfg.z_channels, k, padding=k // 2)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        maskgit = cfg.variant == "maskgit"
        use_attn = not maskgit
        n_levels = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg)
        n_blocks = cfg.num_res_blocks if maskgit else cfg.num_res_blocks + 1
        levels: list[nn.Module] = []
        for i in reversed(range(n_levels)):
            blocks, attns = [], []
            for _ in range(n_blocks):
                blocks.append(ResnetBlock(c, cfg.ch * cfg.ch_mult[i], cfg.dropout, maskgit))
                c = cfg.ch * cfg.ch_mult[i]
                if use_attn and res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy_loss: bool = False):
        super().__init__()
        self.beta = beta
        self.legacy_loss = legacy_loss
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (B,C,h,w) -> indices (B,h,w) of the closest codebook rows."""
        b, c, hh, ww = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * flat @ e.t()
        return d.argmin(dim=1).reshape(b, hh, ww)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B,h,w) -> z_q (B,C,h,w)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z):
        indices = self.nearest(z)
        z_q = self.lookup(indices)
        commit = F.mse_loss(z_q.detach(), z)   # moves the encoder
        codebook = F.mse_loss(z_q, z.detach())  # moves the codes
        loss = (commit + self.beta * codebook) if self.legacy_loss else (self.beta * commit + codebook)
        z_q = z + (z_q - z).detach()  # straight-through
        return z_q, loss, indices


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        self.config = config = config or PRESETS["mage_vqgan"]
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta,
                                        config.legacy_loss)
        if config.variant == "taming":
            self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        else:
            self.quant_conv = self.post_quant_conv = None

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def codebook_size(self) -> int:
        return self.config.n_embed

    def _to_model_pixels(self, x):
        return (x + 1.0) * 0.5 if self.config.pixel_range == (0.0, 1.0) else x

    def _from_model_pixels(self, y):
        return y * 2.0 - 1.0 if self.config.pixel_range == (0.0, 1.0) else y

    def _latent(self, x):
        z = self.encoder(self._to_model_pixels(x))
        return self.quant_conv(z) if self.quant_conv is not None else z

    def _decode_latent(self, z_q):
        if self.post_quant_conv is not None:
            z_q = self.post_quant_conv(z_q)
        return self._from_model_pixels(self.decoder(z_q))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,C,H,W) in [-1,1] -> (z_q (B,embed_dim,h,w), indices (B,h,w) long)."""
        z_q, _, indices = self.quantize(self._latent(x))
        return z_q, indices

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self._decode_latent(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B,h,w) (or (B,h*w) with a square grid) -> images in [-1,1]."""
        indices = indices.long()
        if indices.dim() == 2:
            side = int(round(indices.shape[1] ** 0.5))
            if side * side != indices.shape[1]:
                raise ValueError(f"cannot reshape {indices.shape[1]} tokens into a square grid")
            indices = indices.reshape(indices.shape[0], side, side)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self._decode_latent(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor):
        """x in [-1,1] -> (reconstruction in [-1,1], codebook+commitment loss, indices (B,h,w))."""
        z_q, loss, indices = self.quantize(self._latent(x))
        return self._decode_latent(z_q), loss, indices
