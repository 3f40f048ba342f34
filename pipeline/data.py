"""Reading shards and making the image views every stage sees.

A *view* of an image is: resize the shorter side to `resize` (bicubic), crop a `crop` x `crop`
square (view 0: centre; views >= 1: random position, random horizontal flip, seeded by
(seed, key, view)), then, for the encoder, resize the crop to `image_size` with bicubic
interpolation without antialias (DiGIT feeds DINOv2 the 256-px VQGAN crop downsampled to 224 this
way). Crop parameters depend only on the seed, the key, the view and the image size, so the VQ
tokens of a later stage can be taken from exactly the same pixels as the DiGIT tokens.
"""
from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


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

@dataclass(frozen=True)
class ShardSample:
    key: str
    label: int
    image: tuple  # (offset, size) of the image member inside the tar


def index_shard(tar_path: str | Path) -> list[ShardSample]:
    """List a shard's samples in order, with byte offsets, without reading image data."""
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(tar_path, "r") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                if ext == "cls":
                    groups[key]["label"] = int(tar.extractfile(info).read())
                elif ext in IMAGE_EXTS:
                    groups[key]["image"] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"unreadable shard {tar_path}: {exc}") from exc
    missing = [k for k in order if "image" not in groups[k]]
    if missing:
        raise ValueError(f"{tar_path}: samples without an image member: {missing[:5]}")
    return [ShardSample(k, groups[k].get("label", -1), groups[k]["image"]) for k in order]


def read_image(tar_path: str | Path, sample: ShardSample) -> Image.Image:
    offset, size = sample.image
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


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
