"""KL autoencoder (LDM ``AutoencoderKL``) in pure torch, state-dict compatible with MAR's ``kl16.ckpt``.

MAR (LTH14/mar, ``models/vae.py``) models continuous latents of LDM's KL-regularised autoencoder:

* encoder: taming's Encoder (``encoder.down.{i}.block.{j}...``, attention at ``attn_resolutions``
  and in the middle) whose ``conv_out`` gives ``2 * z_channels`` channels (LDM's ``double_z``:
  mean and log-variance);
* ``quant_conv`` 1x1 (``2 * z_channels -> 2 * embed_dim``), then a diagonal Gaussian posterior with
  the log-variance clamped to [-30, 20];
* ``post_quant_conv`` 1x1 (``embed_dim -> z_channels``) and taming's Decoder. MAR builds the decoder
  with LDM's default ``attn_resolutions=()``: attention only in its middle block.

The Encoder / Decoder modules are `models.vqgan`'s (taming variant, same parameter names); the
encoder's doubled output is obtained by building it with ``z_channels = 2 * z_channels``.

Images are in [-1, 1] (MAR normalises with mean 0.5 / std 0.5). MAR multiplies the sampled latents
by ``MAR_LATENT_SCALE`` before the generator and divides by it before decoding.

``load_kl_vae(path)`` is the public API for MAR's released ``kl16.ckpt`` (plain tensors only:
``torch.load(weights_only=True)``); it is this module's one file read (``tests/test_layers.py``
names it). The pipeline's stages read checkpoints through `pipeline.kl_vae_loading`, which also
accepts Lightning-format files holding foreign objects.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Mapping

import torch
import torch.nn as nn

from .state_dicts import key_problems, load_exact, module_shapes
from .vqgan import Decoder, Encoder, VQGANConfig

MAR_LATENT_SCALE = 0.2325  # LTH14/mar engine_mar.py: posterior.sample().mul_(0.2325); decode(z / 0.2325)
LOGVAR_RANGE = (-30.0, 20.0)  # LDM DiagonalGaussianDistribution clamp


@dataclass(frozen=True)
class KLVAEConfig:
    embed_dim: int = 16
    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("ch_mult", "encoder_attn_resolutions", "decoder_attn_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.embed_dim < 1 or self.z_channels < 1:
            raise ValueError("embed_dim and z_channels must be positive")
        self._taming(self.z_channels, self.decoder_attn_resolutions)  # validates channel counts

    def _taming(self, z_channels: int, attn: tuple[int, ...]) -> VQGANConfig:
        return VQGANConfig(embed_dim=self.embed_dim, ch=self.ch, ch_mult=self.ch_mult,
                           num_res_blocks=self.num_res_blocks, attn_resolutions=attn,
                           resolution=self.resolution, in_channels=self.in_channels,
                           out_ch=self.out_ch, z_channels=z_channels, dropout=self.dropout,
                           variant="taming")

    def encoder_config(self) -> VQGANConfig:
        """The taming Encoder config; ``2 * z_channels`` outputs is LDM's ``double_z``."""
        return self._taming(2 * self.z_channels, self.encoder_attn_resolutions)

    def decoder_config(self) -> VQGANConfig:
        return self._taming(self.z_channels, self.decoder_attn_resolutions)

    @property
    def grid_size(self) -> int:
        return self.decoder_config().grid_size

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, KLVAEConfig] = {
    # MAR's KL-16 (main_mar.py: AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)); LDM defaults
    # ch 128, 2 res blocks, encoder attention at 16 px, decoder none, 256 px -> 16x16x16).
    "kl16": KLVAEConfig(),
    # CPU tests / Fashion-MNIST scale: 28 px -> 7x7x4.
    "tiny": KLVAEConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                        encoder_attn_resolutions=(7,), resolution=28),
}


def preset(name: str, **overrides) -> KLVAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown KL-VAE preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


preset_config = preset   # the same, under a name that a ``preset`` argument does not shadow


