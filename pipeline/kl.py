"""KL tokenizer stage (MAR): train the tiny KL autoencoder (or load MAR's kl16) and store the
posterior moments of every view of a shard.

`train_kl` trains `models.kl_vae.KLAutoencoder` on the crop-sized views of the training split
(images decoded once, a fresh seeded random crop + flip per epoch, the same crops the tokens stage
uses). Objective, per training batch (no GAN or perceptual loss)::

    loss = rec(decode(mean + exp(logvar / 2) * eps), x) + kl_weight * KL

``rec`` is the L1 (or MSE) loss averaged over pixel elements (images in [-1, 1]) and ``KL`` is
KL(posterior || N(0, I)) averaged over latent elements (nats per latent dimension), both means over
the batch. Both terms are per element, so ``kl_weight`` does not depend on the image or latent size.
LDM (and so MAR's KL-16) sums both terms over their elements instead, with weight 1e-6; in our units
that balance is ``1e-6 * latent_elements / pixel_elements`` (x 1/48 for kl16 at 256 px, x 1/12 for
the tiny 28 px -> 7x7x4), i.e. ~1e-7: an almost free posterior. ``DEFAULTS`` uses 1e-4, still small:
on the demo settings PSNR is flat from 1e-6 to 1e-3 and first drops at 1e-2 (numbers at
``DEFAULTS``), so 1e-4 keeps a decade of margin below the largest flat value while the KL term
still shapes the latent (3.8 nats per dim vs 4.1 at 1e-6).

Test PSNR (uint8 pixels, data range 255) is measured on the test split's centre views from the
decoded posterior *mean* (``psnr``), and from a seeded posterior *sample* (``psnr_sampled``, what
MAR's cached training sees). ``latent_scale`` is LDM's scale-factor rule, 1 / std of the posterior
means over the training images' centre views; the generator models ``latent * latent_scale``. For
MAR's released kl16 it is the constant ``MAR_LATENT_SCALE`` (0.2325).

`kl_latents_shard` stores, for exactly the crops listed in a DiGIT token shard's `.json`, the
posterior mean and log-variance as one float16 array (N, V, h, w, 2C): channels [mean, logvar]
(MAR's cached ``moments``, channel-last), so the generator draws a fresh posterior sample per use.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import ConfigError
from .data import ViewSpec, crop_view, cut_views, index_shard, read_image, \
    resized_size, to_tensor
from .devices import resolve_device
from .errors import StageFailed
from .io import ForeignObject, atomic_path, file_sha256, load_torch, read_json, write_json_atomic
from .kl_vae_loading import kl_vae_state_dict
from .models.kl_vae import LOGVAR_RANGE, MAR_LATENT_SCALE, KLAutoencoder, KLVAEConfig, assign_kl_state, \
    preset as kl_preset
from .tokens import write_token_shard
from .train_steps import optimizer_step, shuffled_batches
from .vq import tokenizer_images, tokenizer_optimizer, to_model_pixels, to_uint8

FORMAT = "digit-kl-v1"
OFFICIAL_FORMAT = "mar-kl16"
EPOCH_EVAL_IMAGES = 1000   # per-epoch PSNR on the first test images; the final figure uses all
FP16_MAX = float(np.finfo(np.float16).max)
LAYOUT = "N,V,h,w,2C (posterior mean, log-variance)"
# kl_weight (per element, see the module docstring), measured on the demo settings (tiny with ch_mult
# (1, 1, 1), 4 channels, 8000 Fashion-MNIST images, 1 epoch = 250 steps of 32, L1, lr 2e-3; test PSNR
# of the mean / of a sample on 2000 test images, KL nats per dim, latent scale):
#   1e-6: 19.81 / 19.72 dB, 4.09, 0.403     1e-4: 19.84 / 19.75 dB, 3.77, 0.425
#   1e-3: 19.86 / 19.74 dB, 2.55, 0.557     1e-2: 19.71 / 19.40 dB, 1.09, 1.029
# (at 1e-4: 8 channels 19.85 / 19.77 dB; MSE loss 20.72 / 20.57 dB; lr 4e-3 19.72 dB; the tiny VQGAN 19.4 dB)
DEFAULTS = {"preset": "tiny", "model": {}, "epochs": 1, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.0,
            "seed": 0, "max_images": 0, "max_test_images": 0, "loss": "l1", "kl_weight": 1e-4}


def _config_dict(config: KLVAEConfig) -> dict:
    """The config as plain JSON data (lists, not tuples), as the sidecars hold it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}


