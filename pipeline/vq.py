"""VQ tokenizer stage: train the tiny VQGAN (or load a taming one) and tokenize shards with it.

`train_vq` trains `models.vqgan.VQGAN` on the crop-sized views of the training split (images decoded
once, a fresh seeded random crop + flip per epoch, the same crops the tokens stage uses), with an
L1/MSE reconstruction loss plus the codebook/commitment loss; no GAN or perceptual loss. The
codebook starts from encoder outputs of the first batch, and codes unused over the last
``reinit_every`` steps are re-initialised from recent encoder outputs (during the first 80% of
training): without this most codes die early and short CPU runs reconstruct poorly.
Reconstruction PSNR (uint8 pixels, data range 255) is measured on the test split's centre views.

`vq_tokenize_shard` turns one image shard into VQ token grids (N, V, h, w) for exactly the crops
listed in the DiGIT token shard's `.json`, so the two token streams are aligned view by view.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import ViewSpec, crop_view, cut_views, index_shard, load_resized_images, original_size, read_image, to_tensor
from .config import ConfigError
from .devices import resolve_device
from .errors import StageFailed
from .io import atomic_path, file_sha256, read_json, write_json_atomic
from .models.vqgan import VQGAN, VQGANConfig, preset
from .tokens import token_dtype, write_token_shard
from .train_steps import optimizer_step, shuffled_batches, warmup_cosine
from .vqgan_loading import read_taming_object, taming_model, taming_state_dict

FORMAT = "digit-vq-v1"
EPOCH_EVAL_IMAGES = 1000   # per-epoch PSNR on the first test images; the final figure uses all
DEFAULTS = {"preset": "tiny", "model": {}, "epochs": 2, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.0,
            "seed": 0, "max_images": 0, "max_test_images": 0, "loss": "l1", "reinit_dead_codes": True,
            "reinit_every": 50}


def to_model_pixels(views_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float in [-1, 1]."""
    return views_uint8.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8, rounded and clamped."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def encode_uint8(model: VQGAN, views_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N,3,H,W) -> token ids (N,h,w) long, on the CPU (the model may sit on a GPU)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.encode(to_model_pixels(views_uint8[s:s + batch_size].to(device)))[1].cpu()
           for s in range(0, len(views_uint8), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, model.grid_size, model.grid_size), dtype=torch.long)


@torch.no_grad()
def evaluate_vq(model: VQGAN, views_uint8: torch.Tensor, batch_size: int = 256) -> dict:
    """Mean per-image PSNR (uint8 pixels, data range 255) of encode->decode, and codebook usage."""
    model.eval()
    psnrs, counts = [], torch.zeros(model.codebook_size, dtype=torch.long)
    for s in range(0, len(views_uint8), batch_size):
        x = views_uint8[s:s + batch_size]
        _, ids = model.encode(to_model_pixels(x))
        rec = to_uint8(model.decode_indices(ids))
        mse = (rec.float() - x.float()).pow(2).flatten(1).mean(1)
        psnrs.append(10.0 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10)))
        counts += torch.bincount(ids.flatten(), minlength=model.codebook_size)
    psnr = torch.cat(psnrs)
    used = int((counts > 0).sum())
    p = counts.double() / max(1, int(counts.sum()))
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) if used else 0.0
    return {"psnr": round(float(psnr.mean()), 4), "psnr_median": round(float(psnr.median()), 4),
            "codes_used": used, "codebook_size": model.codebook_size,
            "codebook_usage": round(used / model.codebook_size, 4), "perplexity": round(perplexity, 2),
            "images": len(views_uint8)}


@torch.no_grad()
def _reinit_dead_codes(model: VQGAN, used: torch.Tensor, latents: torch.Tensor, gen: torch.Generator) -> int:
    """Replace codebook rows not in ``used`` (none selected since the last refresh) with random
    encoder outputs (+ small noise)."""
    dead = (~used).nonzero().flatten()
    if len(dead) == 0 or len(latents) == 0:
        return 0
    pick = torch.randint(0, len(latents), (len(dead),), generator=gen)
    w = model.quantize.embedding.weight
    w[dead] = latents[pick] + 1e-3 * latents.std() * torch.randn(len(dead), w.shape[1], generator=gen)
    return len(dead)


