"""K-means stage: sample patch vectors from the feature stores, fit faiss k-means, tokenize.

Method (DESIGN.md steps 3-4): k-means with faiss (20 iterations, faiss' own subsampling to
`max_points_per_centroid * K` points) on a seeded uniform sample of the patch vectors; a patch's
token is the index of its nearest centroid by L2, argmin ||x||^2 - 2 x.C + ||C||^2.

Pure functions, no Snakemake: `sample_patch_vectors`, `train_kmeans`, `assign_tokens`,
`compute_inertia` and `run_kmeans_stage` (the whole stage, writing `centroids.npy` + `.json`).

Feature store layout (written by the features stage): one Zarr v3 root array per shard,
shape (N, T, D) float16, chunked along N, attrs with "keys" (N str) and encoder metadata.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.io import file_sha256, write_json_atomic, write_npy_atomic

FORMAT = "digit-kmeans-v1"
INIT_METHODS = ("random", "kmeans++")


def _log(msg: str) -> None:
    print(f"[kmeans] {msg}", file=sys.stderr, flush=True)


def _sha256_array(a: np.ndarray) -> str:
    """sha256 of the array's C-order bytes, hashed in place (no copy of a large sample)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(memoryview(a.reshape(-1)).cast("B")).hexdigest()


# --------------------------------------------------------------------------------------------
# GPU selection
# --------------------------------------------------------------------------------------------

def _num_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_gpu(use_gpu: bool | str = "auto") -> bool:
    """"auto" -> use a GPU iff faiss sees one; True -> require one; False -> CPU."""
    if isinstance(use_gpu, str):
        v = use_gpu.strip().lower()
        if v == "auto":
            return _num_gpus() > 0
        if v in ("true", "yes", "1", "gpu"):
            use_gpu = True
        elif v in ("false", "no", "0", "cpu"):
            use_gpu = False
        else:
            raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    if use_gpu:
        if _num_gpus() == 0:
            raise RuntimeError(
                "use_gpu=True but faiss sees no GPU (faiss-cpu installed, or no CUDA device); "
                "use use_gpu='auto' or False")
        return True
    return False


# --------------------------------------------------------------------------------------------
# Sampling from the feature stores
# --------------------------------------------------------------------------------------------

SAMPLE_BLOCK = 1 << 20


def sample_indices(total: int, n: int, seed: int) -> np.ndarray:
    """Sorted int64 uniform sample without replacement of n of range(total) (all if n >= total).

    Memory is O(n + SAMPLE_BLOCK), whatever the fraction: the rows are cut into blocks of
    SAMPLE_BLOCK, a multivariate hypergeometric draw says how many picks fall in each block,
    then each block draws its picks. (A plain `rng.choice` permutes all of `total` when
    n > total/50: 2.6 GB of int64 for a 10% sample of ImageNet's 327M patches.)
    """
    total, n = int(total), int(n)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(int(seed))
    if total <= SAMPLE_BLOCK:
        return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)
    starts = np.arange(0, total, SAMPLE_BLOCK, dtype=np.int64)
    sizes = np.minimum(SAMPLE_BLOCK, total - starts)
    counts = rng.multivariate_hypergeometric(sizes, n, method="marginals")
    out = np.empty(n, dtype=np.int64)
    pos = 0
    for start, size, cnt in zip(starts, sizes, counts):
        if cnt:
            out[pos:pos + cnt] = start + np.sort(rng.choice(int(size), size=int(cnt),
                                                            replace=False))
            pos += cnt
    return out


