"""`python -m pipeline init`: a validated config for one's own data and weights, that plans the whole DAG.

A small ImageFolder (train/ and val/, 3 classes x 20 real Fashion-MNIST images each) gets a config
from `init`; the real shards checkpoint runs on it (tiny) and a dry run plans every rule downstream:
with the tiny tokenizers trained by the DAG, and with weight files in the real formats (a random
DINOv2 ViT-S/14 in the official layout, a random taming-format VQGAN), which are loaded and not
trained. Errors are checked word for word.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import fake_imagenet as fi
from conftest import run_cli, run_snakemake
from pipeline import cli
from pipeline.config import validate_config
from pipeline.init_config import make_config_text
from pipeline.sources import fashion_mnist_split

N_CLASSES, PER_SPLIT = 3, 20
IMAGENET_MEAN = [0.485, 0.456, 0.406]
# Every rule of the DAG, from the tokenizers to the report (the shards checkpoint has run already).
DOWNSTREAM = {"features", "kmeans", "tokens", "vq_tokens", "train_stage1", "sample_stage1", "probe_stage1",
              "train_stage2", "train_stage2_nar", "train_maskgit", "sample_maskgit", "render_digit",
              "render_digit_nar", "render_vq", "reference", "score", "stability", "report", "all"}


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory, fmnist_dir) -> Path:
    """{root}/{train,val}/class_{c}/*.png, 20 real images per class and split; the name needs sanitising."""
    root = tmp_path_factory.mktemp("data") / "my images.v1"
    images, labels = fashion_mnist_split(fmnist_dir, "test")
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)[: 2 * PER_SPLIT]
        for split, part in (("train", idx[:PER_SPLIT]), ("val", idx[PER_SPLIT:])):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in part:
                Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One Snakemake working directory for the module: both configs share the dataset's shards."""
    return tmp_path_factory.mktemp("work")


def plan(workdir: Path, configfile: Path) -> fi.Plan:
    """Run the shards checkpoint for real (a no-op once done), then dry-run the whole DAG."""
    name = yaml.safe_load(configfile.read_text())["dataset"]["name"]
    run_snakemake(f"shards/{name}/manifest.parquet", workdir=workdir, configfile=configfile)
    proc = run_snakemake("-n", workdir=workdir, configfile=configfile)
    text = proc.stdout + proc.stderr
    jobs, counts = fi.parse_dry_run(text)
    assert "<TBD>" not in text and counts, text[-3000:]
    assert "shards" not in counts, "the shards checkpoint is done and must not be planned again"
    return fi.Plan(jobs, counts, 0.0, 0.0, text)


def comment_above(text: str, key: str) -> str:
    """The comment block right above a top-level key, as one line."""
    lines = text.splitlines()
    i = lines.index(f"{key}:")
    block = []
    while i > 0 and lines[i - 1].startswith("# "):
        i -= 1
        block.insert(0, lines[i][2:])
    return " ".join(block)


def check_splits(cfg: dict, train: str, test: str) -> None:
    """Every key naming a split is written and names the training or the evaluation split."""
    assert cfg["dataset"]["splits"] == [train, test] and cfg["tokens"]["splits"] == [train, test]
    for section in (cfg["train"], cfg["stage2"]["train"], cfg["stage2_nar"]["train"], cfg["maskgit"]["train"]):
        assert section["splits"] == [train]
    assert cfg["kmeans"]["split"] == train
    assert (cfg["probe"]["train_split"], cfg["probe"]["test_split"]) == (train, test)
    assert cfg["evaluate"]["reference_split"] == test


def test_init_imagefolder_plans_the_whole_dag(imagefolder, workdir, tmp_path):
    out = tmp_path / "cfg.yaml"
    proc = run_cli("init", "--imagefolder", imagefolder, "--out", out)
    assert proc.stdout.startswith(f"wrote {out}: dataset my_images_v1 (imagefolder)"), proc.stdout
    text = out.read_text()
    cfg = yaml.safe_load(text)
    validate_config(cfg)
    # a comment above every top-level section
    lines = text.splitlines()
    tops = [i for i, line in enumerate(lines) if re.match(r"^[a-z0-9_]+:", line)]
    assert len(tops) == len(cfg) >= 14
    assert all(lines[i - 1].startswith("# ") for i in tops), text
    assert (cfg["run"], cfg["dataset"]["name"]) == ("my_images_v1", "my_images_v1")
    assert cfg["dataset"]["source"] == "imagefolder" and cfg["dataset"]["path"] == str(imagefolder)
    assert comment_above(text, "dataset").startswith(
        "Your images (imagefolder): 3 classes (the class folders of split 'train'). Training split 'train', "
        "evaluation split 'val'.")
    check_splits(cfg, "train", "val")
    # no weights: the tiny encoder and VQGAN are trained, with the demo's views
    enc, vq = cfg["encoder"], cfg["vq"]
    assert enc["checkpoint"] is None and enc["train"]["patch_size"] == 4
    assert (enc["resize"], enc["crop"], enc["image_size"]) == (30, 28, 28)
    assert "min_test_accuracy" not in enc["train"], "the demo's Fashion-MNIST floor is not for other data"
    assert vq["checkpoint"] is None and vq["train"] and vq["preset"] == "tiny"
    # without --out the same YAML goes to stdout
    assert run_cli("init", "--imagefolder", imagefolder).stdout == text

    p = plan(workdir, out)
    assert DOWNSTREAM | {"train_encoder", "train_vq"} <= set(p.counts), p.counts
    per_shard = fi.shards_per_rule(p)
    for rule in ("tokens", "vq_tokens"):   # 60 images per split: one shard each
        assert per_shard[rule] == {"train": {"000000"}, "val": {"000000"}}, per_shard


def test_init_with_weights_plans_no_tokenizer_training(imagefolder, workdir, tmp_path):
    from pipeline.encoder_fixtures import build_random_dinov2, save_official_checkpoint
    from pipeline.encoder_loading import load_encoder
    from pipeline.models.vqgan import preset
    from pipeline.vq import load_configured_vq
    from test_vqgan import random_taming_sd, save_ckpt

    encoder = save_official_checkpoint(build_random_dinov2("dinov2_vits14"), tmp_path / "dinov2_vits14.pth")
    vq_file = tmp_path / "vqgan.ckpt"
    save_ckpt(vq_file, random_taming_sd(preset("tiny")))   # taming layout, with loss.* keys and global_step
    out = tmp_path / "cfg.yaml"
    run_cli("init", "--imagefolder", imagefolder, "--encoder-weights", encoder, "--encoder-arch", "dinov2_vits14",
            "--vq-weights", vq_file, "--vq-preset", "tiny", "--name", "fm3", "--out", out)
    text = out.read_text()
    cfg = validate_config(yaml.safe_load(text))
    assert cfg["run"] == cfg["dataset"]["name"] == "fm3"
    check_splits(cfg, "train", "val")
    enc, vq = cfg["encoder"], cfg["vq"]
    assert enc["train"] is None and enc["checkpoint"] == str(encoder) and enc["arch"] == "dinov2_vits14"
    assert vq["train"] is None and vq["checkpoint"] == str(vq_file) and vq["preset"] == "tiny"
    # DINOv2 views; the crop is what this VQGAN takes (28 px), seen by DINOv2 at 224
    assert (enc["resize"], enc["crop"], enc["image_size"]) == (28, 28, 224) and enc["mean"] == IMAGENET_MEAN
    assert "Frozen dinov2_vits14 from" in comment_above(text, "encoder")
    # the files and the settings fit together: both load as configured
    model, meta, _ = load_configured_vq(cfg["vq"])
    assert meta["format"] == "taming" and model.grid_size == 7
    load_encoder(enc["arch"], enc["checkpoint"], enc["layer"], enc["image_size"], compute_sha256=False)

    p = plan(workdir, out)
    assert "train_encoder" not in p.counts and "train_vq" not in p.counts, p.counts
    assert DOWNSTREAM <= set(p.counts), p.counts


def test_paper_sizes_and_a_tiny_vqgan_built_for_dinov2_views(imagefolder, tmp_path):
    from pipeline.models.vqgan import preset
    weights = tmp_path / "dinov2.pth"
    weights.write_bytes(b"not loaded by init")
    _, cfg, _ = make_config_text(imagefolder=str(imagefolder), encoder_weights=str(weights), base="imagenet_base")
    assert cfg["train"]["preset"] == "base" and cfg["kmeans"]["k"] == 8192
    enc, vq = cfg["encoder"], cfg["vq"]
    assert (enc["arch"], enc["resize"], enc["crop"], enc["image_size"]) == ("dinov2_vitb14_reg4", 256, 256, 224)
    # no VQGAN file: the tiny one is trained, built for 256-px crops with a 16x16 grid like DINOv2's
    assert vq["checkpoint"] is None and vq["train"] is not None
    assert preset(vq["preset"], **vq["model"]).resolution == 256
    assert preset(vq["preset"], **vq["model"]).grid_size == 16
    check_splits(cfg, "train", "val")


def test_fashion_mnist(fmnist_dir):
    text, cfg, info = make_config_text(fashion_mnist=str(fmnist_dir))
    assert cfg["dataset"] == {"name": "fashion_mnist", "source": "fashion_mnist", "path": str(fmnist_dir.resolve()),
                              "splits": ["train", "test"], "shuffle_seed": None, "limit": None}
    assert info.num_classes == 10 and "10 classes (Fashion-MNIST's classes)" in comment_above(text, "dataset")
    assert cfg["encoder"]["train"]["min_test_accuracy"] == 0.76   # the demo's floors hold for its own data
    check_splits(cfg, "train", "test")


def _tar(path: Path, samples: list[tuple[str, int | str]], image: bytes) -> None:
    import io
    import tarfile
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, label in samples:
            for ext, data in (("png", image), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_classes_are_a_lower_bound(imagefolder, tmp_path):
    image = next((imagefolder / "train" / "class_0").glob("*.png")).read_bytes()
    root = tmp_path / "wds"
    _tar(root / "train" / "000000.tar", [(f"a{i}", i % 2) for i in range(4)], image)
    _tar(root / "train" / "000001.tar", [(f"b{i}", 2) for i in range(4)], image)
    _tar(root / "train" / "000002.tar", [(f"c{i}", 5) for i in range(4)], image)
    _tar(root / "validation" / "000000.tar", [("d0", 0)], image)
    _tar(root / "web_extra" / "000000.tar", [("e0", 0)], image)   # the last split: not the evaluation split
    text, cfg, _ = make_config_text(webdataset=str(root))
    validate_config(cfg)
    assert cfg["dataset"]["label_key"] == "cls" and cfg["shards"]["image_format"] == "png"
    check_splits(cfg, "train", "validation")
    assert comment_above(text, "dataset").startswith(
        "Your images (webdataset): at least 3 classes (distinct '.cls' labels, from 0 to 2, in the first 2 of 3 "
        "tars of split 'train'). Training split 'train', evaluation split 'validation'. Also found, not used: "
        "web_extra.")
    with pytest.raises(ValueError) as exc:
        make_config_text(webdataset=str(root), label_key="label")
    assert str(exc.value) == (f"--webdataset: no '.label' label members in {root}/train/000000.tar, "
                              f"{root}/train/000001.tar; pass --label-key EXT (the member extension that holds the "
                              "integer label)")


def error_of(capsys, *argv) -> str:
    assert cli.main(["init", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_errors_word_for_word(imagefolder, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert error_of(capsys, "--imagefolder", missing) == f"error: --imagefolder: no such folder: {missing}\n"
    assert error_of(capsys) == ("error: init needs exactly one dataset source: --imagefolder PATH, --webdataset "
                                "PATH or --fashion-mnist [PATH]\n")
    assert error_of(capsys, "--imagefolder", imagefolder, "--fashion-mnist") == (
        "error: init needs exactly one dataset source: --imagefolder PATH, --webdataset PATH or --fashion-mnist "
        "[PATH]; got --imagefolder and --fashion-mnist\n")
    flat = tmp_path / "flat"   # images, no split folders
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    assert error_of(capsys, "--imagefolder", flat) == (
        f"error: --imagefolder: no split folders in {flat} (expected {flat}/<split>/<class>/<images>, e.g. train/ "
        "and val/)\n")
    one_split = tmp_path / "one"   # a split folder holding images, no class folders
    (one_split / "train").mkdir(parents=True)
    (one_split / "train" / "a.png").write_bytes(b"")
    assert error_of(capsys, "--imagefolder", one_split) == (
        f"error: --imagefolder: split folder {one_split}/train has no class folders (expected "
        f"{one_split}/train/<class>/<images>; is {one_split} itself one split?)\n")
    assert error_of(capsys, "--imagefolder", imagefolder, "--encoder-weights", missing) == (
        f"error: --encoder-weights: no such file: {missing}\n")
    assert error_of(capsys, "--imagefolder", imagefolder, "--vq-preset", "tiny") == (
        "error: --vq-preset applies only with --vq-weights\n")
    assert error_of(capsys, "--imagefolder", imagefolder, "--name", "my run") == (
        "error: --name: 'my run' may hold only letters, digits, _ and -\n")

    out = tmp_path / "cfg.yaml"
    out.write_text("mine\n")
    assert error_of(capsys, "--imagefolder", imagefolder, "--out", out) == (
        f"error: --out: {out} exists; pass --force to overwrite it\n")
    assert out.read_text() == "mine\n"
    assert cli.main(["init", "--imagefolder", str(imagefolder), "--out", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["dataset"]["splits"] == ["train", "val"]


def test_splits_must_hold_the_same_classes(tmp_path, capsys):
    root = tmp_path / "d"
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat",))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            (root / split / c / "x.png").write_bytes(b"")
    assert error_of(capsys, "--imagefolder", root) == (
        "error: --imagefolder: split 'test' has other class folders than 'train' (missing: dog; extra: -); labels "
        "are the index of the sorted class folder, so every split needs the same classes\n")
