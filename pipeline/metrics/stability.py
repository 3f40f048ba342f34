"""Latent-space stability under input noise (DiGIT paper, Table 1): discriminative vs VQ tokens.

For every SNR level (default 30, 25, 20, 15, 10, 5, 1, 0.01 dB, the paper's columns) white
Gaussian noise is added to each image, both tokenizers tokenize the clean and the noisy image, and
two numbers are reported per tokenizer:

* **token change rate**: the fraction of token positions (over all images and all h x w grid
  positions) whose index differs between the clean and the noisy image;
* **cosine similarity**: the mean, over the same positions, of cos(e_clean, e_noisy) where e is the
  token's *embedding*, i.e. the quantized vector the index stands for: the k-means centroid for
  the discriminative (DiGIT) tokenizer, the codebook row for the VQ tokenizer. Where the index did
  not change the cosine is exactly 1 (it is set, not computed, so float error cannot push it past
  1); elsewhere it is computed in fp32 and clamped to [-1, 1]. It is a mean of per-position cosines
  (not the cosine of the flattened grids), so unchanged positions count 1 each and the value can
  in principle be negative (codebook rows pointing in opposite directions); it is not clamped at 0.

Noise definition (the paper states the SNR levels but neither the pixel space nor the signal
power; the official code release contains no script for this table, so this is our choice):

* Space: the pixels every tokenizer here starts from, uint8 mapped to [-1, 1] (x / 127.5 - 1), the
  VQGAN's input range. The *same* noisy image goes to both tokenizers: the VQ tokenizer takes it
  as is; the DiGIT tokenizer maps it back to [0, 255] and runs the pipeline's own encoder
  preprocessing (`data.encoder_input`: /255, bicubic resize to `image_size` without antialias,
  mean/std normalisation). So both tokenizers see the same perturbation of the same crop. (Where
  the encoder size differs from the crop, e.g. 256 -> 224 for DINOv2, the noisy crop is resized
  like the clean one, which low-passes the noise a little: that is what the encoder is given.)
  The signal power is not measured in each tokenizer's normalised space (ImageNet mean/std for
  DINOv2) because then the two tokenizers would get different noise for the same SNR.
* Signal power, per image: P_signal = mean of x^2 over its C x H x W values in [-1, 1].
  Noise: n = sigma * z, z ~ N(0, I), sigma = sqrt(P_signal / 10^(SNR/10)), i.e. the usual
  SNR_dB = 10 log10(P_signal / P_noise) with P_noise = sigma^2 (the measured SNR of the drawn noise
  is reported next to every row and matches the requested one to ~0.01 dB over a few hundred
  images).
* No clamping to [-1, 1] and no re-quantization to uint8: the noisy float image goes straight into
  the tokenizers (at 0.01 dB the noise is as strong as the signal, clamping would change its
  power and spectrum).
* Seeding: image i (its position in the evaluated set) gets one standard-normal field z_i drawn
  from a generator seeded by sha256("stability/{seed}/{i}"); every SNR level scales the same z_i
  (common random numbers: the columns differ only by the noise level, so the curves are smooth and
  the table does not depend on the batch size or on which SNRs are evaluated). Same seed, same
  images, same models -> identical table.

Pure functions, no files: `add_noise`, `image_noise`, `Tokenizer` with `digit_tokenizer` /
`vq_tokenizer`, `stability_table`, `format_table`. The stage that loads the pipeline's encoder,
centroids and VQ checkpoint and writes the JSON is `pipeline.stability.stability_stage`.
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .stability_table import LABELS, PAPER_TABLE1, SNRS_DB, format_table  # noqa: F401 (re-exported)

NOISE_DEFINITION = {
    "space": "pixels in [-1, 1] (uint8 / 127.5 - 1), the crop-sized view; the same noisy image goes to "
             "every tokenizer (DiGIT: mapped back to [0, 255], then the encoder preprocessing)",
    "signal_power": "per image: mean of x^2 over C*H*W in [-1, 1]",
    "noise": "x + sigma * z, z ~ N(0, I), sigma = sqrt(P_signal / 10^(snr_db / 10)); no clamping, no uint8 rounding",
    "seeding": "image i: z_i from torch.Generator seeded by sha256('stability/{seed}/{i}'); one z_i scaled for "
               "every SNR (common random numbers)",
}
METRIC_DEFINITION = {
    "change_rate": "fraction of (image, grid position) pairs whose token index differs from the clean image's",
    "cosine": "mean over (image, grid position) of cos(embedding(clean token), embedding(noisy token)); "
              "embedding = k-means centroid (DiGIT) / codebook row (VQ); 1 where the index is unchanged; "
              "clamped to [-1, 1], not at 0",
}


# ---------------------------------------------------------------------------------------- noise

def signal_power(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean square: (B, ...) -> (B,), in fp32 (fp64 accumulation)."""
    return x.reshape(len(x), -1).double().pow(2).mean(dim=1).float()


