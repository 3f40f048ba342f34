"""`python -m pipeline inspect PATH`: summarise any artifact of the pipeline.

Each summariser returns a JSON-able dict; `format_summary` prints it for people. Later stages
register their artifact kinds with `@summariser(predicate)`. (The module is called `artifacts`, not
`inspect`, so that it does not shadow the standard library's `inspect`.)
"""
from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

_SUMMARISERS: list[tuple[Callable[[Path], bool], Callable[[Path], dict]]] = []


def summariser(predicate: Callable[[Path], bool]):
    def register(fn):
        _SUMMARISERS.append((predicate, fn))
        return fn
    return register


def summarise(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}")
    for predicate, fn in _SUMMARISERS:
        if predicate(path):
            return {"path": str(path), **fn(path)}
    raise ValueError(f"don't know how to inspect {path} (supported: shard .tar, manifest.parquet, "
                     "shards/<dataset>/ folders, .json sidecars)")


def format_summary(summary: dict, indent: int = 0) -> str:
    lines = []
    pad = "  " * indent
    for key, value in summary.items():
        if isinstance(value, dict) and value and len(json.dumps(value)) > 100:
            lines.append(f"{pad}{key}:")
            lines.append(format_summary(value, indent + 1))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            if len(text) > 300:
                text = text[:297] + "..."
            lines.append(f"{pad}{key}: {text}")
    return "\n".join(lines)


def histogram(values) -> dict:
    counts = collections.Counter(values)
    return {str(k): counts[k] for k in sorted(counts)}


# ---------------------------------------------------------------- shards

@summariser(lambda p: p.is_file() and p.suffix == ".tar")
def summarise_shard(path: Path) -> dict:
    from PIL import Image
    keys, labels, sizes, exts = [], [], collections.Counter(), collections.Counter()
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if ext == "cls":
                labels.append(int(tar.extractfile(info).read()))
            elif ext in ("png", "jpg", "jpeg", "webp"):
                keys.append(key)
                exts[ext] += 1
                with Image.open(io.BytesIO(tar.extractfile(info).read())) as img:
                    sizes[f"{img.width}x{img.height} {img.mode}"] += 1
    return {
        "kind": "webdataset shard", "samples": len(keys), "bytes": path.stat().st_size,
        "first_keys": keys[:5], "last_key": keys[-1] if keys else None,
        "formats": dict(exts), "image_sizes": dict(sizes), "label_histogram": histogram(labels),
    }


@summariser(lambda p: p.is_file() and p.name.endswith(".parquet"))
def summarise_manifest(path: Path) -> dict:
    import pyarrow.parquet as pq
    table = pq.read_table(path).to_pydict()
    splits = collections.Counter(table.get("split", []))
    out = {"kind": "manifest", "rows": len(next(iter(table.values()), [])), "columns": list(table),
           "rows_per_split": dict(sorted(splits.items()))}
    if "label" in table:
        out["label_histogram"] = histogram(table["label"])
    if "width" in table:
        out["image_sizes"] = histogram(f"{w}x{h}" for w, h in zip(table["width"], table["height"]))
    return out


@summariser(lambda p: p.is_dir() and (p / "dataset.json").is_file())
def summarise_dataset(path: Path) -> dict:
    meta = json.loads((path / "dataset.json").read_text())
    return {"kind": "sharded dataset", "name": meta["name"], "source": meta["source"], "path_in": meta["path"],
            "classes": meta["classes"],
            "splits": {s: {"samples": v["samples"], "shards": len(v["shards"])} for s, v in meta["splits"].items()},
            "skipped": meta["num_skipped"], "skipped_files": [s["source"] for s in meta["skipped"]][:20],
            "settings": meta["settings"]}


# ---------------------------------------------------------------- tokenizer artifacts

@summariser(lambda p: p.is_dir() and p.suffix == ".zarr")
def summarise_zarr(path: Path) -> dict:
    import zarr
    arr = zarr.open_array(str(path), mode="r")
    attrs = dict(arr.attrs)
    enc = attrs.get("encoder", {})
    out = {"kind": "feature store (zarr)", "shape": list(arr.shape), "dtype": str(arr.dtype),
           "chunks": list(arr.chunks), "images": len(attrs.get("keys", [])), "first_keys": attrs.get("keys", [])[:3],
           "encoder": {k: enc.get(k) for k in ("arch", "block_index", "depth", "grid", "weights_sha256",
                                                 "checkpoint_format")},
           "view": attrs.get("view"), "preprocessing": attrs.get("preprocessing"), "shard": attrs.get("shard")}
    if arr.shape[0]:
        first = np.asarray(arr[: min(64, arr.shape[0])], dtype=np.float32)
        out["sample_stats"] = {"mean": float(first.mean()), "std": float(first.std()),
                               "mean_norm": float(np.linalg.norm(first, axis=-1).mean())}
    return out


def codebook_stats(tokens: np.ndarray, k: int | None) -> dict:
    counts = np.bincount(tokens.reshape(-1).astype(np.int64), minlength=k or 0)
    p = counts[counts > 0] / counts.sum()
    top = np.argsort(counts)[::-1][:10]
    return {"codebook_size": int(k or counts.size), "codes_used": int((counts > 0).sum()),
            "usage": round(float((counts > 0).sum()) / max(1, k or counts.size), 4),
            "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2),
            "top_tokens": {str(int(t)): int(counts[t]) for t in top if counts[t] > 0}}