# ---------------------------------------------------------------- encode / evaluate

@torch.no_grad()
def encode_moments(model: KLAutoencoder, views_uint8: torch.Tensor, batch_size: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N,3,H,W) -> posterior (mean, logvar), each float32 (N, C, h, w) on the CPU (the model
    may sit on a GPU); logvar clamped to LOGVAR_RANGE."""
    model.eval()
    device = next(model.parameters()).device
    means, logvars = [], []
    for s in range(0, len(views_uint8), batch_size):
        mean, logvar = model.encode(to_model_pixels(views_uint8[s:s + batch_size].to(device)))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().clamp(*LOGVAR_RANGE).cpu())
    if not means:
        g, c = model.grid_size, model.latent_channels
        return torch.zeros((0, c, g, g)), torch.zeros((0, c, g, g))
    return torch.cat(means), torch.cat(logvars)


def _psnr(rec_uint8: torch.Tensor, x_uint8: torch.Tensor) -> torch.Tensor:
    mse = (rec_uint8.float() - x_uint8.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_kl(model: KLAutoencoder, views_uint8: torch.Tensor, batch_size: int = 256, seed: int = 0) -> dict:
    """Mean per-image PSNR (uint8 pixels, data range 255) of encode -> decode from the posterior mean
    (``psnr``) and from one seeded posterior sample (``psnr_sampled``), and the posterior's statistics."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    psnr, psnr_s, kls, logvars = [], [], [], []
    for s in range(0, len(views_uint8), batch_size):
        x = views_uint8[s:s + batch_size]
        mean, logvar = model.encode(to_model_pixels(x.to(device)))
        noise = torch.randn(mean.shape, generator=gen).to(device)
        psnr.append(_psnr(to_uint8(model.decode(mean)).cpu(), x))
        psnr_s.append(_psnr(to_uint8(model.decode(mean + torch.exp(0.5 * logvar) * noise)).cpu(), x))
        kls.append((model.kl(mean, logvar) / mean[0].numel()).cpu())
        logvars.append(logvar.mean(dim=(1, 2, 3)).cpu())
    psnr, psnr_s = torch.cat(psnr), torch.cat(psnr_s)
    return {"psnr": round(float(psnr.mean()), 4), "psnr_median": round(float(psnr.median()), 4),
            "psnr_sampled": round(float(psnr_s.mean()), 4),
            "kl_per_dim": round(float(torch.cat(kls).mean()), 5),
            "logvar_mean": round(float(torch.cat(logvars).mean()), 4), "images": len(views_uint8)}


@torch.no_grad()
def latent_statistics(model: KLAutoencoder, views_uint8: torch.Tensor, batch_size: int = 256) -> dict:
    """Mean and std of the posterior means over all elements of ``views_uint8``'s latents (LDM's
    scale-factor rule: latent_scale = 1 / std), and the per-channel std."""
    c = model.latent_channels
    n, total, sq = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for s in range(0, len(views_uint8), batch_size):
        mean, _ = encode_moments(model, views_uint8[s:s + batch_size], batch_size)
        m = mean.double().transpose(0, 1).flatten(1)   # (C, B*h*w)
        total, sq, n = total + m.sum(1), sq + m.pow(2).sum(1), n + m.shape[1]
    if not n:
        raise ValueError("no views to measure the latent scale on")
    var_c = (sq / n - (total / n).pow(2)).clamp_min(0.0)
    mu = float(total.sum()) / (n * c)
    std = math.sqrt(max(float(sq.sum()) / (n * c) - mu ** 2, 0.0))   # over every element (the flat latents)
    if not std > 0:
        raise ValueError("the posterior means have zero spread: no latent scale")
    return {"latent_scale": round(1.0 / std, 6), "mean": round(mu, 6), "std": round(std, 6),
            "channel_std": [round(float(v), 6) for v in var_c.sqrt()], "images": len(views_uint8),
            "rule": "1 / std of the posterior means over the training images' centre views (LDM scale factor)"}