def sample_patch_vectors(store_paths: Iterable[str | Path], n_sample: int, seed: int):
    """Seeded uniform sample (without replacement) of patch vectors from Zarr feature stores.

    The stores are taken in sorted path order and viewed as one (sum N*T, D) matrix; row
    indices are drawn by `sample_indices(total, n_sample, seed)`, sorted, and gathered lazily with
    dask straight into a preallocated float32 output, so memory holds the sample plus about
    one chunk per dask worker. If `n_sample >= total`, every vector is taken (in order).

    Returns `(x, info)`: x float32 (n, D) in increasing row order; info has `total_vectors`,
    `n_sampled`, `seed`, `dim`, `sha256` (of x's bytes), `indices_sha256`, `stores` (path +
    shape each) and `indices` (the int64 global row indices, a numpy array: not for JSON).
    """
    import dask
    import dask.array as da
    import zarr

    paths = sorted(str(p) for p in store_paths)
    if not paths:
        raise ValueError("sample_patch_vectors: no feature stores given")
    if int(n_sample) <= 0:
        raise ValueError(f"n_sample must be positive, got {n_sample}")

    stores, parts, dim = [], [], None
    for p in paths:
        z = zarr.open_array(p, mode="r")
        if z.ndim != 3:
            raise ValueError(f"{p}: expected a (N, T, D) feature array, got shape {z.shape}")
        n, t, d = (int(s) for s in z.shape)
        if dim is None:
            dim = d
        elif d != dim:
            raise ValueError(f"{p}: feature dim {d} differs from {dim} of {paths[0]}")
        stores.append({"path": p, "shape": [n, t, d], "dtype": str(z.dtype)})
        if n * t > 0:
            parts.append(da.from_zarr(z).reshape(n * t, d))

    total = sum(s["shape"][0] * s["shape"][1] for s in stores)
    if total == 0:
        raise ValueError("sample_patch_vectors: the feature stores hold no vectors")

    idx = sample_indices(total, int(n_sample), int(seed))

    flat = parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)
    picked = flat if len(idx) == total else flat[idx]
    picked = picked.astype(np.float32)
    out = np.empty((len(idx), dim), dtype=np.float32)
    with dask.config.set({"array.slicing.split_large_chunks": True}):
        da.store(picked, out, lock=False)

    info = {
        "total_vectors": int(total),
        "n_sampled": int(len(idx)),
        "n_requested": int(n_sample),
        "seed": int(seed),
        "dim": int(dim),
        "sha256": _sha256_array(out),
        "indices_sha256": _sha256_array(idx),
        "stores": stores,
        "indices": idx,
    }
    return out, info


# --------------------------------------------------------------------------------------------
# Nearest centroid (tokenization) and inertia
# --------------------------------------------------------------------------------------------

def _flat_index(centroids: np.ndarray, gpu: bool):
    """(IndexFlatL2 holding the centroids, GPU resources or None: keep both alive together)."""
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    index, res = faiss.IndexFlatL2(c.shape[1]), None
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(c)
    return index, res


def _nearest(x, centroids, batch_size: int, gpu: bool):
    """(squared L2 distance, index) of the nearest centroid for every row of x (n, D)."""
    n = x.shape[0]
    dist = np.empty(n, dtype=np.float32)
    lab = np.empty(n, dtype=np.int64)
    if n == 0:
        return dist, lab
    index, _res = _flat_index(centroids, gpu)
    for a in range(0, n, int(batch_size)):
        b = min(n, a + int(batch_size))
        xb = np.ascontiguousarray(x[a:b], dtype=np.float32)
        D, I = index.search(xb, 1)
        dist[a:b] = D[:, 0]
        lab[a:b] = I[:, 0]
    return dist, lab


def _check_xc(x, centroids):
    centroids = np.asarray(centroids)
    if centroids.ndim != 2 or centroids.shape[0] == 0:
        raise ValueError(f"centroids must be (K, D) with K > 0, got shape {centroids.shape}")
    if x.shape[-1] != centroids.shape[1]:
        raise ValueError(f"vector dim {x.shape[-1]} != centroid dim {centroids.shape[1]}")
    return centroids


def assign_tokens(x, centroids, batch_size: int = 65536, use_gpu: bool | str = "auto",
                  dtype=None) -> np.ndarray:
    """Nearest-centroid index (L2) of every vector: argmin_k ||x||^2 - 2 x.C_k + ||C_k||^2.

    x: (..., D) array (any float dtype; converted to float32 one batch at a time). Returns an
    array of shape x.shape[:-1]; dtype uint16 when K <= 65536 (the token format), else int64,
    unless `dtype` is given. Uses a faiss IndexFlatL2 (on the GPU when `use_gpu` says so).
    """
    x = np.asarray(x)
    centroids = _check_xc(x, centroids)
    k = centroids.shape[0]
    if dtype is None:
        dtype = np.uint16 if k <= 65536 else np.int64
    elif np.iinfo(dtype).max < k - 1:
        raise ValueError(f"dtype {np.dtype(dtype)} cannot hold token ids up to {k - 1}")
    lead = x.shape[:-1]
    _, lab = _nearest(x.reshape(-1, x.shape[-1]), centroids, batch_size, resolve_gpu(use_gpu))
    return lab.astype(dtype, copy=False).reshape(lead)