@summariser(lambda p: p.is_file() and p.suffix == ".npy" and p.with_suffix(".json").is_file()
            and json.loads(p.with_suffix(".json").read_text()).get("stage") == "tokens")
def summarise_tokens(path: Path) -> dict:
    grids = np.load(path, mmap_mode="r")
    meta = json.loads(path.with_suffix(".json").read_text())
    return {"kind": "token shard", "shape": list(grids.shape), "layout": meta["layout"], "dtype": str(grids.dtype),
            "images": len(meta["keys"]), "first_keys": meta["keys"][:3], "label_histogram": histogram(meta["labels"]),
            "views": meta["views"], "centroids_sha256": meta.get("centroids_sha256"),
            **codebook_stats(np.asarray(grids), meta.get("codebook_size"))}


@summariser(lambda p: p.is_file() and p.name == "centroids.npy")
def summarise_centroids(path: Path) -> dict:
    c = np.load(path)
    out = {"kind": "k-means centroids", "shape": list(c.shape), "dtype": str(c.dtype),
           "norm_mean": float(np.linalg.norm(c, axis=1).mean())}
    meta_path = path.with_suffix(".json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        sizes = np.asarray(meta.get("cluster_sizes", []))
        out.update(meta.get("params", {}))
        out.update({k: meta[k] for k in ("faiss_version", "gpu_used", "n_train", "n_iterations_run",
                                         "n_empty_clusters", "inertia") if k in meta})
        obj = meta.get("obj_per_iteration") or []
        if obj:
            out["objective_first_last"] = [obj[0], obj[-1]]
        if sizes.size:
            out["cluster_size_min_median_max"] = [int(sizes.min()), int(np.median(sizes)), int(sizes.max())]
    return out


# ---------------------------------------------------------------- checkpoints and samples

def _load_pickle(path: Path) -> dict:
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # our own training checkpoints hold numpy RNG states
        return torch.load(path, map_location="cpu", weights_only=False)


@summariser(lambda p: p.is_file() and p.suffix in (".pt", ".pth"))
def summarise_checkpoint(path: Path) -> dict:
    ckpt = _load_pickle(path)
    if not isinstance(ckpt, dict):
        return {"kind": "torch file", "type": type(ckpt).__name__}
    state = ckpt.get("model") or ckpt.get("state_dict") or {k: v for k, v in ckpt.items() if hasattr(v, "shape")}
    params = sum(int(v.numel()) for v in state.values() if hasattr(v, "numel"))
    out = {"kind": f"checkpoint ({ckpt.get('format', 'state dict')})", "parameters": params,
           "tensors": len(state), "keys": sorted(ckpt)[:20]}
    for key in ("arch", "step", "model_config", "model_kwargs", "data_position"):
        if key in ckpt:
            out[key] = ckpt[key]
    meta = ckpt.get("meta")
    if isinstance(meta, dict):
        out["meta"] = {k: v for k, v in meta.items() if k in ("test_accuracy", "objective", "num_classes", "seconds")}
    if ckpt.get("ema") is not None:
        out["ema"] = True
    return out


@summariser(lambda p: p.is_dir() and (p / "samples.json").is_file())
def summarise_samples(path: Path) -> dict:
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    labels = np.load(path / "labels.npy")
    meta = json.loads((path / "samples.json").read_text())
    out = {"kind": "sampled token grids", "shape": list(tokens.shape), "dtype": str(tokens.dtype),
           "label_histogram": histogram(labels.tolist()),
           "sampling": {k: v for k, v in meta.items() if k in ("temperature", "top_k", "top_p", "cfg_scale", "seed")},
           **codebook_stats(np.asarray(tokens), meta.get("vocab_size"))}
    if (path / "images.npz").is_file():
        out["images"] = summarise_images(path / "images.npz")
    return out


@summariser(lambda p: p.is_file() and p.suffix == ".npz")
def summarise_images(path: Path) -> dict:
    """images.npz of the render stage (or any .npz: its arrays' shapes)."""
    with np.load(path) as z:
        if "images" not in z.files:
            return {"kind": "npz", "arrays": {k: [list(z[k].shape), str(z[k].dtype)] for k in z.files}}
        images = z["images"]
        labels = z["labels"] if "labels" in z.files else np.full(len(images), -1)
    out = {"kind": "rendered images", "shape": list(images.shape), "dtype": str(images.dtype),
           "pixel_mean": round(float(images.mean()), 2) if images.size else None,
           "pixel_std": round(float(images.std()), 2) if images.size else None,
           "label_histogram": histogram(labels.tolist())}
    meta_path = path.with_name("images.json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        out["route"] = meta.get("route")
        out["stage2_sampling"] = {k: meta[k] for k in ("temperature", "top_k", "top_p", "seed") if k in meta}
    return out


@summariser(lambda p: p.is_file() and p.suffix == ".json")
def summarise_json(path: Path) -> dict:
    meta = json.loads(path.read_text())
    return {"kind": "json sidecar", "content": meta}


@summariser(lambda p: p.is_file() and p.suffix == ".npy")
def summarise_npy(path: Path) -> dict:
    arr = np.load(path, mmap_mode="r")
    return {"kind": "numpy array", "shape": list(arr.shape), "dtype": str(arr.dtype)}