# ---------------------------------------------------------------- train

def train_kl(train_tars, test_tars, out_path: str | Path, spec: ViewSpec, kl_cfg: dict, *,
             progress: bool = True) -> dict:
    """Train the configured KL autoencoder on crop-sized views; write it with `save_kl`; its metadata."""
    cfg_in = {**DEFAULTS, **(kl_cfg or {})}
    config = kl_preset(cfg_in["preset"], **cfg_in.get("model", {}))
    if config.resolution != spec.crop:
        raise ValueError(f"KL autoencoder resolution {config.resolution} != view crop {spec.crop}")
    if cfg_in["loss"] not in ("l1", "mse"):
        raise ValueError(f"kl loss must be 'l1' or 'mse', got {cfg_in['loss']!r}")
    kl_weight = float(cfg_in["kl_weight"])
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    seed = int(cfg_in["seed"])
    torch.manual_seed(seed)
    t0 = time.time()
    train_images, train_keys, train_size, test_views = tokenizer_images(train_tars, test_tars, spec, seed, cfg_in)

    model = KLAutoencoder(config)
    bs, epochs, n = int(cfg_in["batch_size"]), int(cfg_in["epochs"]), len(train_images)
    opt, sched, rec_loss, _ = tokenizer_optimizer(model, cfg_in, n)
    gen = torch.Generator().manual_seed(seed)   # batch order and posterior noise
    history = []
    for epoch in range(epochs):
        model.train()
        views = cut_views(train_images, train_keys, 1 + epoch, seed, spec, train_size)
        sums, steps = {"rec": 0.0, "kl": 0.0}, 0
        for _, batch in shuffled_batches(views, bs, gen, desc=f"kl epoch {epoch + 1}/{epochs}", progress=progress):
            x = to_model_pixels(batch)
            mean, logvar = model.encode(x)
            recon = model.decode(model.sample_latent(mean, logvar, gen))
            rl = rec_loss(recon, x)
            kl = model.kl(mean, logvar).mean() / mean[0].numel()   # nats per latent element
            optimizer_step(model, opt, sched, rl + kl_weight * kl)
            sums["rec"] += rl.item()
            sums["kl"] += kl.item()
            steps += 1
        ev = evaluate_kl(model, test_views[:EPOCH_EVAL_IMAGES], seed=seed)
        history.append({"epoch": epoch + 1, "rec_loss": round(sums["rec"] / max(1, steps), 5),
                        "kl_per_dim": round(sums["kl"] / max(1, steps), 5), "steps": steps,
                        "test_psnr_first_1000": ev["psnr"], "test_psnr_sampled_first_1000": ev["psnr_sampled"],
                        "test_logvar_mean": ev["logvar_mean"], "seconds": round(time.time() - t0, 1)})
        print(f"[kl] epoch {epoch + 1}: rec {history[-1]['rec_loss']:.4f} kl/dim {history[-1]['kl_per_dim']:.3f} "
              f"test PSNR {ev['psnr']:.2f} dB (sampled {ev['psnr_sampled']:.2f} dB)", file=sys.stderr)
    final = evaluate_kl(model, test_views, seed=seed)
    stats = latent_statistics(model, cut_views(train_images, train_keys, 0, seed, spec, train_size))
    meta = {"objective": f"{cfg_in['loss']} reconstruction of a posterior sample (mean over pixel elements) + "
                         f"kl_weight {kl_weight:g} x KL(posterior || N(0, I)) (mean over latent elements); "
                         f"no GAN/LPIPS",
            "test_psnr": final["psnr"], "test_psnr_sampled": final["psnr_sampled"], "test_eval": final,
            "history": history, "train_config": cfg_in, "train_images": n, "test_images": len(test_views),
            "grid": [model.grid_size, model.grid_size], "channels": model.latent_channels,
            "latent_scale": stats["latent_scale"], "latent_stats": stats,
            "train_shards": [str(p) for p in train_tars], "test_shards": [str(p) for p in test_tars],
            "view_spec": spec.to_dict(), "seconds": round(time.time() - t0, 1)}
    save_kl(out_path, model, meta)
    print(f"[kl] test PSNR {final['psnr']:.2f} dB (sampled {final['psnr_sampled']:.2f} dB), "
          f"{model.latent_channels} channels x {model.grid_size}x{model.grid_size}, latent scale "
          f"{stats['latent_scale']:.4f} -> {out_path}", file=sys.stderr)
    return meta


