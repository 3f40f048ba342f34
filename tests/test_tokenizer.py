"""Features -> k-means -> tokens on real Fashion-MNIST shards with a small timm ViT."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
import zarr

from pipeline.config import validate_config
from pipeline.data import ShardViews, ViewSpec, index_shard
from pipeline.encoder_loading import load_encoder, save_timm_encoder
from pipeline.features import extract_features
from pipeline.kmeans import assign_tokens, run_kmeans_stage
from pipeline.models.patch_encoder import encoder_info
from pipeline.tokens import load_tokens, tokenize_shard
from conftest import make_fmnist_shards

SPEC = ViewSpec(resize=32, crop=28, image_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)
KWARGS = dict(img_size=28, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0,
              global_pool="avg", class_token=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fmnist_dir):
    return make_fmnist_shards(tmp_path_factory.mktemp("shards"), "tk", fmnist_dir, limit=120, per_shard=60)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_timm_encoder(path, "vit_tiny_patch16_224", KWARGS, model.state_dict(), {"note": "random"})
    return path


@pytest.fixture(scope="module")
def encoder(encoder_file):
    return load_encoder("timm:vit_tiny_patch16_224", encoder_file, layer=3, img_size=28)


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory, shards, encoder):
    out = tmp_path_factory.mktemp("results")
    stores = []
    for tar in sorted(shards.glob("train-*.tar")):
        store = out / "features" / (tar.stem + ".zarr")
        extract_features(tar, store, encoder, SPEC, batch_size=32, progress=False, encoder_meta=encoder_info(encoder))
        stores.append(store)
    run_kmeans_stage(stores, out / "kmeans", k=16, niter=10, seed=0, n_sample=4000)
    centroids = np.load(out / "kmeans" / "centroids.npy")
    tokens = {}
    for tar in sorted(shards.glob("*.tar")):
        npy = out / "tokens" / (tar.stem + ".npy")
        tokenize_shard(tar, npy, encoder, centroids, SPEC, views=3, seed=7, batch_size=32, progress=False)
        tokens[tar.stem] = npy
    return {"stores": stores, "centroids": centroids, "tokens": tokens, "out": out}


def test_feature_store_layout(pipeline_outputs, shards, encoder):
    arr = zarr.open_array(str(pipeline_outputs["stores"][0]), mode="r")
    assert arr.shape == (60, 49, 32) and arr.dtype == np.float16
    assert arr.chunks[1:] == (49, 32)
    attrs = dict(arr.attrs)
    assert attrs["keys"] == [s.key for s in index_shard(shards / "train-000000.tar")]
    assert attrs["encoder"]["block_index"] == 0  # layer 3 = third block from the end of 3 blocks
    assert attrs["encoder"]["weights_sha256"] and attrs["preprocessing"]["crop"] == 28 and attrs["view"] == 0
    with torch.no_grad():
        views, _, _, _ = ShardViews([shards / "train-000000.tar"], SPEC)[5]
        from pipeline.data import encoder_input
        direct = encoder(encoder_input(views[:1], SPEC))[0].numpy()
    np.testing.assert_allclose(arr[5].astype(np.float32), direct, atol=2e-3, rtol=2e-3)


def test_tokens_align_with_shards_and_manifest(pipeline_outputs, shards):
    manifest = pq.read_table(shards / "manifest.parquet").to_pylist()
    for stem, npy in pipeline_outputs["tokens"].items():
        grids, meta = load_tokens(npy)
        split, shard = stem.rsplit("-", 1)
        rows = [r for r in manifest if r["split"] == split and r["shard"] == int(shard)]
        assert grids.shape == (len(rows), 3, 7, 7) and grids.dtype == np.uint16
        assert meta["keys"] == [r["key"] for r in rows] == [s.key for s in index_shard(shards / f"{stem}.tar")]
        assert meta["labels"] == [r["label"] for r in rows]
        assert int(grids.max()) < 16


def test_centre_view_tokens_equal_assigning_stored_features(pipeline_outputs):
    store = zarr.open_array(str(pipeline_outputs["stores"][1]), mode="r")
    feats = np.asarray(store[:], dtype=np.float32).reshape(-1, store.shape[-1])
    expected = assign_tokens(feats, pipeline_outputs["centroids"], use_gpu=False).reshape(-1, 7, 7)
    grids, _ = load_tokens(pipeline_outputs["tokens"]["train-000001"])
    agree = (grids[:, 0] == expected).mean()
    assert agree > 0.999, agree


def test_views_are_seeded_crops(pipeline_outputs, shards, encoder, tmp_path):
    grids, meta = load_tokens(pipeline_outputs["tokens"]["test-000000"])
    crops = np.asarray(meta["crops"])
    assert (crops[:, 0] == [2, 2, 0]).all(), "view 0 is the centre crop of the 32-px resize, unflipped"
    assert len({tuple(c) for c in crops[:, 1:].reshape(-1, 3)}) > 5, "random views vary"
    assert (grids[:, 1] != grids[:, 0]).any()
    again = tmp_path / "again.npy"
    tokenize_shard(shards / "test-000000.tar", again, encoder, pipeline_outputs["centroids"], SPEC, views=3, seed=7,
                   batch_size=50, progress=False)
    np.testing.assert_array_equal(np.load(again), np.asarray(grids))
    assert json.loads(again.with_suffix(".json").read_text())["crops"] == meta["crops"]


def test_kmeans_is_deterministic_on_the_stores(pipeline_outputs, tmp_path):
    run_kmeans_stage(pipeline_outputs["stores"], tmp_path / "km", k=16, niter=10, seed=0, n_sample=4000)
    np.testing.assert_array_equal(np.load(tmp_path / "km" / "centroids.npy"), pipeline_outputs["centroids"])


def test_killed_features_job_leaves_nothing_accepted(tmp_path, fmnist_dir, encoder_file, repo):
    make_fmnist_shards(tmp_path, "big", fmnist_dir, limit=1500, per_shard=1500, splits=["test"])
    tar, out = tmp_path / "big" / "test-000000.tar", tmp_path / "feat" / "test-000000.zarr"
    settings = json.dumps({"encoder": {"resize": 32, "crop": 28, "image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3,
                                       "batch_size": 1, "num_workers": 0, "train": {}}})
    cmd = [sys.executable, "-m", "pipeline", "features", "--json", settings, "--shard", str(tar),
           "--encoder", str(encoder_file), "--out", str(out), "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.parent.glob("*.tmp-*")) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert not out.exists(), "a killed job must not leave the final store"
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert zarr.open_array(str(out), mode="r").shape == (1500, 49, 32)


def test_tiny_encoder_trains_and_loads(shards, tmp_path):
    from pipeline.tiny_encoder import BASE_MODEL, train_encoder
    train_cfg = validate_config({"encoder": {"train": {"embed_dim": 32, "depth": 3, "num_heads": 2, "epochs": 2,
                                                       "batch_size": 30}}})["encoder"]["train"]
    out = tmp_path / "enc.pt"
    meta = train_encoder(sorted(shards.glob("train-*.tar")), sorted(shards.glob("test-*.tar")), out, SPEC, train_cfg,
                         num_classes=10, progress=False)
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["test_images"] == 120
    assert meta["history"][1]["train_loss"] < meta["history"][0]["train_loss"] + 0.5
    enc = load_encoder(f"timm:{BASE_MODEL}", out, layer=3, img_size=28)
    assert enc.info.block_index == 0 and enc.grid == (7, 7)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["test_accuracy"] == meta["test_accuracy"]


def test_min_accuracy_floor_fails_the_stage(shards, tmp_path):
    from conftest import run_cli
    settings = json.dumps({"encoder": {"resize": 32, "crop": 28, "image_size": 28, "mean": [0.5] * 3,
                                       "std": [0.5] * 3, "train": {"embed_dim": 16, "depth": 3, "num_heads": 1,
                                                                   "epochs": 1, "min_test_accuracy": 0.99}}})
    proc = run_cli("train-encoder", "--json", settings, "--train", shards / "train-000000.tar",
                   "--test", shards / "test-000000.tar", "--out", tmp_path / "e.pt", "--quiet", check=False)
    assert proc.returncode == 1 and "min_test_accuracy" in proc.stderr


def test_inspect_tokenizer_artifacts(pipeline_outputs):
    from conftest import run_cli
    zarr_summary = json.loads(run_cli("inspect", pipeline_outputs["stores"][0], "--json").stdout)
    assert zarr_summary["shape"] == [60, 49, 32] and zarr_summary["encoder"]["block_index"] == 0
    cent = json.loads(run_cli("inspect", pipeline_outputs["out"] / "kmeans" / "centroids.npy", "--json").stdout)
    assert cent["shape"] == [16, 32] and cent["k"] == 16 and "n_empty_clusters" in cent
    tok = json.loads(run_cli("inspect", pipeline_outputs["tokens"]["test-000000"], "--json").stdout)
    grids = np.load(pipeline_outputs["tokens"]["test-000000"])
    counts = np.bincount(grids.reshape(-1), minlength=16)
    assert tok["codes_used"] == int((counts > 0).sum()) and tok["codebook_size"] == 16
    p = counts[counts > 0] / counts.sum()
    assert abs(tok["perplexity"] - float(np.exp(-(p * np.log(p)).sum()))) < 0.01
    assert sum(tok["label_histogram"].values()) == 60


def test_random_view_features_match_the_tokens_views(shards, encoder, pipeline_outputs, tmp_path):
    """Features of view 1 (seeded random crop) give exactly the tokens stage's view-1 tokens."""
    tar = shards / "test-000000.tar"
    store = tmp_path / "v1.zarr"
    attrs = extract_features(tar, store, encoder, SPEC, batch_size=32, progress=False, view=1, seed=7)
    assert attrs["view"] == 1
    feats = np.asarray(zarr.open_array(str(store), mode="r")[:], dtype=np.float32)
    ids = assign_tokens(feats.reshape(-1, feats.shape[-1]), pipeline_outputs["centroids"], use_gpu=False)
    grids, _ = load_tokens(pipeline_outputs["tokens"]["test-000000"])
    assert (ids.reshape(-1, 7, 7) == grids[:, 1]).mean() > 0.999
    assert (ids.reshape(-1, 7, 7) != grids[:, 0]).any()
