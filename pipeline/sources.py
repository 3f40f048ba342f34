"""Image sources for the shards stage: Fashion-MNIST idx files, ImageFolder trees, WebDataset tars.

Each source lists its samples as `SourceItem`s in a fixed, sorted order (so shards are
reproducible) without decoding any image; `read_ref_bytes` fetches one item's bytes.

`tar_members` is the one way tars are walked (source tars here, shards in `data.py` and in the
shards stage's check): unlike a bare `tarfile` loop, it does not read a tar with a damaged header
or cut at a member boundary as a shorter, valid one.
"""
from __future__ import annotations

import gzip
import io
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


def read_idx_shape(path: Path) -> tuple[int, ...]:
    """The dimensions an idx file's header declares, without reading its data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0:
            raise ValueError(f"{path}: not an idx file (bad magic)")
        return tuple(int(d) for d in np.frombuffer(f.read(4 * head[3]), dtype=">u4"))


def _fashion_mnist_paths(root: Path, split: str) -> tuple[Path, Path]:
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion_mnist has splits {sorted(FASHION_MNIST_FILES)}, not '{split}'")
    paths = tuple(root / name for name in FASHION_MNIST_FILES[split])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"Fashion-MNIST files not found: {', '.join(missing)}. {FASHION_MNIST_HELP}")
    return paths


def _check_counts(root: Path, split: str, images: int, labels: int) -> None:
    if images != labels:
        raise ValueError(f"{root}: {images} images but {labels} labels for split {split}")


def fashion_mnist_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _fashion_mnist_paths(root, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    _check_counts(root, split, len(images), len(labels))
    return images, labels


def list_fashion_mnist(root: Path, split: str) -> tuple[list[SourceItem], list[str]]:
    """Listing reads the labels and only the header of the images file (the shards that are up to
    date never need the pixels)."""
    images_path, labels_path = _fashion_mnist_paths(root, split)
    labels = read_idx(labels_path)
    _check_counts(root, split, read_idx_shape(images_path)[0], len(labels))
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

class DamagedTar(ValueError):
    """A tar that does not end cleanly; the message says where (byte, last good member)."""


def tar_members(tar_path: str | Path):
    """Yield (open TarFile, member) for every file member, in order; DamagedTar if the tar is damaged.

    `tarfile` stops silently at a header whose checksum fails, or at a cut between members; here
    the block after the last member must be the end-of-archive marker (zeros). Compressed tars
    (a source may be one) are walked without that check.
    """
    last = None
    try:
        with tarfile.open(tar_path, "r") as tar:
            for info in tar:
                last = info.name
                if info.isfile():
                    yield tar, info
            end = tar.offset if isinstance(tar.fileobj, io.BufferedReader) else None
    except FileNotFoundError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DamagedTar(f"unreadable {_after(last)}: {exc}") from exc
    problem = _end_problem(tar_path, end) if end is not None else None
    if problem:
        raise DamagedTar(f"{problem}, {_after(last)}")


def _after(member: str | None) -> str:
    return f"after member {member}" if member else "at the first member"


def _end_problem(tar_path: str | Path, offset: int) -> str | None:
    """What is at `offset` instead of the end-of-archive marker (None: the marker is there)."""
    with open(tar_path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return f"cut short at byte {offset + len(block)}"
    return f"damaged tar header at byte {offset}" if block.strip(b"\0") else None


def _group_tar_members(tar_path: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for _, info in tar_members(tar_path):
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
        except (DamagedTar, OSError) as exc:
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
