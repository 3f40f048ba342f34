"""Features stage: one shard -> a Zarr v3 array (N, T, D) float16 of encoder patch features.

Only the shards that feed k-means need features (`kmeans.shards`); the tokens stage encodes and
assigns in one pass and never stores features, so ImageNet does not need ~500 GB of them.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zarr

from .data import ShardViews, ViewSpec
from .devices import resolve_device
from .encoder_loading import load_configured_encoder
from .models.patch_encoder import encoder_info
from .io import atomic_path, file_sha256
from .shard_encoding import encode_shard_views


def extract_features(tar_path: str | Path, out_path: str | Path, encoder, spec: ViewSpec, *, batch_size: int = 256,
                     num_workers: int = 0, device: str = "auto", precision: str = "auto", chunk: int = 64,
                     progress: bool = True, encoder_meta: dict | None = None, view: int = 0, seed: int = 0) -> dict:
    """Encode one view of every image of one shard into `out_path` (atomically).

    view 0 is the centre crop; view >= 1 a seeded random crop + flip (DiGIT's k-means features
    came from random crops), the same view function the tokens stage uses.
    """
    dev = resolve_device(device)
    dataset = ShardViews([tar_path], spec, views=(view,), seed=seed)
    n, grid = len(dataset), encoder.grid
    t0 = time.time()
    attrs = {
        "stage": "features",
        "shard": str(tar_path), "shard_sha256": file_sha256(tar_path),
        "keys": dataset.keys, "labels": dataset.labels,
        "encoder": encoder_meta or {}, "grid": list(grid),
        "view": view, "view_seed": seed,
        "preprocessing": {"resize_shorter_bicubic": spec.resize, "crop": spec.crop,
                          "to_image_size_bicubic_no_antialias": spec.image_size,
                          "mean": list(spec.mean), "std": list(spec.std)},
        "dtype": "float16", "device": str(dev), "precision": precision,
    }
    with atomic_path(out_path) as tmp, ThreadPoolExecutor(max_workers=1) as writer:
        # Uncompressed: fp16 features barely compress, and zstd capped a GPU run at ~250 img/s.
        arr = zarr.create_array(store=str(tmp), shape=(n, grid[0] * grid[1], encoder.embed_dim),
                                chunks=(max(1, min(chunk, n)), grid[0] * grid[1], encoder.embed_dim),
                                dtype="float16", fill_value=0, compressors=None)
        pending = None
        for indices, _, feats, _ in encode_shard_views(encoder, dataset, spec, batch_size=batch_size,
                                                      num_workers=num_workers, device=dev, precision=precision,
                                                      progress=progress, desc=f"features {Path(tar_path).name}"):
            block = feats.half().cpu().numpy()
            if pending is not None:
                pending.result()  # at most one write in flight, overlapping the next batch's compute
            pending = writer.submit(arr.__setitem__, slice(int(indices[0]), int(indices[-1]) + 1), block)
        if pending is not None:
            pending.result()
        attrs["seconds"] = round(time.time() - t0, 3)
        arr.attrs.update(attrs)
    print(f"[features] {Path(tar_path).name}: {n} images -> {out_path} ({attrs['seconds']} s)", file=sys.stderr)
    return attrs


def features_stage(config: dict, tar_path: str | Path, out_path: str | Path, *, encoder_path: str | None = None,
                   progress: bool = True) -> dict:
    """The features stage as the config describes it (the view and seed of ``kmeans``)."""
    enc = config["encoder"]
    encoder = load_configured_encoder(config, encoder_path)
    return extract_features(tar_path, out_path, encoder, ViewSpec.from_config(enc), batch_size=enc["batch_size"],
                            num_workers=enc["num_workers"], device=enc["device"], precision=enc["precision"],
                            progress=progress, encoder_meta=encoder_info(encoder),
                            view=config["kmeans"]["feature_view"], seed=config["kmeans"]["seed"])
