"""FID statistics files, the cached reference statistics and one-call FID / precision-recall / IS.

These glue :mod:`pipeline.image_files` (what the images are), :mod:`pipeline.feature_network` (the
Inception that embeds them) and :mod:`pipeline.metrics.fid` (the maths). A statistics file is an
.npz with ``mu`` and ``sigma`` (ours also hold ``n`` and ``network_id``; ADM's reference batches
such as ``VIRTUAL_imagenet256_labeled.npz`` are read as well).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .feature_network import DEFAULT_NETWORK, FeatureNet, load_feature_network
from .image_files import is_stats_npz
from .io import atomic_path, file_sha256, read_json, write_json_atomic
from .metrics.fid import (activation_statistics, centred_factor, frechet_distance_stats, inception_score,
                          precision_recall)


# ================================================================ statistics files

def save_stats(path: str | Path, mu, sigma, n: int, network_id: str) -> None:
    """Write mu, sigma (float64), n and network_id to an .npz, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                     n=np.int64(n), network_id=np.array(network_id))


def load_stats(path: str | Path) -> dict:
    """A statistics .npz (ours, or any with ``mu``/``sigma`` such as ADM's reference batches)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise ValueError(f"{path}: not a statistics file (no mu/sigma among {z.files})")
            out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64),
                   "n": int(z["n"]) if "n" in z.files else None,
                   "network_id": str(z["network_id"]) if "network_id" in z.files else None}
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read statistics ({e})") from e
    if out["mu"].ndim != 1 or out["sigma"].shape != (out["mu"].size,) * 2:
        raise ValueError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape} do not match")
    return out


def _is_stats_file(source) -> bool:
    """True when ``source`` names a statistics .npz (not images, not an array)."""
    return not isinstance(source, (np.ndarray, torch.Tensor)) and is_stats_npz(Path(source))


def _label(source) -> str:
    return Path(source).name if isinstance(source, (str, Path)) else f"{len(source)} images"


def compute_stats(images, network: FeatureNet, batch_size: int = 32, progress: bool = False,
                  desc: str = "inception") -> dict:
    """{mu, sigma, n, network_id, factor} of the Inception features of ``images``."""
    feats, _ = network.extract(images, batch_size, progress, desc=desc)
    mu, sigma = activation_statistics(feats)
    return {"mu": mu, "sigma": sigma, "n": len(feats), "network_id": network.id,
            "factor": centred_factor(feats)}


def stats_of(source, network: FeatureNet | str = DEFAULT_NETWORK, batch_size: int = 32,
             progress: bool = False, device="cpu") -> dict:
    """Statistics of a statistics .npz (read as is), or of images (array, .npz, folder)."""
    if _is_stats_file(source):
        return load_stats(source)
    net = load_feature_network(network, device)
    return compute_stats(source, net, batch_size, progress, desc=f"inception {_label(source)}")


# ================================================================ the reference cache

def _sidecar(cache_path: Path) -> Path:
    return cache_path.with_suffix(".json")


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _cached(cache_path: Path, network_id: str, provenance: dict) -> dict | None:
    """The cached statistics when the sidecar matches network, provenance and file hash, else None."""
    side = _sidecar(cache_path)
    if not (cache_path.is_file() and side.is_file()):
        return None
    try:
        meta = read_json(side)
        if (meta.get("network_id") == network_id and meta.get("provenance") == provenance
                and meta.get("sha256") == file_sha256(cache_path)):
            out = load_stats(cache_path)
            if out["network_id"] == network_id:
                return out
    except (ValueError, OSError, json.JSONDecodeError):
        pass   # unreadable cache: recompute
    return None


def reference_stats(images_or_path, cache_path: str | Path, provenance: dict,
                    network: FeatureNet | str = DEFAULT_NETWORK, batch_size: int = 32,
                    device="cpu", progress: bool = False) -> dict:
    """Reference statistics, computed once and cached.

    * a statistics ``.npz`` given as ``images_or_path`` (``mu``/``sigma``, e.g. ADM's
      ``VIRTUAL_imagenet256_labeled.npz``) is used as is (``cached`` False, ``network_id`` None
      unless the file records one);
    * otherwise ``cache_path`` (``.npz`` with mu, sigma, n, network_id) plus its ``.json`` sidecar
      (network_id, n, provenance, sha256 of the .npz) is reused when the sidecar matches the
      network id, the provenance and the file's sha256, and recomputed (atomically) otherwise.

    Returns {mu, sigma, n, network_id, path, cached}.
    """
    if _is_stats_file(images_or_path):
        return {**load_stats(images_or_path), "path": str(images_or_path), "cached": False}
    net = load_feature_network(network, device)
    cache_path = Path(cache_path)
    prov = _normalise(provenance)
    hit = _cached(cache_path, net.id, prov)
    if hit is not None:
        return {**hit, "path": str(cache_path), "cached": True}
    st = compute_stats(images_or_path, net, batch_size, progress, desc="inception reference")
    save_stats(cache_path, st["mu"], st["sigma"], st["n"], net.id)
    write_json_atomic(_sidecar(cache_path), {"network_id": net.id, "n": st["n"], "provenance": prov,
                                             "sha256": file_sha256(cache_path), "file": cache_path.name})
    return {**st, "path": str(cache_path), "cached": False}


# ================================================================ one-call helpers (CLI)

def fid_between(a, b, network: FeatureNet | str = DEFAULT_NETWORK, batch_size: int = 32,
                device="cpu", progress: bool = False) -> dict:
    """FID between two sources (image arrays, .npz of images, folders, or statistics .npz)."""
    sa = stats_of(a, network, batch_size, progress, device)
    sb = stats_of(b, network, batch_size, progress, device)
    ids = {s["network_id"] for s in (sa, sb) if s["network_id"]}
    if len(ids) > 1:
        warnings.warn(f"FID between statistics of different networks: {sorted(ids)}")
    return {"fid": frechet_distance_stats(sa, sb),
            "n_a": sa["n"], "n_b": sb["n"], "network_id": sorted(ids)[0] if len(ids) == 1 else sorted(ids)}


def pr_between(real, fake, network: FeatureNet | str = DEFAULT_NETWORK, k: int = 3,
               batch_size: int = 32, device="cpu", progress: bool = False) -> dict:
    """Improved precision/recall of ``fake`` against ``real`` (images, not statistics)."""
    net = load_feature_network(network, device)
    for s in (real, fake):
        if _is_stats_file(s):
            raise ValueError(f"{s}: precision/recall needs images, not FID statistics")
    fr, _ = net.extract(real, batch_size, progress, desc=f"inception {_label(real)}")
    ff, _ = net.extract(fake, batch_size, progress, desc=f"inception {_label(fake)}")
    p, r = precision_recall(fr, ff, k=k, device=device)
    return {"precision": p, "recall": r, "k": k, "n_real": len(fr), "n_fake": len(ff), "network_id": net.id}


def is_of(images, network: FeatureNet | str, splits: int = 10, batch_size: int = 32,
          device="cpu", progress: bool = False) -> dict:
    """Inception Score of images; needs a network with logits (a pt_inception .pth file)."""
    net = load_feature_network(network, device)
    if not net.has_logits:
        raise ValueError(f"{net.id} gives no logits, so no Inception Score: pass --network "
                         f"path/to/pt_inception-2015-12-05-6726825d.pth")
    _, logits = net.extract(images, batch_size, progress, desc=f"inception {_label(images)}")
    mean, std = inception_score(logits, splits)
    return {"is": mean, "is_std": std, "splits": splits, "n": len(logits), "network_id": net.id}
