"""Image inputs of the Inception metrics: folders of image files, .npz arrays, batches of uint8.

A source is an image array (uint8 (N,H,W[,C]) or (N,C,H,W)), an .npz of uint8 images (key
``images``, else ``arr_0`` as in ADM/OpenAI sample batches), a folder of PNG/JPEG/... files (read in
sorted order, recursively) or one image file. ``is_stats_npz`` tells an .npz of FID statistics
(``mu``/``sigma``) from one of images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def is_stats_npz(path: Path) -> bool:
    """True for an .npz holding FID statistics (``mu`` and ``sigma``) rather than images."""
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ValueError(f"{path}: cannot read .npz ({e})") from e


def list_image_files(folder: str | Path) -> list[Path]:
    """PNG/JPEG/... files under ``folder`` (recursively), sorted by relative path."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTS)}) found")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """One image file -> uint8 (H, W, 3) RGB (grayscale replicated, alpha dropped)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read image ({e})") from e


def load_npz_images(path: str | Path) -> np.ndarray:
    """uint8 images from an .npz: key ``images``, else ``arr_0`` (ADM/OpenAI style), else the only
    (or first) uint8 array with 3 or 4 dims."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read .npz ({e})") from e
    with z:
        keys = [k for k in ("images", "arr_0") if k in z.files]
        keys += [k for k in z.files if k not in keys]
        for k in keys:
            a = z[k]
            if a.dtype == np.uint8 and a.ndim in (3, 4):
                return a
        if "mu" in z.files and "sigma" in z.files:
            raise ValueError(f"{path}: holds FID statistics (mu, sigma), not images")
    raise ValueError(f"{path}: no uint8 image array (N,H,W[,C]) in keys {z.files}")


def _folder_batches(files: list[Path], batch_size: int) -> Iterator:
    """Decoded image files, ``batch_size`` at a time: one array, or a list when sizes differ."""
    for s in range(0, len(files), batch_size):
        ims = [read_image(f) for f in files[s:s + batch_size]]
        yield np.stack(ims) if len({im.shape for im in ims}) == 1 else ims


def _file_images(path: Path) -> np.ndarray:
    """The images of an .npz, or one image file as a batch of one."""
    if path.suffix.lower() == ".npz":
        return load_npz_images(path)
    if path.suffix.lower() in IMAGE_EXTS:
        return read_image(path)[None]
    raise ValueError(f"{path}: expected a folder of images, an .npz of uint8 images or an image file")


def image_batches(source, batch_size: int) -> tuple[int, Iterator]:
    """(number of images, iterator over batches) for an array, an .npz or a folder of images.

    Batches are uint8 arrays, or lists of (H, W, 3) arrays when a folder mixes sizes.
    """
    if isinstance(source, torch.Tensor):
        source = source.cpu().numpy()
    if isinstance(source, np.ndarray):
        arr = source
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir():
            files = list_image_files(path)
            return len(files), _folder_batches(files, batch_size)
        arr = _file_images(path)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {arr.dtype}")
    return len(arr), (arr[s:s + batch_size] for s in range(0, len(arr), batch_size))
