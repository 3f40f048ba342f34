import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import shards as shards_mod
from pipeline.config import validate_config
from pipeline.io import file_sha256
from pipeline.shards import build_shards
from pipeline.sources import DatasetNotFound, fashion_mnist_split
from conftest import run_cli


def _cfg(name, source, path, **shards):
    cfg = validate_config({"dataset": {"name": name, "source": source, "path": str(path)},
                           "shards": {"samples_per_shard": 40, "workers": 1, **shards}})
    return cfg["dataset"], cfg["shards"]


def _read_back(tar_paths):
    """Decode shards with the webdataset library itself."""
    ds = wds.WebDataset([str(p) for p in tar_paths], shardshuffle=False)
    return [(s["__key__"], Image.open(io.BytesIO(s.get("png", s.get("jpg")))), int(s["cls"]), json.loads(s["json"]))
            for s in ds]


@pytest.fixture
def fmnist_shards(tmp_path, fmnist_dir):
    dataset, settings = _cfg("fm", "fashion_mnist", fmnist_dir)
    dataset["limit"] = 100
    out = tmp_path / "shards"
    summary = build_shards(dataset, settings, out_root=out, progress=False)
    return out / "fm", summary, (dataset, settings, out)


def test_fashion_mnist_round_trip(fmnist_shards, fmnist_dir):
    out_dir, summary, _ = fmnist_shards
    images, labels = fashion_mnist_split(fmnist_dir, "train")
    manifest = pq.read_table(out_dir / "manifest.parquet").to_pylist()
    train_rows = [r for r in manifest if r["split"] == "train"]
    assert len(train_rows) == 100 and summary["splits"]["train"]["samples"] == 100
    tars = sorted(out_dir.glob("train-*.tar"))
    assert [t.name for t in tars] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    samples = _read_back(tars)
    assert len(samples) == len(train_rows)
    for i, ((key, img, label, meta), row) in enumerate(zip(samples, train_rows)):
        assert key == row["key"] == f"train_{i:06d}" and "." not in key
        np.testing.assert_array_equal(np.asarray(img), images[i])
        assert label == labels[i] == row["label"]
        assert (meta["width"], meta["height"]) == (row["width"], row["height"]) == (28, 28)
        assert row["shard"] == i // 40 and row["index"] == i % 40
    assert {r["split"] for r in manifest} == {"train", "test"}


def test_rerun_is_byte_identical(fmnist_shards):
    out_dir, summary, (dataset, settings, out) = fmnist_shards
    before = {p.name: file_sha256(p) for p in out_dir.glob("*.tar")}
    manifest_before = file_sha256(out_dir / "manifest.parquet")
    for p in out_dir.glob("*.tar"):
        p.unlink()
    build_shards(dataset, settings, out_root=out, progress=False)
    assert {p.name: file_sha256(p) for p in out_dir.glob("*.tar")} == before
    assert file_sha256(out_dir / "manifest.parquet") == manifest_before


