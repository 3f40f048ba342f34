"""Tokens stage: one shard -> token grids (N, V, h, w) uint16, one per augmented view.

Fused encode-and-assign: each view is encoded and assigned to its nearest centroid in the same
pass, so no features are stored (at ImageNet scale they would take ~500 GB in fp16; only the
k-means sample shards keep features). View 0 is the centre crop, views >= 1 seeded random crops
with random flips (replacing DiGIT's on-the-fly augmentation); the crop of every view is stored,
so other stages (VQ tokens) can cut exactly the same pixels.

Outputs, per shard: `{split}-{i:06d}.npy` (the grids, memory-mappable) and `{split}-{i:06d}.json`
(keys and labels in shard order, crop parameters, provenance).

Provenance: the stage refuses centroids whose sha256 differs from what `centroids.json` records,
centroids without a `centroids.json`, and an encoder other than the one the centroids' features
came from (`provenance.require_same_encoder`). `tokenize_shard`, the low-level function, takes
centroids as an array and checks nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import ShardViews, ViewSpec
from .devices import resolve_device
from .encoder_loading import load_configured_encoder
from .models.centroids import nearest_centroid
from .models.patch_encoder import encoder_info
from .io import file_sha256, write_json_atomic, write_npy_atomic
from .provenance import load_checked_centroids
from .shard_encoding import encode_shard_views


def token_dtype(k: int):
    return np.uint16 if k <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_shard(tar_path: str | Path, out_npy: str | Path, encoder, centroids: np.ndarray, spec: ViewSpec, *,
                   views: int = 1, seed: int = 0, batch_size: int = 256, num_workers: int = 0, device: str = "auto",
                   precision: str = "auto", progress: bool = True, provenance: dict | None = None) -> dict:
    dev = resolve_device(device)
    dataset = ShardViews([tar_path], spec, views=range(views), seed=seed)
    n, (h, w) = len(dataset), encoder.grid
    k = centroids.shape[0]
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(dev)
    c_sqnorm = (c * c).sum(dim=1)
    grids = np.zeros((n, views, h, w), dtype=token_dtype(k))
    crops = np.zeros((n, views, 3), dtype=np.int32)
    t0 = time.time()
    for indices, v, feats, params in encode_shard_views(encoder, dataset, spec, batch_size=batch_size,
                                                        num_workers=num_workers, device=dev, precision=precision,
                                                        progress=progress, desc=f"tokens {Path(tar_path).name}"):
        # Round to fp16 first: the k-means features are stored in fp16, so the centre view gets
        # exactly the token that assigning the stored features would give.
        ids = nearest_centroid(feats.half().float(), c, c_sqnorm)
        idx = indices.numpy()
        grids[idx, v] = ids.reshape(len(idx), h, w).cpu().numpy()
        crops[idx] = params.numpy()
    meta = {
        "stage": "tokens", "shape": list(grids.shape), "dtype": str(grids.dtype), "layout": "N,V,h,w",
        "keys": dataset.keys, "labels": dataset.labels, "crops": crops.tolist(),
        "crop_params": "per view: left, top, hflip in the image resized to `resize` (shorter side)",
        "views": views, "seed": seed, "codebook_size": int(k), "grid": [h, w],
        "shard": str(tar_path), "shard_sha256": file_sha256(tar_path),
        "preprocessing": spec.to_dict(),
        "device": str(dev), "seconds": round(time.time() - t0, 3), **(provenance or {}),
    }
    write_token_shard(out_npy, grids, meta)
    return meta


def write_token_shard(out_npy: str | Path, grids: np.ndarray, meta: dict) -> Path:
    """Write token grids (N, V, h, w) to `out_npy` and `meta` next to it (`.json`), both atomically.

    `meta` names the stage (`stage`), the image shard (`shard`) and the time taken (`seconds`), for
    the one log line.
    """
    out_npy = Path(out_npy)
    write_npy_atomic(out_npy, grids)
    write_json_atomic(out_npy.with_suffix(".json"), meta)
    n, views = grids.shape[:2]
    stage = meta["stage"].replace("_", " ")
    print(f"[{stage}] {Path(meta['shard']).name}: {n} images x {views} views -> {out_npy} ({meta['seconds']} s)",
          file=sys.stderr)
    return out_npy


def load_tokens(npy_path: str | Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    import json
    grids = np.load(npy_path, mmap_mode="r" if mmap else None)
    meta = json.loads(Path(npy_path).with_suffix(".json").read_text())
    return grids, meta


def tokens_stage(config: dict, tar_path: str | Path, centroids_path: str | Path, out_npy: str | Path, *,
                 encoder_path: str | None = None, progress: bool = True) -> dict:
    """The tokens stage as the config describes it: the configured encoder, the centroids checked
    against their centroids.json (required here; `tokenize_shard` takes bare centroids) and the
    encoder, provenance of both in the sidecar."""
    enc, tok = config["encoder"], config["tokens"]
    encoder = load_configured_encoder(config, encoder_path)
    centroids = load_checked_centroids(centroids_path, encoder)
    provenance = {"encoder": encoder_info(encoder), "centroids": str(centroids_path),
                  "centroids_sha256": file_sha256(centroids_path)}
    return tokenize_shard(tar_path, out_npy, encoder, centroids, ViewSpec.from_config(enc), views=tok["views"],
                          seed=tok["seed"], batch_size=enc["batch_size"], num_workers=enc["num_workers"],
                          device=enc["device"], precision=enc["precision"], progress=progress, provenance=provenance)
