"""Reading shards and making the image views every stage sees.

A *view* of an image is: resize the shorter side to `resize` (bicubic), crop a `crop` x `crop`
square (view 0: centre; views >= 1: random position, random horizontal flip, seeded by
(seed, key, view)), then, for the encoder, resize the crop to `image_size` with bicubic
interpolation without antialias (DiGIT feeds DINOv2 the 256-px VQGAN crop downsampled to 224 this
way). Crop parameters depend only on the seed, the key, the view and the image size, so the VQ
tokens of a later stage can be taken from exactly the same pixels as the DiGIT tokens.

Integrity: every reader goes through `index_shard` and `read_image`. When `manifest.parquet`
sits next to a shard (the shards stage writes it), the shard must hold exactly the manifest's
keys, in order, with its labels, and each image's bytes must have the sha1 it records; a tar
that is damaged (bad header, cut short) or an image that does not decode stops with `ShardError`
naming the shard and the key, with or without a manifest. A bare tar without a manifest (a test,
a hand-made shard) is read without the key and sha1 checks. The manifest is read once per
folder and process (re-read when it changes); checking a sha1 costs little next to decoding.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from .sources import DamagedTar, tar_members

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MANIFEST = "manifest.parquet"
SHARD_FILE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")   # the shards stage's `{split}-{i:06d}.tar`
REPAIR = "the shard is damaged; rewrite it with `python -m pipeline shards --verify` (same config)"


@dataclass(frozen=True)
class ViewSpec:
    resize: int       # shorter side after the first resize
    crop: int         # square crop taken from it (the VQ tokenizer's input size)
    image_size: int   # encoder input size
    mean: tuple
    std: tuple

    @classmethod
    def from_config(cls, enc: dict) -> "ViewSpec":
        return cls(enc["resize"], enc["crop"], enc["image_size"], tuple(enc["mean"]), tuple(enc["std"]))

    def to_dict(self) -> dict:
        """JSON-friendly, in the order the stages record it."""
        return {"resize": self.resize, "crop": self.crop, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std)}


# ---------------------------------------------------------------- shard index

class ShardError(ValueError):
    """A shard that is damaged or differs from its manifest.parquet; the message names the shard and the key."""

    def __init__(self, message: str):
        super().__init__(_original_message(message))


def _original_message(message: str) -> str:
    """A DataLoader worker re-raises ShardError(its traceback as text): keep the original one line."""
    if not message.startswith("Caught ShardError"):
        return message
    lines = [line for line in message.splitlines() if "ShardError: " in line]
    return lines[-1].split("ShardError: ", 1)[1] if lines else message


@dataclass(frozen=True)
class ShardSample:
    key: str
    label: int
    image: tuple  # (offset, size) of the image member inside the tar
    sha1: str | None = None  # of the image bytes, from manifest.parquet (None: no manifest to check against)


@dataclass(frozen=True)
class ManifestRow:
    key: str
    label: int
    sha1: str


_MANIFESTS: dict[str, tuple[tuple[int, int], pa.Table]] = {}   # path -> ((mtime_ns, size), table)


def manifest_rows(tar_path: str | Path) -> list[ManifestRow] | None:
    """The rows manifest.parquet (in the shard's folder) lists for this shard, in shard order.

    None when there is no manifest, or the file is not named `{split}-{i:06d}.tar` (not one of its shards).
    """
    tar_path = Path(tar_path)
    name = SHARD_FILE.match(tar_path.name)
    table = _manifest_table(tar_path.parent / MANIFEST) if name else None
    if table is None:
        return None
    mask = pc.and_(pc.equal(table["split"], name["split"]), pc.equal(table["shard"], int(name["index"])))
    rows = table.filter(mask).sort_by("index")
    return [ManifestRow(*row) for row in zip(*(rows[c].to_pylist() for c in ("key", "label", "sha1")))]


def _manifest_table(path: Path) -> pa.Table | None:
    """The manifest's columns the readers check, cached per folder; re-read when the file changes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    stamp, cache_key = (st.st_mtime_ns, st.st_size), os.path.abspath(path)
    cached = _MANIFESTS.get(cache_key)
    if cached is None or cached[0] != stamp:
        try:
            table = pq.read_table(path, columns=["key", "split", "shard", "index", "label", "sha1"])
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{path}: unreadable ({exc}); rerun the shards stage to rewrite it") from exc
        cached = _MANIFESTS[cache_key] = (stamp, table)
    return cached[1]


def index_shard(tar_path: str | Path) -> list[ShardSample]:
    """List a shard's samples in order, with byte offsets, without reading image data.

    Checked against manifest.parquet when there is one (keys in order, labels; the sha1 of each
    image goes into its ShardSample for `read_image`); ShardError on any difference or damage.
    """
    samples, damage = _scan_shard(tar_path)
    expected = manifest_rows(tar_path)
    if expected is not None:
        _require_manifest_keys(tar_path, samples, expected, damage)
    if damage:
        raise ShardError(f"{tar_path}: {damage}: {REPAIR}")
    missing = [s.key for s in samples if s.image is None]
    if missing:
        raise ShardError(f"{tar_path}: samples without an image member: {missing[:5]}: {REPAIR}")
    if expected is None:
        return samples
    return [replace(s, sha1=row.sha1) for s, row in zip(samples, expected)]


def _scan_shard(tar_path: str | Path) -> tuple[list[ShardSample], str | None]:
    """The samples the tar holds up to any damage, and the damage (None when the tar is whole)."""
    groups: dict[str, dict] = {}
    try:
        for tar, info in tar_members(tar_path):
            key, _, ext = info.name.partition(".")
            group = groups.setdefault(key, {})
            if ext == "cls":
                group["label"] = _read_label(tar, info, tar_path)
            elif ext in IMAGE_EXTS:
                group["image"] = (info.offset_data, info.size)
    except (DamagedTar, tarfile.TarError, EOFError) as exc:
        damage = str(exc)
    else:
        damage = None
    return [ShardSample(k, g.get("label", -1), g.get("image")) for k, g in groups.items()], damage


def _read_label(tar: tarfile.TarFile, info: tarfile.TarInfo, tar_path) -> int:
    data = tar.extractfile(info).read()
    try:
        return int(data)
    except ValueError:
        raise ShardError(f"{tar_path}: label member {info.name} holds {data[:20]!r}, not a number: {REPAIR}") from None


def _require_manifest_keys(tar_path, samples: list[ShardSample], expected: list[ManifestRow],
                           damage: str | None) -> None:
    """ShardError unless the shard holds the manifest's keys, in order, with its labels."""
    keys, want = [s.key for s in samples], [r.key for r in expected]
    where = f"; {damage}" if damage else ""
    if len(keys) != len(want):
        missing = _first_not_in(want, keys)
        detail = f"first missing key: {missing}" if missing else f"unexpected key: {_first_not_in(keys, want)}"
        raise ShardError(f"{tar_path}: {len(keys)} samples, {MANIFEST} lists {len(want)} ({detail}{where}): {REPAIR}")
    for i, (sample, row) in enumerate(zip(samples, expected)):
        if sample.key != row.key:
            raise ShardError(f"{tar_path}: sample {i} has key {sample.key}, {MANIFEST} lists {row.key}{where}: "
                             f"{REPAIR}")
        if sample.label != row.label:
            raise ShardError(f"{tar_path}: label of key {row.key} is {sample.label}, {MANIFEST} records {row.label}"
                             f"{where}: {REPAIR}")


def _first_not_in(keys: list[str], others: list[str]) -> str | None:
    other = set(others)
    return next((k for k in keys if k not in other), None)


def image_bytes(tar_path: str | Path, sample: ShardSample) -> bytes:
    """The stored bytes of one sample's image; ShardError if they are cut short or their sha1 is not the manifest's."""
    offset, size = sample.image
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ShardError(f"{tar_path}: image of key {sample.key} is cut short ({len(data)} of {size} bytes): {REPAIR}")
    if sample.sha1 is not None:
        digest = hashlib.sha1(data).hexdigest()
        if digest != sample.sha1:
            raise ShardError(f"{tar_path}: image of key {sample.key} has sha1 {digest}, {MANIFEST} records "
                             f"{sample.sha1}: {REPAIR}")
    return data


def read_image(tar_path: str | Path, sample: ShardSample) -> Image.Image:
    """Decode one sample's image as RGB; ShardError (naming the shard and the key) for bad bytes."""
    data = image_bytes(tar_path, sample)
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what PIL raises for corrupt data
        raise ShardError(f"{tar_path}: image of key {sample.key} does not decode ({type(exc).__name__}: {exc}): "
                         f"{REPAIR}") from exc


# ---------------------------------------------------------------- views

def view_params(seed: int, key: str, view: int, width: int, height: int, spec: ViewSpec) -> tuple[int, int, int]:
    """(left, top, flip) of the crop in the resized image; view 0 is the centre crop, unflipped."""
    rw, rh = resized_size(width, height, spec.resize)
    if view == 0:
        return (rw - spec.crop) // 2, (rh - spec.crop) // 2, 0
    digest = hashlib.sha256(f"{seed}/{key}/{view}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    left = int(rng.integers(0, rw - spec.crop + 1))
    top = int(rng.integers(0, rh - spec.crop + 1))
    return left, top, int(rng.integers(0, 2))


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    scale = shorter / min(width, height)
    return max(shorter, round(width * scale)), max(shorter, round(height * scale))


def crop_view(img: Image.Image, params: tuple[int, int, int], spec: ViewSpec) -> Image.Image:
    """The `crop` x `crop` RGB view (what a VQ tokenizer would see)."""
    size = resized_size(img.width, img.height, spec.resize)
    if size != img.size:
        img = img.resize(size, Image.BICUBIC)
    left, top, flip = params
    view = img.crop((left, top, left + spec.crop, top + spec.crop))
    return view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view


def to_tensor(view: Image.Image) -> torch.Tensor:
    arr = np.asarray(view, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # uint8 (3, H, W)


def encoder_input(views_uint8: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """uint8 (B,3,crop,crop) -> normalised float (B,3,image_size,image_size), as DiGIT feeds DINOv2."""
    x = views_uint8.float().div_(255.0)
    if spec.crop != spec.image_size:
        # DiGIT's own call: scale_factor (not size=), bicubic, no antialias.
        x = F.interpolate(x, scale_factor=spec.image_size / spec.crop, mode="bicubic", align_corners=False,
                          antialias=False)
        if x.shape[-1] != spec.image_size:
            raise ValueError(f"crop {spec.crop} does not scale to image_size {spec.image_size} exactly")
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def centre_views(tar_paths: list, spec: "ViewSpec", n_images: int) -> tuple[torch.Tensor, list[dict]]:
    """uint8 (N,3,crop,crop): view 0 (centre crop, unflipped, as the tokens stage's view 0) of the
    first `n_images` images of the shards in the given order (all of them if n_images <= 0)."""
    views, where = [], []
    for tar in tar_paths:
        for sample in index_shard(tar):
            if 0 < n_images <= len(views):
                break
            img = read_image(tar, sample)
            params = view_params(0, sample.key, 0, img.width, img.height, spec)  # view 0 ignores the seed
            views.append(to_tensor(crop_view(img, params, spec)))
            where.append({"shard": str(tar), "key": sample.key})
        if 0 < n_images <= len(views):
            break
    if not views:
        raise ValueError(f"no images in {list(map(str, tar_paths))}")
    return torch.stack(views), where


class ShardViews(torch.utils.data.Dataset):
    """Map-style dataset over one or more shards: item i -> (uint8 views (V,3,c,c), label, index, crop params (V,3)).

    Map-style (not an IterableDataset) so that DataLoader workers decode in parallel while the
    order stays the shard order.
    """

    def __init__(self, tar_paths, spec: ViewSpec, views=(0,), seed: int = 0):
        self.spec, self.views, self.seed = spec, tuple(views), seed
        self.entries = [(str(p), s) for p in tar_paths for s in index_shard(p)]

    def __len__(self):
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [s.key for _, s in self.entries]

    @property
    def labels(self) -> list[int]:
        return [s.label for _, s in self.entries]

    def __getitem__(self, i):
        path, sample = self.entries[i]
        img = read_image(path, sample)
        params = [view_params(self.seed, sample.key, v, img.width, img.height, self.spec) for v in self.views]
        crops = torch.stack([to_tensor(crop_view(img, p, self.spec)) for p in params])
        return crops, sample.label, i, torch.tensor(params, dtype=torch.int32)


# ---------------------------------------------------------------- in-memory views (the small trainers)

def original_size(tar_paths) -> tuple[int, int]:
    """Size of the first image (all images share it, see `load_resized_images`)."""
    return read_image(tar_paths[0], index_shard(tar_paths[0])[0]).size


def load_resized_images(tar_paths, spec: ViewSpec) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Decode every image once, resized (shorter side = spec.resize); tiny datasets only.

    Returns uint8 (N, H, W, 3), keys, labels. Views are then cut by slicing, with the same
    seeded crop parameters as the tokens stage (`view_params`), so no image is decoded twice.
    """
    from tqdm import tqdm

    data = ShardViews(tar_paths, spec)
    images, size = [], None
    for path, sample in tqdm(data.entries, desc="decode", unit="img", file=sys.stderr, mininterval=2):
        img = read_image(path, sample)
        img = img.resize(resized_size(img.width, img.height, spec.resize), Image.BICUBIC)
        if size is not None and img.size != size:
            raise ValueError(f"the tiny encoder trainer needs images of one size; {sample.key} is {img.size}, "
                             f"others {size}")
        size = img.size
        images.append(np.asarray(img, dtype=np.uint8))
    return np.stack(images), data.keys, np.asarray(data.labels, dtype=np.int64)


def cut_views(images: np.ndarray, keys: list[str], view: int, seed: int, spec: ViewSpec,
              sizes: tuple[int, int]) -> torch.Tensor:
    """uint8 (N,3,crop,crop): view `view` of every image (view 0 = centre crop); `sizes` is the
    images' size before resizing (`original_size`), which the crop parameters depend on."""
    c = spec.crop
    out = np.empty((len(images), c, c, 3), dtype=np.uint8)
    for i, key in enumerate(keys):
        left, top, flip = view_params(seed, key, view, sizes[0], sizes[1], spec)
        crop = images[i, top:top + c, left:left + c]
        out[i] = crop[:, ::-1] if flip else crop
    return torch.from_numpy(out).permute(0, 3, 1, 2)