# ---------------------------------------------------------------- files

def save_kl(out_path: str | Path, model: KLAutoencoder, meta: dict) -> None:
    """``{"format": "digit-kl-v1", "config", "state_dict", "meta"}`` and a `.json` sidecar (format,
    config, sha256 and the metadata), both written atomically."""
    out_path = Path(out_path)
    obj = {"format": FORMAT, "config": _config_dict(model.config),
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, "meta": meta}
    with atomic_path(out_path) as tmp:
        torch.save(obj, tmp)
    write_json_atomic(out_path.with_suffix(".json"),
                      {"format": FORMAT, "config": _config_dict(model.config), "sha256": file_sha256(out_path), **meta})


def load_kl(path: str | Path, preset: str = "kl16", *, config: KLVAEConfig | None = None
            ) -> tuple[KLAutoencoder, dict]:
    """(model in eval mode on the CPU, metadata) from a `digit-kl-v1` file, or from MAR's official
    checkpoint (``{"model": state_dict}``, LDM names; built as ``config``, else the ``preset``; its
    metadata ``{"format": "mar-kl16", "latent_scale": 0.2325}``). Given ``config``, a `digit-kl-v1`
    file must hold exactly that architecture. No code from the file runs; a damaged or unusable file
    is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KL checkpoint not found: {path} (nothing is downloaded; place MAR's kl16.ckpt "
                                f"or a trained {FORMAT} file there)")
    obj = load_torch(path, foreign_objects=True)   # corrupt / truncated: ValueError naming the file
    plain = isinstance(obj, dict) and not isinstance(obj, ForeignObject)
    if plain and "format" in obj and obj["format"] != FORMAT:
        raise ValueError(f"{path}: a {obj['format']!r} file, not a KL autoencoder ({FORMAT} or MAR's "
                         f"{{'model': state_dict}})")
    if not (plain and obj.get("format") == FORMAT):
        cfg = config if config is not None else kl_preset(preset)
        model = KLAutoencoder(cfg)
        assign_kl_state(model, kl_vae_state_dict(obj, path), f"KL-VAE checkpoint {path} (architecture {cfg})")
        return model.eval(), {"format": OFFICIAL_FORMAT, "latent_scale": MAR_LATENT_SCALE, "config": _config_dict(cfg)}
    try:
        cfg = KLVAEConfig(**obj["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {FORMAT} checkpoint with an unusable config ({e})") from e
    if config is not None and config != cfg:
        raise ValueError(f"{path}: stored config {cfg} differs from the configured {config}")
    model = KLAutoencoder(cfg)
    state = obj.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: {FORMAT} checkpoint without a state_dict")
    try:
        assign_kl_state(model, state, f"{path}: {FORMAT} weights")
    except (RuntimeError, AttributeError) as e:
        raise ValueError(f"{path}: {FORMAT} weights do not fit its config ({e})") from e
    meta = dict(obj.get("meta") or {})
    if not isinstance(meta.get("latent_scale"), (int, float)):
        raise ValueError(f"{path}: {FORMAT} checkpoint without a latent_scale in its metadata")
    return model.eval(), meta


def load_configured_kl(kl_section: dict, path: str | Path | None = None) -> tuple[KLAutoencoder, dict, Path]:
    """The KL autoencoder a config's ``kl`` section asks for: the trained tiny one (``path``) or a
    local checkpoint (``kl.checkpoint``), built as ``kl.preset`` + ``kl.model``."""
    path = path or kl_section.get("checkpoint")
    if not path:
        raise ValueError("config key 'kl.checkpoint' is null and no trained KL file was given: point kl.checkpoint "
                         "at MAR's kl16.ckpt (local file; nothing is downloaded) or set kl.train to train the "
                         "tiny one")
    config = kl_preset(kl_section.get("preset", "kl16"), **(kl_section.get("model") or {}))
    model, meta = load_kl(path, config=config)   # a digit-kl file must hold exactly this architecture
    return model, meta, Path(path)


# ---------------------------------------------------------------- latents of a shard

def _first_mismatch(a: list, b: list) -> int:
    """The first index where two lists differ (the shorter length if one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _check_crop(token_json, key: str, view: int, params: tuple[int, int, int], img_size, spec: ViewSpec) -> None:
    rw, rh = resized_size(img_size[0], img_size[1], spec.resize)
    left, top, flip = params
    if not (0 <= left <= rw - spec.crop and 0 <= top <= rh - spec.crop and flip in (0, 1)):
        raise ValueError(f"{token_json}: crop {list(params)} of key {key} view {view} does not fit a "
                         f"{spec.crop}-px crop of the {rw}x{rh} resized image (left, top, flip)")


def kl_latents_shard(tar_path: str | Path, token_json: str | Path, out_npy: str | Path, model: KLAutoencoder,
                     spec: ViewSpec, *, latent_scale: float, batch_size: int = 256, progress: bool = True,
                     kl_checkpoint: str | Path | None = None) -> dict:
    """Posterior moments (N, V, h, w, 2C) float16 — channels [mean, logvar], unscaled — for exactly the
    crops recorded in a DiGIT token shard's `.json`; ``latent_scale`` goes into the sidecar."""
    tok = read_json(token_json)
    samples = index_shard(tar_path)
    keys = [s.key for s in samples]
    if keys != list(tok["keys"]):
        raise ValueError(f"{tar_path}: shard keys do not match {token_json} "
                         f"({len(keys)} vs {len(tok['keys'])} keys, first mismatch at "
                         f"{_first_mismatch(keys, tok['keys'])})")
    crops = np.asarray(tok["crops"], dtype=np.int64)
    if crops.ndim != 3 or crops.shape[0] != len(keys) or crops.shape[2] != 3:
        raise ValueError(f"{token_json}: crops have shape {crops.shape}, expected ({len(keys)}, V, 3)")
    n, v = crops.shape[:2]
    g, c = model.grid_size, model.latent_channels
    moments = np.zeros((n, v, g, g, 2 * c), dtype=np.float16)
    model.eval()
    t0 = time.time()
    per = max(1, batch_size // max(1, v))
    for start in tqdm(range(0, n, per), desc=f"kl latents {Path(tar_path).name}", disable=not progress,
                      file=sys.stderr, mininterval=2):
        idx = range(start, min(n, start + per))
        batch = []
        for i in idx:
            img = read_image(tar_path, samples[i])
            for j in range(v):
                params = tuple(int(p) for p in crops[i, j])
                _check_crop(token_json, keys[i], j, params, img.size, spec)
                batch.append(to_tensor(crop_view(img, params, spec)))
        mean, logvar = encode_moments(model, torch.stack(batch), batch_size=max(1, batch_size))
        if not torch.isfinite(mean.half()).all():
            raise ValueError(f"{tar_path}: posterior means of images {start}..{idx[-1]} overflow float16 "
                             f"(|mean| up to {float(mean.abs().max()):.4g} > {FP16_MAX:g}): the KL checkpoint "
                             f"does not fit this data")
        both = torch.cat([mean, logvar.clamp(*LOGVAR_RANGE)], dim=1).permute(0, 2, 3, 1)   # (B, h, w, 2C)
        moments[start:start + len(idx)] = both.reshape(len(idx), v, g, g, 2 * c).half().numpy()
    meta = {"stage": "kl_latents", "shape": list(moments.shape), "dtype": str(moments.dtype), "layout": LAYOUT,
            "keys": keys, "labels": [s.label for s in samples], "crops": tok["crops"], "views": int(v),
            "seed": tok.get("seed"), "grid": [g, g], "channels": c, "codebook_size": None,
            "latent_scale": float(latent_scale), "logvar_range": list(LOGVAR_RANGE),
            "scaling": "the generator models (mean + exp(logvar / 2) * noise) * latent_scale; decode latent / "
                       "latent_scale",
            "kl_config": _config_dict(model.config),
            "kl_checkpoint": str(kl_checkpoint) if kl_checkpoint else None,
            "kl_checkpoint_sha256": file_sha256(kl_checkpoint) if kl_checkpoint else None,
            "digit_tokens": str(token_json), "shard": str(tar_path), "shard_sha256": file_sha256(tar_path),
            "preprocessing": {"resize": spec.resize, "crop": spec.crop, "pixels": "[-1, 1]"},
            "seconds": round(time.time() - t0, 3)}
    write_token_shard(out_npy, moments, meta)
    return meta


@torch.no_grad()
def decode_latents(model: KLAutoencoder, latents, *, batch_size: int = 64, device="cpu") -> np.ndarray:
    """Unscaled latents (n, h, w, C), or (n, h*w, C) in raster order -> uint8 images (n, H, W, 3) through
    the KL decoder, which runs on ``device`` (the model must already be there, as `render`'s VQ decode).
    Divide a generator's latents by the latent scale first."""
    z = torch.as_tensor(np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents).float()
    g, c = model.grid_size, model.latent_channels
    if z.ndim == 3 and z.shape[1:] == (g * g, c):
        z = z.reshape(len(z), g, g, c)
    if z.ndim != 4 or z.shape[1:] != (g, g, c):
        raise ValueError(f"latents of shape {tuple(z.shape)}: expected (n, {g}, {g}, {c}) or (n, {g * g}, {c}) "
                         f"for this KL decoder")
    model.eval()
    device = torch.device(device)
    out = []
    for s in range(0, len(z), batch_size):
        x = model.decode(z[s:s + batch_size].permute(0, 3, 1, 2).contiguous().to(device))
        out.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
    r = model.config.resolution
    return np.concatenate(out) if out else np.zeros((0, r, r, 3), np.uint8)


# ---------------------------------------------------------------- stages

def train_kl_stage(config: dict, train_tars, test_tars, out_path: str | Path, *, progress: bool = True) -> dict:
    """The train-kl stage as the config describes it (``kl``); StageFailed below ``kl.train.min_test_psnr``."""
    kl = config["kl"]
    if kl.get("train") is None:
        raise ConfigError("config key 'kl.train' is null: nothing to train (real runs use kl.checkpoint)")
    train_cfg = {k: v for k, v in kl["train"].items() if k not in ("max_shards", "min_test_psnr")}
    meta = train_kl(train_tars, test_tars, out_path, ViewSpec.from_config(config["encoder"]),
                    {"preset": kl["preset"], "model": kl.get("model") or {}, **train_cfg}, progress=progress)
    floor = kl["train"].get("min_test_psnr")
    if floor is not None and meta["test_psnr"] < floor:
        raise StageFailed(f"KL test PSNR {meta['test_psnr']:.2f} dB < kl.train.min_test_psnr {floor}")
    return meta


def kl_latents_stage(config: dict, tar_path: str | Path, token_json: str | Path, out_npy: str | Path, *,
                     kl_path: str | None = None, progress: bool = True) -> dict:
    """The kl-latents stage as the config describes it: the configured KL autoencoder on ``kl.device``."""
    model, meta, path = load_configured_kl(config["kl"], kl_path)
    model.to(resolve_device(config["kl"]["device"]))
    return kl_latents_shard(tar_path, token_json, out_npy, model, ViewSpec.from_config(config["encoder"]),
                            latent_scale=meta["latent_scale"], batch_size=config["kl"]["batch_size"],
                            progress=progress, kl_checkpoint=path)