def compute_inertia(x, centroids, batch_size: int = 65536, use_gpu: bool | str = False) -> float:
    """Sum over the rows of x of the squared L2 distance to the nearest centroid (float64 sum)."""
    x = np.asarray(x)
    centroids = _check_xc(x, centroids)
    dist, _ = _nearest(x.reshape(-1, x.shape[-1]), centroids, batch_size, resolve_gpu(use_gpu))
    return float(np.maximum(dist, 0).sum(dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train_kmeans(x, k: int, niter: int = 20, seed: int = 0, spherical: bool = False,
                 use_gpu: bool | str = "auto", max_points_per_centroid: int = 256,
                 verbose: bool = False, init: str = "random",
                 early_stop_threshold: float | None = None):
    """Fit k-means with `faiss.Kmeans` on x (n, D); returns `(centroids float32 (k, D), info)`.

    faiss subsamples x to `max_points_per_centroid * k` points (seeded) when x is larger; the
    per-iteration objective (`obj`) is measured on that subsample, before each update (newer
    faiss stops before `niter` once it no longer decreases: `n_iterations_run`). After
    training, every row of x is assigned to its nearest centroid to report `cluster_sizes`,
    `n_empty_clusters` and `inertia` (sum of squared distances over all of x).
    init: "random" (faiss default, what DiGIT used) or "kmeans++" (newer faiss only).
    early_stop_threshold: None keeps faiss' default (0.0 in faiss 1.15: stop once the objective
    no longer decreases, i.e. at a fixed point, so the centroids equal those after `niter`
    iterations); a negative value forces all `niter` iterations (older faiss always runs them).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"train_kmeans expects a 2-D (n, D) array, got shape {x.shape}")
    n, d = x.shape
    k, niter = int(k), int(niter)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(
            f"k-means needs at least k points: k={k} clusters but only {n} training vectors "
            f"(increase n_sample / add feature shards, or lower k)")
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    gpu = resolve_gpu(use_gpu)

    kwargs = dict(niter=niter, seed=int(seed), spherical=bool(spherical), verbose=bool(verbose),
                  max_points_per_centroid=int(max_points_per_centroid))
    if init == "kmeans++":
        if not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
            raise ValueError(f"init='kmeans++' needs a newer faiss than {faiss.__version__}")
        kwargs["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    cp = faiss.ClusteringParameters()
    if early_stop_threshold is not None:
        if not hasattr(cp, "early_stop_threshold"):
            raise ValueError(f"early_stop_threshold needs a newer faiss than {faiss.__version__}")
        kwargs["early_stop_threshold"] = float(early_stop_threshold)
    effective_early_stop = kwargs.get("early_stop_threshold",
                                      getattr(cp, "early_stop_threshold", None))
    if gpu:
        kwargs["gpu"] = True

    t0 = time.perf_counter()
    km = faiss.Kmeans(d, k, **kwargs)
    km.train(x)
    t_train = time.perf_counter() - t0
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, d)

    t1 = time.perf_counter()
    dist, lab = _nearest(x, centroids, 65536, gpu)
    t_assign = time.perf_counter() - t1
    sizes = np.bincount(lab, minlength=k)

    stats = km.iteration_stats or []
    obj = [float(s["obj"]) for s in stats]
    info = {
        "k": k,
        "niter": niter,
        "seed": int(seed),
        "spherical": bool(spherical),
        "init": init,
        "max_points_per_centroid": int(max_points_per_centroid),
        "use_gpu": use_gpu if isinstance(use_gpu, (bool, str)) else bool(use_gpu),
        "gpu_used": gpu,
        "faiss_version": faiss.__version__,
        "n_train": int(n),
        "dim": int(d),
        "n_used_by_faiss": int(min(n, int(max_points_per_centroid) * k)),
        "early_stop_threshold": effective_early_stop,
        "obj_per_iteration": obj,
        "n_iterations_run": len(obj),
        "imbalance_per_iteration": [float(s["imbalance_factor"]) for s in stats],
        "faiss_final_obj": obj[-1] if obj else None,
        "inertia": float(np.maximum(dist, 0).sum(dtype=np.float64)),
        "cluster_sizes": sizes.astype(int).tolist(),
        "n_empty_clusters": int((sizes == 0).sum()),
        "time_train_s": t_train,
        "time_assign_s": t_assign,
    }
    return centroids, info


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def _feature_attrs(path: str) -> dict:
    import zarr

    attrs = dict(zarr.open_array(path, mode="r").attrs)
    attrs.pop("keys", None)
    return attrs


def run_kmeans_stage(store_paths: Sequence[str | Path], out_dir: str | Path, k: int, niter: int,
                     seed: int, n_sample: int, spherical: bool = False,
                     use_gpu: bool | str = "auto", max_points_per_centroid: int = 256,
                     verbose: bool = False) -> dict:
    """Sample -> train -> write `out_dir/centroids.npy` (K, D) float32 and `centroids.json`.

    Both files are written atomically (the .npy first, the .json last). Returns the json dict:
    `format`, `params` (k, niter, seed, n_sample, spherical, use_gpu, max_points_per_centroid,
    init, early_stop_threshold (faiss' effective value)), `faiss_version`, `gpu_used`, `centroids` (file, shape, dtype, sha256), `sample`
    (total_vectors, n_sampled, n_requested, seed, dim, sha256, indices_sha256), `inputs` (path,
    shape, dtype per store, sorted), `feature_attrs` (first store's attrs minus "keys"),
    `n_train`, `n_used_by_faiss`, `obj_per_iteration`, `n_iterations_run`,
    `imbalance_per_iteration`, `faiss_final_obj`, `inertia`, `cluster_sizes` (K ints summing
    to n_train), `n_empty_clusters`, `timings` (sample_s, train_s, assign_s, write_s, total_s).
    The sample indices are not stored: they are reproduced from the seed and the store shapes.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = sorted(str(p) for p in store_paths)
    _log(f"sampling {n_sample} vectors (seed {seed}) from {len(paths)} feature store(s)")
    t0 = time.perf_counter()
    x, sample = sample_patch_vectors(paths, n_sample, seed)
    t_sample = time.perf_counter() - t0
    _log(f"sampled {sample['n_sampled']}/{sample['total_vectors']} vectors of dim "
         f"{sample['dim']} in {t_sample:.1f}s")

    _log(f"training k-means: k={k} niter={niter} spherical={spherical} "
         f"max_points_per_centroid={max_points_per_centroid}")
    centroids, train = train_kmeans(x, k, niter=niter, seed=seed, spherical=spherical,
                                    use_gpu=use_gpu,
                                    max_points_per_centroid=max_points_per_centroid,
                                    verbose=verbose)
    _log(f"trained in {train['time_train_s']:.1f}s (gpu={train['gpu_used']}): inertia "
         f"{train['inertia']:.6g}, {train['n_empty_clusters']} empty cluster(s)")

    t0 = time.perf_counter()
    write_npy_atomic(out_dir / "centroids.npy", centroids)
    t_write = time.perf_counter() - t0
    if os.environ.get("DIGIT_SLEEP_BETWEEN_WRITES"):  # test hook: a window to kill the job between the files
        time.sleep(float(os.environ["DIGIT_SLEEP_BETWEEN_WRITES"]))

    indices = sample.pop("indices")
    sample["indices_dtype"] = str(indices.dtype)
    inputs = sample.pop("stores")
    meta = {
        "format": FORMAT,
        "params": {
            "k": int(k), "niter": int(niter), "seed": int(seed), "n_sample": int(n_sample),
            "spherical": bool(spherical), "use_gpu": use_gpu,
            "max_points_per_centroid": int(max_points_per_centroid), "init": train["init"],
            "early_stop_threshold": train["early_stop_threshold"],
        },
        "faiss_version": train["faiss_version"],
        "gpu_used": train["gpu_used"],
        "centroids": {"file": "centroids.npy", "shape": list(centroids.shape),
                      "dtype": "float32", "sha256": file_sha256(out_dir / "centroids.npy")},
        "sample": sample,
        "inputs": inputs,
        "feature_attrs": _feature_attrs(paths[0]),
        "n_train": train["n_train"],
        "n_used_by_faiss": train["n_used_by_faiss"],
        "obj_per_iteration": train["obj_per_iteration"],
        "n_iterations_run": train["n_iterations_run"],
        "imbalance_per_iteration": train["imbalance_per_iteration"],
        "faiss_final_obj": train["faiss_final_obj"],
        "inertia": train["inertia"],
        "cluster_sizes": train["cluster_sizes"],
        "n_empty_clusters": train["n_empty_clusters"],
        "timings": {
            "sample_s": t_sample,
            "train_s": train["time_train_s"],
            "assign_s": train["time_assign_s"],
            "write_s": t_write,
            "total_s": time.perf_counter() - t_start,
        },
    }
    write_json_atomic(out_dir / "centroids.json", meta)
    _log(f"wrote {out_dir / 'centroids.npy'} and centroids.json "
         f"({meta['timings']['total_s']:.1f}s total)")
    return meta


def kmeans_stage(config: dict, store_paths: Sequence[str | Path], out_dir: str | Path) -> dict:
    """The kmeans stage as the config describes it (``kmeans`` section)."""
    km = config["kmeans"]
    device = km["device"]
    return run_kmeans_stage(sorted(store_paths), out_dir, k=km["k"], niter=km["niter"], seed=km["seed"],
                            n_sample=km["sample"], spherical=km["spherical"],
                            use_gpu="auto" if device == "auto" else device.startswith("cuda"),
                            max_points_per_centroid=km["max_points_per_centroid"])
