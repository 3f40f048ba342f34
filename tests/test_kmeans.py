"""Tests of the k-means stage (pipeline/kmeans.py): sampling, training, tokenization, artifacts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pipeline import kmeans as km


def _blobs(n_per, centers, sigma, seed):
    rng = np.random.default_rng(seed)
    k, d = centers.shape
    x = np.concatenate([c + sigma * rng.standard_normal((n_per, d)) for c in centers])
    y = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), y[perm]


def _centers(k, d, seed, scale=10.0):
    return (scale * np.random.default_rng(seed).standard_normal((k, d))).astype(np.float32)


def _write_store(path, arr, chunk=3):
    z = zarr.create_array(store=str(path), shape=arr.shape, chunks=(chunk,) + arr.shape[1:],
                          dtype="float16")
    z[:] = arr
    z.attrs.update({"keys": [f"img{i:05d}" for i in range(arr.shape[0])],
                    "encoder": "test-vit", "layer": 9})
    return path


@pytest.fixture
def stores(tmp_path):
    """Three shards of (N, T=4, D=8) fp16 features; returns (paths, full flat float32 matrix)."""
    rng = np.random.default_rng(0)
    shapes = [7, 5, 9]
    arrays, paths = [], []
    for i, n in enumerate(shapes):
        a = rng.standard_normal((n, 4, 8)).astype(np.float16)
        paths.append(_write_store(tmp_path / "features" / f"train-{i:06d}.zarr", a))
        arrays.append(a)
    flat = np.concatenate([a.reshape(-1, 8) for a in arrays]).astype(np.float32)
    return paths, flat


def _brute_force(x, c):
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ c.T + (c * c).sum(1)[None]
    return d2.argmin(1), d2


# ---------------------------------------------------------------------------------- training

@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_recovers_well_separated_clusters(init):
    k, d = 4, 16
    centers = _centers(k, d, seed=1)
    x, y = _blobs(300, centers, sigma=0.1, seed=2)
    # random init can put two seeds into one blob (a true local optimum of Lloyd); pick a
    # seed that does not for "random" and check k-means++ on the same data.
    c, info = km.train_kmeans(x, k, niter=20, seed=3, use_gpu=False, init=init)
    assert c.shape == (k, d) and c.dtype == np.float32
    lab = km.assign_tokens(x, c, use_gpu=False)
    # every true cluster maps to exactly one centroid, and distinct clusters to distinct ones
    mapping = {}
    for j in range(k):
        ids = np.unique(lab[y == j])
        assert len(ids) == 1, f"true cluster {j} split over centroids {ids}"
        mapping[j] = int(ids[0])
    assert len(set(mapping.values())) == k
    err = max(np.linalg.norm(c[mapping[j]] - centers[j]) for j in range(k))
    assert err < 0.05  # sigma * sqrt(d / 300) ~ 0.023
    assert info["n_empty_clusters"] == 0
    assert sorted(info["cluster_sizes"]) == [300] * k
    obj = info["obj_per_iteration"]
    # faiss >= 1.12 stops early once the objective stops decreasing (a fixed point of Lloyd)
    assert 1 <= len(obj) <= 20 and info["n_iterations_run"] == len(obj)
    assert all(b <= a * (1 + 1e-5) for a, b in zip(obj, obj[1:]))
    assert info["inertia"] == pytest.approx(
        ((x - c[lab.astype(np.int64)]) ** 2).sum(), rel=1e-3)


def test_same_seed_bitwise_identical_different_seed_differs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 12)).astype(np.float32)
    c1, i1 = km.train_kmeans(x, 32, niter=10, seed=7, use_gpu=False)
    c2, i2 = km.train_kmeans(x, 32, niter=10, seed=7, use_gpu=False)
    assert c1.tobytes() == c2.tobytes()
    t1 = km.assign_tokens(x, c1, use_gpu=False)
    t2 = km.assign_tokens(x, c2, use_gpu=False)
    assert t1.tobytes() == t2.tobytes()
    assert i1["cluster_sizes"] == i2["cluster_sizes"] and i1["inertia"] == i2["inertia"]
    c3, _ = km.train_kmeans(x, 32, niter=10, seed=8, use_gpu=False)
    assert c3.tobytes() != c1.tobytes()


def test_train_info_fields_and_subsampling():
    x = np.random.default_rng(0).standard_normal((2000, 6)).astype(np.float32)
    c, info = km.train_kmeans(x, 10, niter=5, seed=0, use_gpu=False, max_points_per_centroid=50)
    for key in ("k", "niter", "seed", "spherical", "max_points_per_centroid", "use_gpu",
                "gpu_used", "faiss_version", "obj_per_iteration", "faiss_final_obj", "inertia",
                "cluster_sizes", "n_empty_clusters", "time_train_s", "n_used_by_faiss",
                "n_iterations_run", "early_stop_threshold"):
        assert key in info, key
    assert info["gpu_used"] is False
    assert info["n_used_by_faiss"] == 500  # faiss trains on 50 * 10 points
    assert sum(info["cluster_sizes"]) == 2000  # sizes are over the whole training sample
    assert len(info["obj_per_iteration"]) == info["n_iterations_run"] <= 5


def test_early_stop_threshold():
    import faiss

    if not hasattr(faiss.ClusteringParameters(), "early_stop_threshold"):
        pytest.skip("this faiss always runs niter iterations")
    centers = _centers(3, 8, seed=0)
    x, _ = _blobs(200, centers, sigma=0.1, seed=0)
    c0, i0 = km.train_kmeans(x, 3, niter=15, seed=1, use_gpu=False)
    c1, i1 = km.train_kmeans(x, 3, niter=15, seed=1, use_gpu=False, early_stop_threshold=-1.0)
    assert i1["n_iterations_run"] == 15 and i1["early_stop_threshold"] == -1.0
    assert i0["n_iterations_run"] <= 15 and i0["early_stop_threshold"] == 0.0
    # stopping at a fixed point does not change the result
    np.testing.assert_allclose(c0, c1, atol=1e-5)


def test_spherical_gives_unit_centroids():
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c, info = km.train_kmeans(x, 8, niter=5, seed=0, spherical=True, use_gpu=False)
    assert info["spherical"] is True
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)


def test_k_larger_than_points_raises():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"k=6 clusters but only 5 training vectors"):
        km.train_kmeans(x, 6, use_gpu=False)


def test_use_gpu_true_without_gpu_is_clear():
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no GPU"):
        km.train_kmeans(np.zeros((10, 2), np.float32), 2, use_gpu=True)
    assert km.resolve_gpu("auto") is False


# ---------------------------------------------------------------------------------- assignment

def test_assign_tokens_equals_numpy_brute_force():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5000, 24)).astype(np.float32)
    c = rng.standard_normal((77, 24)).astype(np.float32)
    tok = km.assign_tokens(x, c, batch_size=1000, use_gpu=False)  # several batches + a tail
    assert tok.dtype == np.uint16 and tok.shape == (5000,)
    ref, d2 = _brute_force(x.astype(np.float64), c.astype(np.float64))
    diff = np.nonzero(tok.astype(np.int64) != ref)[0]
    # ties aside: any disagreement must be a float32 near-tie
    gaps = np.abs(d2[diff, tok[diff].astype(np.int64)] - d2[diff, ref[diff]])
    assert len(diff) <= 2 and (gaps < 1e-3).all()
    # leading dims are kept: (N, T, D) -> (N, T); tiny batches use faiss' non-BLAS path
    tok3 = km.assign_tokens(x.reshape(50, 100, 24).astype(np.float16), c, batch_size=7,
                            use_gpu=False)
    ref16, _ = _brute_force(x.astype(np.float16).astype(np.float64), c.astype(np.float64))
    assert tok3.shape == (50, 100)
    assert (tok3.reshape(-1) != ref16).sum() <= 2
    assert km.assign_tokens(x[:10], c, use_gpu=False, dtype=np.int64).dtype == np.int64


def test_assign_tokens_dim_mismatch():
    with pytest.raises(ValueError, match="dim"):
        km.assign_tokens(np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32))


# ---------------------------------------------------------------------------------- sampling

def test_sampling_deterministic_and_matches_stores(stores):
    paths, flat = stores
    total = flat.shape[0]  # 21 images * 4 patches = 84
    # order of the paths given does not matter: stores are taken in sorted path order
    x1, info1 = km.sample_patch_vectors(list(reversed(paths)), 30, seed=4)
    x2, info2 = km.sample_patch_vectors(paths, 30, seed=4)
    assert x1.dtype == np.float32 and x1.shape == (30, 8)
    assert x1.tobytes() == x2.tobytes() and info1["sha256"] == info2["sha256"]
    idx = info1["indices"]
    assert len(np.unique(idx)) == 30 and (np.diff(idx) > 0).all()
    np.testing.assert_array_equal(x1, flat[idx])
    assert info1["total_vectors"] == total and info1["n_sampled"] == 30
    assert info1["seed"] == 4
    assert [s["shape"] for s in info1["stores"]] == [[7, 4, 8], [5, 4, 8], [9, 4, 8]]
    assert info1["stores"][0]["path"] == str(paths[0])

    x3, info3 = km.sample_patch_vectors(paths, 30, seed=5)
    assert not np.array_equal(info3["indices"], idx)

    xa, infoa = km.sample_patch_vectors(paths, 10_000, seed=4)  # more than exists: take all
    assert infoa["n_sampled"] == total
    np.testing.assert_array_equal(xa, flat)


def test_sample_indices_blockwise(monkeypatch, stores):
    """The block-wise draw (used above SAMPLE_BLOCK rows) is exact, sorted and seeded."""
    monkeypatch.setattr(km, "SAMPLE_BLOCK", 10)
    i1 = km.sample_indices(95, 40, seed=1)
    assert len(i1) == 40 and (np.diff(i1) > 0).all() and 0 <= i1[0] and i1[-1] < 95
    assert np.array_equal(i1, km.sample_indices(95, 40, seed=1))
    assert not np.array_equal(i1, km.sample_indices(95, 40, seed=2))
    assert np.array_equal(km.sample_indices(95, 95, seed=1), np.arange(95))
    # roughly uniform over blocks (incl. the short last one)
    hits = np.bincount(np.concatenate([km.sample_indices(95, 40, s) // 10 for s in range(300)]),
                       minlength=10) / (300 * 40)
    np.testing.assert_allclose(hits, np.r_[[10 / 95] * 9, 5 / 95], atol=0.01)
    paths, flat = stores
    x, info = km.sample_patch_vectors(paths, 50, seed=3)
    np.testing.assert_array_equal(x, flat[info["indices"]])


def test_sampling_rejects_mismatched_dims(tmp_path, stores):
    paths, _ = stores
    bad = _write_store(tmp_path / "features" / "train-000099.zarr",
                       np.zeros((2, 4, 5), np.float16))
    with pytest.raises(ValueError, match="dim"):
        km.sample_patch_vectors(paths + [bad], 10, seed=0)


# ---------------------------------------------------------------------------------- the stage

def test_stage_writes_centroids_and_json(tmp_path, stores):
    paths, flat = stores
    out = tmp_path / "kmeans"
    meta = km.run_kmeans_stage(paths, out, k=5, niter=4, seed=0, n_sample=60, use_gpu="auto")
    c = np.load(out / "centroids.npy")
    assert c.shape == (5, 8) and c.dtype == np.float32
    on_disk = json.loads((out / "centroids.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    for key in ("params", "faiss_version", "sample", "obj_per_iteration", "inertia",
                "cluster_sizes", "n_empty_clusters", "timings", "inputs", "centroids"):
        assert key in on_disk, key
    p = on_disk["params"]
    assert (p["k"], p["niter"], p["seed"], p["n_sample"], p["spherical"]) == (5, 4, 0, 60, False)
    assert p["max_points_per_centroid"] == 256
    s = on_disk["sample"]
    assert s["n_sampled"] == 60 and s["total_vectors"] == flat.shape[0] and len(s["sha256"]) == 64
    assert sum(on_disk["cluster_sizes"]) == s["n_sampled"] == on_disk["n_train"]
    assert len(on_disk["cluster_sizes"]) == 5
    assert on_disk["n_empty_clusters"] == sum(n == 0 for n in on_disk["cluster_sizes"])
    assert 1 <= len(on_disk["obj_per_iteration"]) == on_disk["n_iterations_run"] <= 4
    assert [i["path"] for i in on_disk["inputs"]] == sorted(str(q) for q in paths)
    assert on_disk["feature_attrs"] == {"encoder": "test-vit", "layer": 9}
    assert on_disk["timings"]["total_s"] >= on_disk["timings"]["train_s"]
    # the recorded sample hash is the hash of the sample the stage trained on
    x, info = km.sample_patch_vectors(paths, 60, seed=0)
    assert info["sha256"] == s["sha256"]
    # no temp files are left behind
    assert sorted(f.name for f in out.iterdir()) == ["centroids.json", "centroids.npy"]
    # rerun is reproducible
    km.run_kmeans_stage(paths, out, k=5, niter=4, seed=0, n_sample=60, use_gpu=False)
    assert np.load(out / "centroids.npy").tobytes() == c.tobytes()


def test_stage_k_too_large(tmp_path, stores):
    paths, _ = stores
    with pytest.raises(ValueError, match="at least k points"):
        km.run_kmeans_stage(paths, tmp_path / "km", k=50, niter=2, seed=0, n_sample=20)
    assert not (tmp_path / "km" / "centroids.npy").exists()