def noise_sigma(x: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Per-image noise std for the requested SNR: sqrt(P_signal / 10^(snr/10)), shape (B,)."""
    return (signal_power(x) / (10.0 ** (float(snr_db) / 10.0))).sqrt()


def _image_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"stability/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_noise(shape: Sequence[int], seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Standard-normal fields (len(indices), *shape), field j seeded by (seed, indices[j]) alone."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for j, i in enumerate(indices):
        g = torch.Generator().manual_seed(_image_seed(seed, int(i)))
        out[j] = torch.randn(tuple(shape), generator=g)
    return out


def add_noise(x: torch.Tensor, snr_db: float, generator: torch.Generator | None = None, *,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, ...) float -> x + sigma_b * z at the requested SNR per image (see module docstring).

    `noise` (standard normal, x's shape) is used when given, else drawn with `generator`.
    No clamping. Returns a new tensor.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"add_noise needs float pixels (e.g. in [-1, 1]), got {x.dtype}")
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != image shape {tuple(x.shape)}")
    sigma = noise_sigma(x, snr_db).to(device=x.device, dtype=x.dtype)
    return x + sigma.view(-1, *([1] * (x.dim() - 1))) * noise.to(device=x.device, dtype=x.dtype)


def measured_snr_db(x: torch.Tensor, noisy: torch.Tensor) -> float:
    """10 log10(sum of signal power / sum of noise power) over a batch (pooled over images)."""
    p_s = x.double().pow(2).sum()
    p_n = (noisy.double() - x.double()).pow(2).sum()
    return float(10.0 * torch.log10(p_s / p_n)) if p_n > 0 else math.inf


# ------------------------------------------------------------------------------------ tokenizers

@dataclass
class Tokenizer:
    """pixels float (B,3,H,W) in [-1, 1] -> (ids (B,h,w) long, embeddings (B,h,w,D) float32), on CPU."""

    name: str
    tokenize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    info: dict = field(default_factory=dict)


def digit_tokenizer(encoder: torch.nn.Module, centroids, spec, *, device: str | torch.device = "cpu",
                    name: str = "digit") -> Tokenizer:
    """Discriminative tokens exactly as the tokens stage makes them: `encoder_input`, the frozen
    encoder, fp16-rounded features, `nearest_centroid`. Embedding = the centroid vector."""
    from ..data import encoder_input
    from ..models.centroids import nearest_centroid

    dev = torch.device(device)
    encoder = encoder.to(dev).eval()
    c = torch.as_tensor(np.ascontiguousarray(np.asarray(centroids), dtype=np.float32)).to(dev)
    if c.ndim != 2:
        raise ValueError(f"centroids must be (K, D), got shape {tuple(c.shape)}")
    c_sqnorm = (c * c).sum(dim=1)
    h, w = encoder.grid
    c_cpu = c.cpu()

    @torch.no_grad()
    def tokenize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels255 = (x.to(dev, torch.float32) + 1.0) * 127.5  # fresh tensor: encoder_input divides in place
        feats = encoder(encoder_input(pixels255, spec)).float()
        if feats.shape[-1] != c.shape[1]:
            raise ValueError(f"encoder gives {feats.shape[-1]}-d features, centroids are {c.shape[1]}-d")
        ids = nearest_centroid(feats.half().float(), c, c_sqnorm).reshape(len(x), h, w).cpu()
        return ids, c_cpu[ids]

    return Tokenizer(name, tokenize, {"kind": "discriminative (encoder + k-means centroids)",
                                      "codebook_size": int(c.shape[0]), "embed_dim": int(c.shape[1]),
                                      "grid": [int(h), int(w)]})


def vq_tokenizer(vq_model: torch.nn.Module, *, device: str | torch.device = "cpu", name: str = "vq") -> Tokenizer:
    """VQ tokens from `VQGAN.encode` (input in [-1, 1]); embedding = the codebook row of the index."""
    dev = torch.device(device)
    vq_model = vq_model.to(dev).eval()

    @torch.no_grad()
    def tokenize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, ids = vq_model.encode(x.to(dev, torch.float32))
        ids = ids.cpu()
        return ids, vq_model.quantize.embedding.weight.detach().float().cpu()[ids]

    g = vq_model.grid_size
    return Tokenizer(name, tokenize, {"kind": "reconstructive VQ (VQGAN codebook)",
                                      "codebook_size": int(vq_model.codebook_size),
                                      "embed_dim": int(vq_model.quantize.embedding.weight.shape[1]),
                                      "grid": [int(g), int(g)]})


# ------------------------------------------------------------------------------------------ table

def _position_cosines(ids_a, emb_a, ids_b, emb_b) -> torch.Tensor:
    """Per-position cosine of two embedding grids, exactly 1 where the index did not change."""
    cos = F.cosine_similarity(emb_a.float(), emb_b.float(), dim=-1, eps=1e-12).clamp_(-1.0, 1.0)
    return torch.where(ids_a == ids_b, torch.ones_like(cos), cos)


@dataclass
class _Cell:
    """Running sums of one (tokenizer, SNR) cell of the table."""

    changed: float = 0.0
    cos_sum: float = 0.0
    positions: float = 0.0

    def add(self, name: str, clean: tuple, noisy: tuple) -> None:
        (ids0, emb0), (ids1, emb1) = clean, noisy
        if ids1.shape != ids0.shape:
            raise ValueError(f"{name}: token grid shape changed {tuple(ids0.shape)} -> {tuple(ids1.shape)}")
        self.changed += float((ids1 != ids0).sum())
        self.cos_sum += float(_position_cosines(ids0, emb0, ids1, emb1).double().sum())
        self.positions += ids0.numel()

    def row(self, name: str, snr: float, p_signal: float, p_noise: float, n: int) -> dict:
        m = self.positions
        return {"tokenizer": name, "snr_db": snr, "change_rate": self.changed / m, "cosine": self.cos_sum / m,
                "measured_snr_db": (10.0 * math.log10(p_signal / p_noise) if p_noise > 0 else math.inf),
                "positions": int(m), "images": n}


def _checked_inputs(images_uint8, tokenizers) -> tuple[torch.Tensor, list[Tokenizer]]:
    """The images as a uint8 (N, 3, H, W) tensor and the tokenizers as a list; ValueError if empty."""
    if isinstance(images_uint8, np.ndarray):
        images_uint8 = torch.from_numpy(images_uint8)
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if len(images_uint8) == 0:
        raise ValueError("stability_table: no images")
    toks = list(tokenizers.values()) if isinstance(tokenizers, Mapping) else list(tokenizers)
    if not toks:
        raise ValueError("stability_table: no tokenizers")
    return images_uint8, toks


def stability_table(images_uint8: torch.Tensor, tokenizers: Mapping[str, Tokenizer] | Sequence[Tokenizer],
                    snrs: Sequence[float] = SNRS_DB, seed: int = 0, batch_size: int = 64,
                    progress: bool = False) -> list[dict]:
    """Rows {tokenizer, snr_db, change_rate, cosine, measured_snr_db, positions, images}, one per
    (tokenizer, SNR), tokenizers in the given order, SNRs in the given order."""
    from tqdm import tqdm

    images_uint8, toks = _checked_inputs(images_uint8, tokenizers)
    n = len(images_uint8)
    snrs = [float(s) for s in snrs]
    cells = {(t.name, j): _Cell() for t in toks for j in range(len(snrs))}
    p_signal = 0.0
    p_noise = [0.0] * len(snrs)
    batch_size = max(1, int(batch_size))
    with tqdm(total=n * (len(snrs) + 1), desc="stability", unit="img", disable=not progress,
              file=sys.stderr, mininterval=2) as bar:
        for start in range(0, n, batch_size):
            x = images_uint8[start:start + batch_size].float().div(127.5).sub(1.0)
            b = len(x)
            z = image_noise(x.shape[1:], seed, range(start, start + b))
            p_signal += float(x.double().pow(2).sum())
            clean = {t.name: t.tokenize(x) for t in toks}
            bar.update(b)
            for j, snr in enumerate(snrs):
                noisy = add_noise(x, snr, noise=z)
                p_noise[j] += float((noisy.double() - x.double()).pow(2).sum())
                for t in toks:
                    cells[t.name, j].add(t.name, clean[t.name], t.tokenize(noisy))
                bar.update(b)
    return [cells[t.name, j].row(t.name, snr, p_signal, p_noise[j], n) for t in toks for j, snr in enumerate(snrs)]
