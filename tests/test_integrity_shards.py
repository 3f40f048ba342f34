"""Damaged shards on real Fashion-MNIST tars: the readers stop naming the shard and the key, the
shards stage rewrites the damaged tar byte-identical to the original.

Three kinds of damage, all in train-000001.tar at key train_000030 (sample 10 of 20):
16 bytes flipped in its image member's header, 16 bytes flipped inside its PNG data, and the tar
cut in the middle of that PNG.
"""
import hashlib
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import timm
import torch

from pipeline.config import validate_config
from pipeline.data import (REPAIR, ShardError, ShardViews, ViewSpec, centre_views, index_shard, load_resized_images,
                           read_image)
from pipeline.encoder_loading import TINY_BASE_MODEL, load_encoder, save_timm_encoder
from pipeline.shards import build_shards
from pipeline.tokens import tokenize_shard
from conftest import run_cli

SPEC = ViewSpec(resize=32, crop=28, image_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)
ENCODER_KWARGS = dict(img_size=28, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                      global_pool="avg", class_token=False)
TAR, KEY = "train-000001.tar", "train_000030"
KINDS = ("header", "png", "truncated")


def _configs(fmnist_dir):
    cfg = validate_config({"dataset": {"name": "fm", "source": "fashion_mnist", "path": str(fmnist_dir), "limit": 60,
                                       "splits": ["train", "test"]},
                           "shards": {"samples_per_shard": 20, "workers": 1}})
    return cfg["dataset"], cfg["shards"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, fmnist_dir):
    """shards/fm with 3 train + 3 test tars of 20 images, built once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("pristine") / "shards"
    build_shards(*_configs(fmnist_dir), out_root=root, progress=False)
    return root


@pytest.fixture
def shards(pristine, tmp_path):
    """A copy of the pristine shards (mtimes kept, as the shards stage recorded them)."""
    root = tmp_path / "shards"
    shutil.copytree(pristine, root)
    return root


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(TINY_BASE_MODEL, pretrained=False, **ENCODER_KWARGS)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_timm_encoder(path, TINY_BASE_MODEL, ENCODER_KWARGS, model.state_dict(), {"note": "random"})
    return path


def _member(tar_path, name) -> tarfile.TarInfo:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name)


def _flip(path, offset, n=16):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _damage(tar_path, kind) -> tarfile.TarInfo:
    """Damage the image member of KEY; returns that member as it was."""
    info = _member(tar_path, f"{KEY}.png")
    if kind == "header":
        _flip(tar_path, info.offset + 100)   # mode and uid fields: the header checksum fails
    elif kind == "png":
        _flip(tar_path, info.offset_data + info.size // 2)
    else:
        os.truncate(tar_path, info.offset_data + info.size // 2)
    return info


def _sha1_at(path, offset, size) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha1(f.read(size)).hexdigest()


def _manifest_sha1(root, key) -> str:
    import pyarrow.parquet as pq
    rows = pq.read_table(root / "fm" / "manifest.parquet").to_pylist()
    return next(r["sha1"] for r in rows if r["key"] == key)


def _reader_error(root, kind, info) -> str:
    """The exact ShardError message the readers give for each kind of damage."""
    tar = root / "fm" / TAR
    if kind == "header":
        return (f"{tar}: 10 samples, manifest.parquet lists 20 (first missing key: {KEY}; damaged tar header at byte "
                f"{info.offset}, after member train_000029.json): {REPAIR}")
    if kind == "png":
        return (f"{tar}: image of key {KEY} has sha1 {_sha1_at(tar, info.offset_data, info.size)}, manifest.parquet "
                f"records {_manifest_sha1(root, KEY)}: {REPAIR}")
    return (f"{tar}: 11 samples, manifest.parquet lists 20 (first missing key: train_000031; unreadable after member "
            f"{KEY}.png: unexpected end of data): {REPAIR}")


def _repair_detail(root, kind, info) -> str:
    """What the shards stage says is wrong with the damaged tar."""
    if kind == "header":
        return (f"10 of 20 samples intact (first damaged key: {KEY}; damaged tar header at byte {info.offset}, "
                f"after member train_000029.json)")
    if kind == "png":
        tar = root / "fm" / TAR
        return (f"image of key {KEY} has sha1 {_sha1_at(tar, info.offset_data, info.size)}, written with "
                f"{_manifest_sha1(root, KEY)}")
    return f"10 of 20 samples intact (first damaged key: {KEY}; unexpected end of data)"


def _all_samples(tar):
    """What a stage does with a shard: index it and decode every image."""
    return [read_image(tar, s) for s in index_shard(tar)]


# ---------------------------------------------------------------- readers stop, naming shard and key

@pytest.mark.parametrize("kind", KINDS)
def test_readers_name_the_shard_and_the_key(shards, kind):
    tar = shards / "fm" / TAR
    info = _damage(tar, kind)
    expected = _reader_error(shards, kind, info)
    readers = {
        "index + decode (features, tokens, vq tokens)": lambda: _all_samples(tar),
        "ShardViews (features, tokens)": lambda: [x for x in ShardViews([tar], SPEC)],
        "load_resized_images (train-vq, train-encoder)": lambda: load_resized_images([tar], SPEC),
        "centre_views (reference, stability)": lambda: centre_views([tar], SPEC, 0),
    }
    for name, read in readers.items():
        with pytest.raises(ShardError) as err:
            read()
        assert str(err.value) == expected, name
    assert isinstance(err.value, ValueError)


def test_undamaged_shards_read_as_before(shards):
    samples = index_shard(shards / "fm" / TAR)
    assert [s.key for s in samples] == [f"train_{i:06d}" for i in range(20, 40)]
    assert samples[10].sha1 == _manifest_sha1(shards, KEY)
    assert read_image(shards / "fm" / TAR, samples[10]).size == (28, 28)


def test_bare_tar_is_read_without_the_manifest_but_damage_is_still_caught(shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    good, bad = bare / "train-000000.tar", bare / TAR
    shutil.copy(shards / "fm" / "train-000000.tar", good)
    shutil.copy(shards / "fm" / TAR, bad)
    samples = index_shard(good)
    assert len(samples) == 20 and all(s.sha1 is None for s in samples)
    info = _damage(bad, "header")
    with pytest.raises(ShardError) as err:
        index_shard(bad)
    assert str(err.value) == (f"{bad}: damaged tar header at byte {info.offset}, after member train_000029.json: "
                              f"{REPAIR}")


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_stage_stops_without_writing(shards, encoder_file, tmp_path, kind):
    tar = shards / "fm" / TAR
    info = _damage(tar, kind)
    encoder = load_encoder(f"timm:{TINY_BASE_MODEL}", encoder_file, layer=3, img_size=28)
    centroids = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    out = tmp_path / "tokens" / "train-000001.npy"
    with pytest.raises(ShardError) as err:
        tokenize_shard(tar, out, encoder, centroids, SPEC, views=2, batch_size=8, progress=False)
    assert str(err.value) == _reader_error(shards, kind, info)
    assert not out.parent.exists() or not list(out.parent.iterdir())


def _error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_cli_features_with_a_worker_gives_one_error_line(shards, encoder_file, tmp_path):
    """A DataLoader worker (encoder.num_workers: 1, the default config's) re-raises the same one line."""
    tar = shards / "fm" / TAR
    info = _damage(tar, "png")
    settings = json.dumps({"encoder": {"resize": 32, "crop": 28, "image_size": 28, "mean": [0.5] * 3,
                                       "std": [0.5] * 3, "batch_size": 8, "num_workers": 1, "train": {}}})
    out = tmp_path / "features" / "train-000001.zarr"
    proc = run_cli("features", "--json", settings, "--shard", tar, "--encoder", encoder_file, "--out", out, "--quiet",
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [f"error: {_reader_error(shards, 'png', info)}"]
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_cli_train_encoder_stops_instead_of_training_on_fewer_images(shards, tmp_path):
    tar = shards / "fm" / TAR
    info = _damage(tar, "header")
    settings = json.dumps({"encoder": {"resize": 32, "crop": 28, "image_size": 28, "mean": [0.5] * 3,
                                       "std": [0.5] * 3, "train": {"embed_dim": 16, "depth": 3, "num_heads": 1,
                                                                   "epochs": 1}}})
    out = tmp_path / "enc.pt"
    proc = run_cli("train-encoder", "--json", settings, "--train", shards / "fm" / "train-000000.tar", tar,
                   "--test", shards / "fm" / "test-000000.tar", "--out", out, "--quiet", check=False)
    assert proc.returncode == 2
    assert _error_lines(proc) == [f"error: {_reader_error(shards, 'header', info)}"]
    assert not out.exists()


# ---------------------------------------------------------------- the shards stage repairs

@pytest.mark.parametrize("kind", KINDS)
def test_normal_run_rewrites_a_tar_damaged_in_place(shards, pristine, fmnist_dir, capsys, kind):
    tar = shards / "fm" / TAR
    info = _damage(tar, kind)
    detail = _repair_detail(shards, kind, info)
    capsys.readouterr()
    build_shards(*_configs(fmnist_dir), out_root=shards, progress=False)
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == ["[shards] fm: 6 shards planned, 5 up to date, 1 to write",
                       f"[shards] {TAR} is damaged ({detail}): rewriting it",
                       f"[shards] repaired 1 damaged tar(s) from the source: {TAR}"]
    assert tar.read_bytes() == (pristine / "fm" / TAR).read_bytes()
    assert (shards / "fm" / "manifest.parquet").read_bytes() == (pristine / "fm" / "manifest.parquet").read_bytes()
    assert len(_all_samples(tar)) == 20


def _bit_rot(tar, kind) -> tarfile.TarInfo:
    """Damage that keeps the tar's size and mtime."""
    st = tar.stat()
    info = _damage(tar, kind)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    return info


@pytest.mark.parametrize("kind", ["header", "png"])
def test_verify_catches_damage_that_kept_size_and_mtime(shards, pristine, fmnist_dir, capsys, kind):
    """Bit rot: the normal run keeps the tar (it compares size and mtime, documented); verify rewrites it."""
    tar = shards / "fm" / TAR
    detail = _repair_detail(shards, kind, _bit_rot(tar, kind))
    capsys.readouterr()
    build_shards(*_configs(fmnist_dir), out_root=shards, progress=False)
    assert capsys.readouterr().err.splitlines()[0] == "[shards] fm: 6 shards planned, 6 up to date, 0 to write"
    assert tar.read_bytes() != (pristine / "fm" / TAR).read_bytes()

    build_shards(*_configs(fmnist_dir), out_root=shards, progress=False, verify=True)
    assert capsys.readouterr().err.splitlines()[:3] == [
        "[shards] fm: 6 shards planned, 5 up to date, 1 to write (every tar hashed: 1 damaged)",
        f"[shards] {TAR} is damaged ({detail}): rewriting it",
        f"[shards] repaired 1 damaged tar(s) from the source: {TAR}"]
    assert tar.read_bytes() == (pristine / "fm" / TAR).read_bytes()
    build_shards(*_configs(fmnist_dir), out_root=shards, progress=False, verify=True)
    assert "6 up to date, 0 to write (every tar hashed: 0 damaged)" in capsys.readouterr().err


def test_cli_shards_verify_reports_the_repair(shards, pristine, fmnist_dir):
    tar = shards / "fm" / TAR
    detail = _repair_detail(shards, "png", _bit_rot(tar, "png"))
    cfg = json.dumps({"dataset": {"name": "fm", "source": "fashion_mnist", "path": str(fmnist_dir), "limit": 60,
                                  "splits": ["train", "test"]}, "shards": {"samples_per_shard": 20, "workers": 1}})
    proc = run_cli("shards", "--json", cfg, "--out-root", shards, "--quiet", "--verify")
    assert proc.stderr.splitlines() == [
        "[shards] fm: 6 shards planned, 5 up to date, 1 to write (every tar hashed: 1 damaged)",
        f"[shards] {TAR} is damaged ({detail}): rewriting it",
        f"[shards] repaired 1 damaged tar(s) from the source: {TAR}",
        "[shards] fm: train: 60 images in 3 shards, test: 60 images in 3 shards; 0 unreadable skipped"]
    assert tar.read_bytes() == (pristine / "fm" / TAR).read_bytes()


def test_copied_shards_are_hashed_once_not_rewritten(pristine, fmnist_dir, tmp_path, capsys):
    """A copy gets new mtimes: each tar is hashed, found intact, kept, and its new mtime recorded."""
    root = tmp_path / "copy"
    shutil.copytree(pristine, root, copy_function=shutil.copyfile)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "fm").glob("*.tar")}
    build_shards(*_configs(fmnist_dir), out_root=root, progress=False)
    assert "6 up to date, 0 to write" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (root / "fm").glob("*.tar")} == mtimes
    state = json.loads((root / "fm" / ".state" / "train-000001.json").read_text())
    assert state["mtime_ns"] == mtimes[TAR]