class KLAutoencoder(nn.Module):
    """LDM AutoencoderKL: ``encode`` -> (mean, logvar), ``sample_latent``, ``decode``."""

    def __init__(self, config: KLVAEConfig | None = None):
        super().__init__()
        self.config = config = config or PRESETS["kl16"]
        self.encoder = Encoder(config.encoder_config())
        self.decoder = Decoder(config.decoder_config())
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,C,H,W) in [-1,1] -> posterior (mean, logvar), each (B, embed_dim, H/f, W/f);
        logvar clamped to [-30, 20]."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def sample_latent(mean: torch.Tensor, logvar: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + exp(logvar / 2) * noise, the noise drawn from ``generator`` when given."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(posterior || N(0, I)) per sample, summed over latent dims (LDM's ``kl()``)."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, embed_dim, h, w) (unscaled: divide MAR's latents by MAR_LATENT_SCALE first) ->
        images in [-1,1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None):
        """x -> (reconstruction, mean, logvar); decodes a posterior sample, or the mean."""
        mean, logvar = self.encode(x)
        z = self.sample_latent(mean, logvar, generator) if sample_posterior else mean
        return self.decode(z), mean, logvar


def kl_state_problems(model: KLAutoencoder, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Phrases naming missing, unexpected and mis-shaped keys of ``state`` (empty when exact)."""
    return key_problems(module_shapes(model), state)


def assign_kl_state(model: KLAutoencoder, state: Mapping[str, torch.Tensor],
                    what: str = "KL autoencoder state dict") -> KLAutoencoder:
    """Fill ``model`` from ``state`` (LDM AutoencoderKL key names, exact keys and shapes), or a
    ValueError naming ``what`` and every missing, unexpected or mis-shaped key."""
    problems = kl_state_problems(model, state)
    if problems:
        raise ValueError(f"{what} does not match the KL autoencoder: " + " | ".join(problems))
    load_exact(model, {k: v.float() for k, v in state.items()}, what)
    return model


def checkpoint_state_dict(obj, path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded KL-VAE checkpoint: MAR's ``{"model": sd}``, an LDM/Lightning
    ``{"state_dict": sd}`` or a bare state dict; ``loss.*`` keys (discriminator, LPIPS) dropped.
    ValueError naming ``path`` when it holds no state dict."""
    sd = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj:
                sd = obj[key]
                break
    if not isinstance(sd, dict):
        raise ValueError(f"KL-VAE checkpoint {path} holds {type(sd).__name__}, not a state dict "
                         f"(expected MAR's {{'model': state_dict}})")
    sd = {str(k): v for k, v in sd.items() if not str(k).startswith("loss.")}
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"KL-VAE checkpoint {path}: non-tensor entries {bad[:10]}")
    return sd


def load_kl_vae(path, preset: str = "kl16") -> KLAutoencoder:
    """MAR's released KL-VAE (``kl16.ckpt``) as an eval-mode ``KLAutoencoder`` on the CPU:
    ``encode(x) -> (mean, logvar)`` for x in [-1, 1] (NCHW), ``decode(z) -> images in [-1, 1]`` for
    unscaled z. Every key must match the preset's exactly, else a ValueError naming the file and
    the missing / unexpected / mis-shaped keys. Nothing is ever downloaded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"KL-VAE checkpoint not found: {path} (nothing is downloaded; "
                                f"place MAR's kl16.ckpt there yourself)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, corrupt, or pickled objects beyond plain tensors
        raise ValueError(f"KL-VAE checkpoint {path}: cannot read it as plain tensors ({type(e).__name__}: "
                         f"{str(e)[:200]}); Lightning files load through pipeline.kl_vae_loading") from e
    model = KLAutoencoder(preset_config(preset))
    assign_kl_state(model, checkpoint_state_dict(obj, path), f"KL-VAE checkpoint {path} (preset {preset!r})")
    return model.eval()