def test_up_to_date_shards_are_not_rewritten(fmnist_shards):
    out_dir, _, (dataset, settings, out) = fmnist_shards
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.tar")}
    build_shards(dataset, settings, out_root=out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.tar")} == mtimes


def test_shard_size_change_removes_stale_shards(fmnist_shards):
    out_dir, _, (dataset, settings, out) = fmnist_shards
    build_shards(dataset, {**settings, "samples_per_shard": 100}, out_root=out, progress=False)
    assert sorted(p.name for p in out_dir.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]


def test_interrupted_shard_is_not_accepted(tmp_path, fmnist_dir, monkeypatch):
    dataset, settings = _cfg("fm", "fashion_mnist", fmnist_dir)
    dataset["limit"], dataset["splits"] = 80, ["train"]
    out = tmp_path / "shards"
    real_encode = shards_mod.encode_item
    calls = {"n": 0}

    def dying_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 60:  # midway through the second shard
            raise KeyboardInterrupt("killed")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "encode_item", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        build_shards(dataset, settings, out_root=out, progress=False)
    names = sorted(p.name for p in (out / "fm").iterdir())
    assert "train-000001.tar" not in names and "manifest.parquet" not in names
    assert not any(".tmp-" in n for n in names), names

    monkeypatch.setattr(shards_mod, "encode_item", real_encode)
    calls["n"] = 0
    summary = build_shards(dataset, settings, out_root=out, progress=False)
    assert summary["splits"]["train"]["samples"] == 80
    assert len(_read_back(sorted((out / "fm").glob("train-*.tar")))) == 80


def _make_imagefolder(root, corrupt=True):
    rng = np.random.default_rng(0)
    expected = {}
    for cls in ("cat", "dog"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img{i}.png")
            expected[f"train_{cls}_img{i}"] = arr
    if corrupt:
        good = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good, format="JPEG")
        (root / "train" / "cat" / "broken.jpg").write_bytes(good.getvalue()[:200])  # truncated JPEG
        (root / "train" / "dog" / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return expected


def test_imagefolder_skips_and_reports_corrupt_images(tmp_path):
    expected = _make_imagefolder(tmp_path / "src")
    dataset, settings = _cfg("folder", "imagefolder", tmp_path / "src")
    dataset["splits"] = ["train"]
    summary = build_shards(dataset, settings, out_root=tmp_path / "shards", progress=False)
    assert summary["num_skipped"] == 2
    assert sorted(s["source"] for s in summary["skipped"]) == ["imagefolder:train/cat/broken.jpg",
                                                                "imagefolder:train/dog/noise.png"]
    samples = _read_back(sorted((tmp_path / "shards" / "folder").glob("*.tar")))
    assert {s[0] for s in samples} == set(expected)
    for key, img, label, meta in samples:
        np.testing.assert_array_equal(np.asarray(img), expected[key])
        assert label == (0 if "_cat_" in key else 1)
    assert json.loads((tmp_path / "shards" / "folder" / "dataset.json").read_text())["classes"] == ["cat", "dog"]


def test_imagefolder_strict_mode_names_the_file(tmp_path):
    _make_imagefolder(tmp_path / "src")
    dataset, settings = _cfg("folder", "imagefolder", tmp_path / "src", strict=True)
    dataset["splits"] = ["train"]
    with pytest.raises(ValueError, match=r"train/cat/broken\.jpg"):
        build_shards(dataset, settings, out_root=tmp_path / "shards", progress=False)
    assert not list((tmp_path / "shards" / "folder").glob("*.tar"))


def test_jpeg_passthrough_keeps_source_bytes(tmp_path):
    src = tmp_path / "src" / "val" / "n0001"
    src.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, format="JPEG", quality=80)
    (src / "a.JPEG").write_bytes(buf.getvalue())
    dataset, settings = _cfg("jp", "imagefolder", tmp_path / "src", image_format="jpg")
    dataset["splits"] = ["val"]
    build_shards(dataset, settings, out_root=tmp_path / "shards", progress=False)
    with tarfile.open(tmp_path / "shards" / "jp" / "val-000000.tar") as tar:
        assert tar.extractfile("val_n0001_a.jpg").read() == buf.getvalue()


def test_webdataset_source_round_trip(fmnist_shards, tmp_path):
    """Existing tars (here: our own output laid out as {path}/{split}/*.tar) re-shard losslessly."""
    out_dir, _, _ = fmnist_shards
    src = tmp_path / "wds_src" / "train"
    src.mkdir(parents=True)
    for p in sorted(out_dir.glob("train-*.tar")):
        (src / p.name).write_bytes(p.read_bytes())
    dataset, settings = _cfg("resharded", "webdataset", tmp_path / "wds_src", samples_per_shard=64)
    dataset["splits"] = ["train"]
    summary = build_shards(dataset, settings, out_root=tmp_path / "shards2", progress=False)
    assert summary["splits"]["train"]["samples"] == 100
    original = _read_back(sorted(out_dir.glob("train-*.tar")))
    resharded = _read_back(sorted((tmp_path / "shards2" / "resharded").glob("*.tar")))
    assert len(resharded) == 100
    for (_, img_a, lab_a, _), (key_b, img_b, lab_b, _) in zip(original, resharded):
        assert "." not in key_b
        np.testing.assert_array_equal(np.asarray(img_a), np.asarray(img_b))
        assert lab_a == lab_b


def test_webdataset_source_with_a_damaged_header_stops_naming_it(fmnist_shards, tmp_path):
    """tarfile alone would read the tar as 10 samples and re-shard them silently."""
    out_dir, _, _ = fmnist_shards
    src = tmp_path / "wds_src" / "train"
    src.mkdir(parents=True)
    tar = src / "train-000000.tar"
    data = bytearray((out_dir / "train-000000.tar").read_bytes())
    with tarfile.open(out_dir / "train-000000.tar") as t:
        info = t.getmember("train_000010.png")
    for i in range(info.offset + 100, info.offset + 116):   # 16 bytes of its header: the checksum fails
        data[i] ^= 0xFF
    tar.write_bytes(bytes(data))
    dataset, settings = _cfg("resharded", "webdataset", tmp_path / "wds_src")
    dataset["splits"] = ["train"]
    with pytest.raises(ValueError) as err:
        build_shards(dataset, settings, out_root=tmp_path / "shards2", progress=False)
    assert str(err.value) == (f"unreadable WebDataset tar {tar}: damaged tar header at byte {info.offset}, "
                              "after member train_000009.json")


def test_missing_dataset_path_says_where_it_looked(tmp_path):
    dataset, settings = _cfg("x", "fashion_mnist", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFound, match=r"nowhere.*dataset-fashion-mnist"):
        build_shards(dataset, settings, out_root=tmp_path / "shards", progress=False)
    dataset, settings = _cfg("x", "imagefolder", tmp_path)
    with pytest.raises(DatasetNotFound, match=r"looked for .*train"):
        build_shards(dataset, settings, out_root=tmp_path / "shards", progress=False)


def test_cli_shards_and_inspect(tmp_path, fmnist_dir):
    proc = run_cli("shards", "--json", json.dumps({"dataset": {"name": "c", "source": "fashion_mnist",
                   "path": str(fmnist_dir), "limit": 30, "splits": ["test"]}, "shards": {"samples_per_shard": 20}}),
                   "--out-root", tmp_path, "--quiet")
    assert "test: 30 images in 2 shards" in proc.stderr
    out = run_cli("inspect", tmp_path / "c" / "test-000001.tar", "--json").stdout
    summary = json.loads(out)
    assert summary["samples"] == 10 and summary["image_sizes"] == {"28x28 L": 10}
    assert sum(summary["label_histogram"].values()) == 10
    text = run_cli("inspect", tmp_path / "c" / "manifest.parquet").stdout
    assert "rows: 30" in text
    proc = run_cli("inspect", tmp_path / "nothing.tar", check=False)
    assert proc.returncode == 2 and "no such artifact" in proc.stderr