def _flat(z: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) latents -> (B*h*w, D), detached."""
    return z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def tokenizer_images(train_tars, test_tars, spec: ViewSpec, seed: int, cfg: dict):
    """What a tiny tokenizer (VQGAN, KL autoencoder) trains and is tested on: the resized training
    images (the first ``cfg["max_images"]``; 0 = all), their keys and original size (for the
    per-epoch random views), and the test split's centre views (the first ``max_test_images``)."""
    train_images, train_keys, _ = load_resized_images(train_tars, spec)
    test_images, test_keys, _ = load_resized_images(test_tars, spec)
    if cfg["max_images"] and len(train_images) > cfg["max_images"]:
        train_images, train_keys = train_images[:cfg["max_images"]], train_keys[:cfg["max_images"]]
    test_views = cut_views(test_images, test_keys, 0, seed, spec, original_size(test_tars))
    if cfg["max_test_images"]:
        test_views = test_views[:cfg["max_test_images"]]
    return train_images, train_keys, original_size(train_tars), test_views


def tokenizer_optimizer(model: torch.nn.Module, cfg: dict, n_images: int):
    """AdamW with a 3% warmup then cosine to 10% over every step of ``cfg["epochs"]``, and the
    reconstruction loss (``cfg["loss"]``: l1 or mse) of a tiny tokenizer; also the step count."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = max(1, int(cfg["epochs"]) * math.ceil(n_images / int(cfg["batch_size"])))
    return opt, warmup_cosine(opt, total, 0.03, floor=0.1), F.l1_loss if cfg["loss"] == "l1" else F.mse_loss, total


def train_vq(train_tars, test_tars, out_path: str | Path, spec: ViewSpec, vq_cfg: dict, *,
             progress: bool = True) -> dict:
    cfg_in = {**DEFAULTS, **(vq_cfg or {})}
    config = preset(cfg_in["preset"], **cfg_in.get("model", {}))
    if config.resolution != spec.crop:
        raise ValueError(f"VQGAN resolution {config.resolution} != view crop {spec.crop}")
    if cfg_in["loss"] not in ("l1", "mse"):
        raise ValueError(f"vq loss must be 'l1' or 'mse', got {cfg_in['loss']!r}")
    seed = int(cfg_in["seed"])
    torch.manual_seed(seed)
    t0 = time.time()
    train_images, train_keys, train_size, test_views = tokenizer_images(train_tars, test_tars, spec, seed, cfg_in)

    model = VQGAN(config)
    bs, epochs, n = int(cfg_in["batch_size"]), int(cfg_in["epochs"]), len(train_images)
    opt, sched, rec_loss, total = tokenizer_optimizer(model, cfg_in, n)
    gen = torch.Generator().manual_seed(seed)
    history = []
    reinit_every, global_step = int(cfg_in["reinit_every"]), 0
    used = torch.zeros(config.n_embed, dtype=torch.bool)
    for epoch in range(epochs):
        model.train()
        views = cut_views(train_images, train_keys, 1 + epoch, seed, spec, train_size)
        sums = {"rec": 0.0, "vq": 0.0}
        steps, reinit, codes_used = 0, 0, torch.zeros(config.n_embed, dtype=torch.bool)
        for _, batch in shuffled_batches(views, bs, gen, desc=f"vq epoch {epoch + 1}/{epochs}", progress=progress):
            x = to_model_pixels(batch)
            z = model._latent(x)
            if global_step == 0 and cfg_in["reinit_dead_codes"]:   # codebook from encoder outputs
                reinit += _reinit_dead_codes(model, used, _flat(z), gen)
            z_q, vq_loss, ids = model.quantize(z)
            recon = model._decode_latent(z_q)
            rl = rec_loss(recon, x)
            optimizer_step(model, opt, sched, rl + vq_loss)
            used[ids.unique()] = True
            codes_used[ids.unique()] = True
            sums["rec"] += rl.item()
            sums["vq"] += vq_loss.item()
            steps += 1
            global_step += 1
            if global_step % reinit_every == 0:
                if cfg_in["reinit_dead_codes"] and global_step < 0.8 * total:
                    reinit += _reinit_dead_codes(model, used, _flat(z), gen)
                used[:] = False
        ev = evaluate_vq(model, test_views[:EPOCH_EVAL_IMAGES])
        history.append({"epoch": epoch + 1, "rec_loss": round(sums["rec"] / max(1, steps), 5),
                        "vq_loss": round(sums["vq"] / max(1, steps), 5), "train_codes_used": int(codes_used.sum()),
                        "dead_codes_reinit": reinit, "test_psnr_first_1000": ev["psnr"],
                        "test_codes_used": ev["codes_used"], "seconds": round(time.time() - t0, 1)})
        print(f"[vq] epoch {epoch + 1}: rec {history[-1]['rec_loss']:.4f} vq {history[-1]['vq_loss']:.4f} "
              f"test PSNR {ev['psnr']:.2f} dB, codes used {ev['codes_used']}/{config.n_embed}", file=sys.stderr)
    final = evaluate_vq(model, test_views)
    meta = {"objective": f"{cfg_in['loss']} reconstruction + VQ (codebook/commitment) loss; no GAN/LPIPS",
            "test_psnr": final["psnr"], "test_eval": final, "history": history, "train_config": cfg_in,
            "train_images": n, "test_images": len(test_views), "grid": [model.grid_size, model.grid_size],
            "codebook_size": config.n_embed,
            "train_shards": [str(p) for p in train_tars], "test_shards": [str(p) for p in test_tars],
            "view_spec": spec.to_dict(), "seconds": round(time.time() - t0, 1)}
    save_vq(out_path, model, meta)
    print(f"[vq] test PSNR {final['psnr']:.2f} dB, codebook usage {final['codes_used']}/{config.n_embed} "
          f"-> {out_path}", file=sys.stderr)
    return meta


def save_vq(out_path: str | Path, model: VQGAN, meta: dict) -> None:
    out_path = Path(out_path)
    obj = {"format": FORMAT, "config": model.config.to_dict(),
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, "meta": meta}
    with atomic_path(out_path) as tmp:
        torch.save(obj, tmp)
    write_json_atomic(out_path.with_suffix(".json"),
                      {"format": FORMAT, "config": model.config.to_dict(), "sha256": file_sha256(out_path), **meta})


def load_vq(path: str | Path, config: VQGANConfig | None = None) -> tuple[VQGAN, dict]:
    """Load a `digit-vq-v1` checkpoint, or (given `config`, else the mage_vqgan preset) a taming one.
    No code from the file runs; a damaged or unusable file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ checkpoint not found: {path}")
    obj = read_taming_object(path)   # our files hold tensors and plain data; Lightning ones more
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        model = taming_model(taming_state_dict(obj, path), path, config)
        return model, {"format": "taming", "config": model.config.to_dict()}
    try:
        cfg = VQGANConfig(**obj["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: {FORMAT} checkpoint with an unusable config ({e})") from e
    if config is not None and config != cfg:
        raise ValueError(f"{path}: stored config {cfg} differs from the given {config}")
    model = VQGAN(cfg)
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: {FORMAT} weights do not fit its config ({e})") from e
    model.eval()
    return model, dict(obj.get("meta", {}))


def load_configured_vq(vq_section: dict, path: str | Path | None = None) -> tuple[VQGAN, dict, Path]:
    """The VQGAN a config's ``vq`` section asks for: the trained tiny one (``path``) or a local
    checkpoint (``vq.checkpoint``; taming files are built with the configured preset)."""
    path = path or vq_section.get("checkpoint")
    if not path:
        raise ValueError("config key 'vq.checkpoint' is null and no trained VQ file was given: point vq.checkpoint "
                         "at a local taming-format VQGAN (e.g. MAGE's vqgan_jax_strongaug.ckpt converted) or set "
                         "vq.train to train the tiny one")
    config = preset(vq_section.get("preset", "mage_vqgan"), **vq_section.get("model", {}))
    model, meta = load_vq(path, config)   # a digit-vq file must hold exactly this architecture
    return model, meta, Path(path)


def _first_mismatch(a: list, b: list) -> int:
    """The first index where two lists differ (the shorter length if one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def vq_tokenize_shard(tar_path: str | Path, token_json: str | Path, out_npy: str | Path, vq_model: VQGAN,
                      spec: ViewSpec, *, batch_size: int = 256, progress: bool = True,
                      vq_checkpoint: str | Path | None = None) -> dict:
    """VQ token grids (N, V, h, w) for exactly the crops recorded in a DiGIT token shard's `.json`."""
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
    g = vq_model.grid_size
    grids = np.zeros((n, v, g, g), dtype=token_dtype(vq_model.codebook_size))
    vq_model.eval()
    t0 = time.time()
    per = max(1, batch_size // max(1, v))
    for start in tqdm(range(0, n, per), desc=f"vq tokens {Path(tar_path).name}", disable=not progress,
                      file=sys.stderr, mininterval=2):
        idx = range(start, min(n, start + per))
        batch = []
        for i in idx:
            img = read_image(tar_path, samples[i])
            batch.extend(to_tensor(crop_view(img, tuple(int(c) for c in crops[i, j]), spec)) for j in range(v))
        ids = encode_uint8(vq_model, torch.stack(batch), batch_size=max(1, batch_size))
        grids[start:start + len(idx)] = ids.reshape(len(idx), v, g, g).numpy()
    meta = {"stage": "vq_tokens", "shape": list(grids.shape), "dtype": str(grids.dtype), "layout": "N,V,h,w",
            "keys": keys, "labels": [s.label for s in samples], "crops": tok["crops"], "views": int(v),
            "seed": tok.get("seed"), "codebook_size": vq_model.codebook_size, "grid": [g, g],
            "vq_config": vq_model.config.to_dict(),
            "vq_checkpoint": str(vq_checkpoint) if vq_checkpoint else None,
            "vq_checkpoint_sha256": file_sha256(vq_checkpoint) if vq_checkpoint else None,
            "digit_tokens": str(token_json), "shard": str(tar_path), "shard_sha256": file_sha256(tar_path),
            "preprocessing": {"resize": spec.resize, "crop": spec.crop, "pixels": "[-1, 1]"},
            "seconds": round(time.time() - t0, 3)}
    write_token_shard(out_npy, grids, meta)
    return meta


def train_vq_stage(config: dict, train_tars, test_tars, out_path: str | Path, *, progress: bool = True) -> dict:
    """The train-vq stage as the config describes it (``vq``); StageFailed below ``vq.train.min_test_psnr``."""
    vq = config["vq"]
    if vq["train"] is None:
        raise ConfigError("config key 'vq.train' is null: nothing to train (real runs use vq.checkpoint)")
    train_cfg = {k: v for k, v in vq["train"].items() if k not in ("max_shards", "min_test_psnr")}
    meta = train_vq(train_tars, test_tars, out_path, ViewSpec.from_config(config["encoder"]),
                    {"preset": vq["preset"], "model": vq["model"], **train_cfg}, progress=progress)
    floor = vq["train"]["min_test_psnr"]
    if floor is not None and meta["test_psnr"] < floor:
        raise StageFailed(f"VQ test PSNR {meta['test_psnr']:.2f} dB < vq.train.min_test_psnr {floor}")
    return meta


def vq_tokens_stage(config: dict, tar_path: str | Path, token_json: str | Path, out_npy: str | Path, *,
                    vq_path: str | None = None, progress: bool = True) -> dict:
    """The vq-tokens stage as the config describes it: the configured VQGAN on ``vq.device``."""
    model, _, path = load_configured_vq(config["vq"], vq_path)
    model.to(resolve_device(config["vq"]["device"]))
    return vq_tokenize_shard(tar_path, token_json, out_npy, model, ViewSpec.from_config(config["encoder"]),
                             batch_size=config["vq"]["batch_size"], progress=progress, vq_checkpoint=path)
