"""Image sources for the shards stage: Fashion-MNIST idx files, ImageFolder trees, WebDataset tars.

Each source lists its samples as `SourceItem`s in a fixed, sorted order (so shards are
reproducible) without decoding any image; `load_payload` fetches one item's bytes or pixels.
"""
from __future__ import annotations

import gzip
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_HELP = (
    "Fashion-MNIST ships in the Debian package 'dataset-fashion-mnist' "
    "(as root: apt-get install dataset-fashion-mnist; files land in /usr/share/datasets/fashion-mnist), "
    "or download the four *-ubyte.gz files from the Fashion-MNIST GitHub page into one folder "
    "and set dataset.path to it."
)


class DatasetNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class SourceItem:
    key: str          # WebDataset key: no dots, unique within the dataset
    label: int
    source: str       # human-readable origin, stored in {key}.json
    ref: tuple        # how to fetch the payload: ("idx", split, i) | ("file", path) | ("tar", path, offset, size)


def sanitize_key(text: str) -> str:
    """Make a WebDataset key: no dots (they start the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


# ---------------------------------------------------------------- Fashion-MNIST idx files

def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): big-endian header, then uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected uint8 idx data, got type code {dtype_code:#x}")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(tuple(dims))


def fashion_mnist_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion_mnist has splits {sorted(FASHION_MNIST_FILES)}, not '{split}'")
    images_name, labels_name = FASHION_MNIST_FILES[split]
    paths = [root / images_name, root / labels_name]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"Fashion-MNIST files not found: {', '.join(missing)}. {FASHION_MNIST_HELP}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels for split {split}")
    return images, labels


def list_fashion_mnist(root: Path, split: str) -> tuple[list[SourceItem], list[str]]:
    _, labels = fashion_mnist_split(root, split)
    items = [
        SourceItem(f"{split}_{i:06d}", int(label), f"fashion_mnist:{split}[{i}]", ("idx", split, i))
        for i, label in enumerate(labels)
    ]
    return items, list(FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------- ImageFolder (ImageNet layout)

def list_imagefolder(root: Path, split: str) -> tuple[list[SourceItem], list[str]]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetNotFound(
            f"ImageFolder split not found: looked for {split_dir} "
            f"(expected {root}/<split>/<class_name>/<image files>, e.g. ImageNet's train/n01440764/*.JPEG)"
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFound(f"no class folders in {split_dir} (expected {split_dir}/<class_name>/<images>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in files:
            rel = path.relative_to(split_dir).with_suffix("")
            key = sanitize_key(f"{split}/{rel}")
            items.append(SourceItem(key, label, f"imagefolder:{split}/{path.relative_to(split_dir)}", ("file", str(path))))
    return items, classes


# ---------------------------------------------------------------- existing WebDataset tars

def _group_tar_members(tar_path: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(tar_path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name
            stem, _, ext = Path(base).name.partition(".")
            prefix = str(Path(base).parent / stem) if "/" in base else stem
            groups.setdefault(prefix, {})[ext.lower()] = info
    return groups


def list_webdataset(root: Path, split: str, label_key: str = "cls") -> tuple[list[SourceItem], list[str]]:
    split_dir = root / split
    tars = sorted(split_dir.glob("*.tar")) if split_dir.is_dir() else []
    if not tars:
        raise DatasetNotFound(f"no WebDataset tars found: looked for {split_dir}/*.tar")
    items = []
    for tar_path in tars:
        try:
            groups = _group_tar_members(tar_path)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"unreadable WebDataset tar {tar_path}: {exc}") from exc
        for prefix, members in groups.items():
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            if image_ext is None:
                continue
            label = -1
            if label_key in members:
                m = members[label_key]
                label = int(read_ref_bytes(("tar", str(tar_path), m.offset_data, m.size)).decode().strip())
            info = members[image_ext]
            key = sanitize_key(f"{split}/{tar_path.stem}/{prefix}")
            items.append(SourceItem(key, label, f"webdataset:{tar_path.name}/{info.name}",
                                    ("tar", str(tar_path), info.offset_data, info.size)))
    labels = sorted({it.label for it in items if it.label >= 0})
    return items, [str(x) for x in labels]


def list_source(kind: str, root: Path, split: str, label_key: str = "cls") -> tuple[list[SourceItem], list[str]]:
    if not root.exists():
        hint = FASHION_MNIST_HELP if kind == "fashion_mnist" else "Set dataset.path in the config."
        raise DatasetNotFound(f"dataset path not found: looked in {root}. {hint}")
    if kind == "fashion_mnist":
        return list_fashion_mnist(root, split)
    if kind == "imagefolder":
        return list_imagefolder(root, split)
    if kind == "webdataset":
        return list_webdataset(root, split, label_key)
    raise ValueError(f"unknown dataset source '{kind}'")


def read_ref_bytes(ref: tuple) -> bytes:
    """Raw encoded bytes for a file or tar member reference."""
    if ref[0] == "file":
        return Path(ref[1]).read_bytes()
    if ref[0] == "tar":
        _, path, offset, size = ref
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: truncated member at offset {offset}")
        return data
    raise ValueError(f"no raw bytes for reference {ref!r}")
