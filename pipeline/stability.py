"""Stability stage (DiGIT Table 1): the pipeline's tokenizers under input noise -> one JSON.

Loads the configured encoder, the k-means centroids and the VQ checkpoint, takes the centre views
(view 0) of the first ``n_images`` images and measures both tokenizers with
:func:`pipeline.metrics.stability.stability_table` (the noise, metrics and seeding are defined
there). The JSON holds the rows, the text table and the provenance of every input.

Before measuring, the centroids are checked against their ``centroids.json`` (sha256, and the
encoder now loaded against the one their features came from) and the VQ file against the sha256
its ``.json`` records. Bare centroids without a ``.json`` (fitted in a test) are accepted: the
stage only measures, nothing is trained on its output.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .data import ViewSpec, centre_views
from .devices import resolve_device
from .io import file_sha256, write_json_atomic
from .metrics.stability import METRIC_DEFINITION, NOISE_DEFINITION, digit_tokenizer, stability_table, vq_tokenizer
from .metrics.stability_table import PAPER_TABLE1, SNRS_DB, format_table
from .provenance import load_checked_centroids, require_recorded_sha256
from .vq import load_configured_vq


def _images_info(tar_paths: Sequence, where: list[dict], spec: ViewSpec) -> dict:
    """Which images were measured: shards, first/last key and a hash of all keys."""
    keys_digest = hashlib.sha256("\n".join(f"{w['shard']}/{w['key']}" for w in where).encode()).hexdigest()
    return {"shards": [str(p) for p in tar_paths], "view": 0, "first_key": where[0]["key"],
            "last_key": where[-1]["key"], "keys_sha256": keys_digest, "crop": spec.crop, "resize": spec.resize}


def _digit_info(tokenizer, encoder, config: dict, encoder_path, centroids_path, spec: ViewSpec) -> dict:
    """Provenance of the discriminative tokenizer: encoder, its weights, centroids, preprocessing."""
    enc_ckpt = encoder_path or config["encoder"].get("checkpoint")
    return {**tokenizer.info, "encoder_arch": getattr(encoder.info, "arch", None),
            "encoder_layer": config["encoder"].get("layer"),
            "encoder_block_index": getattr(encoder.info, "block_index", None),
            "encoder_checkpoint": str(enc_ckpt) if enc_ckpt else None,
            "encoder_sha256": (file_sha256(enc_ckpt) if enc_ckpt and Path(enc_ckpt).is_file()
                               else getattr(encoder.info, "weights_sha256", None)),
            "centroids": str(centroids_path), "centroids_sha256": file_sha256(centroids_path),
            "preprocessing": {"image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std)}}


def _vq_info(tokenizer, vq_model, vq_meta: dict, vq_path) -> dict:
    """Provenance of the VQ tokenizer: checkpoint, its hash and config, test PSNR."""
    return {**tokenizer.info, "checkpoint": str(vq_path), "checkpoint_sha256": file_sha256(vq_path),
            "config": vq_model.config.to_dict(), "test_psnr": vq_meta.get("test_psnr")}


def stability_stage(config: dict, encoder_path: str | Path | None, centroids_path: str | Path,
                    vq_path: str | Path, tar_paths: Sequence[str | Path], out_json: str | Path,
                    n_images: int = 1000, *, seed: int = 0, snrs: Sequence[float] = SNRS_DB,
                    batch_size: int = 64, device: str | None = None, progress: bool = True) -> dict:
    """Load the configured encoder + centroids and the VQ checkpoint (checked, see the module
    docstring), compute the table on the centre views of the first `n_images` images of
    `tar_paths`, write `out_json` atomically.
    `device` None: the config's `encoder.device` ("auto": the GPU if there is one). fp32 throughout."""
    from .encoder_loading import load_configured_encoder

    t0 = time.time()
    spec = ViewSpec.from_config(config["encoder"])
    dev = resolve_device(device or config["encoder"].get("device", "auto"))
    encoder = load_configured_encoder(config, str(encoder_path) if encoder_path else None)
    centroids = load_checked_centroids(centroids_path, encoder, required=False)
    require_recorded_sha256(vq_path, "the VQ checkpoint was replaced or half-written; rerun the train-vq stage")
    vq_model, vq_meta, _ = load_configured_vq(config["vq"], vq_path)
    if vq_model.config.resolution != spec.crop:
        raise ValueError(f"VQ model resolution {vq_model.config.resolution} != view crop {spec.crop}")
    images, where = centre_views(tar_paths, spec, int(n_images))
    tokenizers = {"digit": digit_tokenizer(encoder, centroids, spec, device=dev),
                  "vq": vq_tokenizer(vq_model, device=dev)}
    with torch.no_grad():
        rows = stability_table(images, tokenizers, snrs=snrs, seed=seed, batch_size=batch_size, progress=progress)
    out = {
        "stage": "stability",
        "rows": rows,
        "table": format_table(rows),
        "snr_db": [float(s) for s in snrs],
        "seed": int(seed),
        "n_images": len(images),
        "n_images_requested": int(n_images),
        "images": _images_info(tar_paths, where, spec),
        "noise": NOISE_DEFINITION,
        "metrics": METRIC_DEFINITION,
        "tokenizers": {
            "digit": _digit_info(tokenizers["digit"], encoder, config, encoder_path, centroids_path, spec),
            "vq": _vq_info(tokenizers["vq"], vq_model, vq_meta, vq_path),
        },
        "paper_table1": {"snr_db": list(SNRS_DB), **PAPER_TABLE1},
        "device": str(dev),
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out_json, out)
    print(f"[stability] {len(images)} images, {len(snrs)} SNR levels -> {out_json} ({out['seconds']} s)\n"
          f"{out['table']}", file=sys.stderr)
    return out
