"""Reading encoder weights from disk and building the frozen `PatchEncoder` from them.

Weights are only ever read from disk (nothing is downloaded), in any layout of
`pipeline.encoder_layouts` (``official``, ``timm``, ``hf``; files ``.pth``/``.bin``/``.safetensors``
or a directory holding ``model.safetensors``/``pytorch_model.bin``, sharded or not), or in
``digit-timm-encoder``: our own file for any timm ViT (see `save_timm_encoder`), used for the tiny
encoder the CPU demo trains itself, loaded with ``arch="timm:<model_name>"``.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ConfigError
from .encoder_fixtures import build_random_dinov2
from .encoder_layouts import (StateDict, block_count, official_to_timm_state_dict, strip_prefix,
                              to_official_state_dict, validate_official_state_dict)
from .io import atomic_path, file_sha256, load_torch
from .models.patch_encoder import (DINOV2_ARCHS, PatchEncoder, dinov2_spec, empty_timm_model, grid_for,
                                   resample_timm_pos_embed, resolve_block_index, wrap_truncated_vit)
from .models.state_dicts import load_exact, name_keys

Tensor = torch.Tensor

TIMM_ENCODER_FORMAT = "digit-timm-encoder"
TIMM_ENCODER_VERSION = 1
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------- reading files


def _missing_weights_error(path: Path, arch: str | None) -> FileNotFoundError:
    hint = ""
    if arch in DINOV2_ARCHS:
        hint = (
            f" The official {arch} weights are {DINOV2_ARCHS[arch].weights_url}; fetch them on a "
            "machine with internet access and copy them here (timm or Hugging Face weights on disk "
            "work too)."
        )
    return FileNotFoundError(
        f"encoder weights not found: {path}. This pipeline never downloads weights.{hint}"
    )


def _weight_files(path: Path, arch: str | None) -> list[Path]:
    """The file(s) holding the weights: the path itself, or the standard names in a directory."""
    if not path.exists():
        raise _missing_weights_error(path, arch)
    if path.is_file():
        return [path]
    for name in _INDEX_FILES:
        if (path / name).is_file():
            shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
            files = [path / s for s in shards]
            for f in files:
                if not f.is_file():
                    raise _missing_weights_error(f, arch)
            return files
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise _missing_weights_error(path / f"{{{','.join(_WEIGHT_FILES)}}}", arch)


def _read_file(path: Path) -> dict[str, Any]:
    """The dict in one weights file (tensors and plain data only); ValueError naming it if damaged."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors' own error types: truncated header, bad offsets, ...
            raise ValueError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from e
    obj = load_torch(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def read_checkpoint(
    path: str | Path, arch: str | None = None, sha256: bool = True
) -> tuple[dict[str, Any], str | None]:
    """Load a checkpoint file or directory -> (contents, sha256 of the weights or None).

    The hash is the file's sha256; for sharded directories, the sha256 of the lines
    ``<shard name> <sha256>`` (sorted). Contents are a state dict, or our timm-encoder dict.
    """
    files = _weight_files(Path(path), arch)
    contents: dict[str, Any] = {}
    for f in files:
        contents.update(_read_file(f))
    if not sha256:
        digest = None
    elif len(files) == 1:
        digest = file_sha256(files[0])
    else:
        lines = "".join(f"{f.name} {file_sha256(f)}\n" for f in files)
        digest = hashlib.sha256(lines.encode()).hexdigest()
    return contents, digest


def _unwrap_state_dict(obj: Mapping[str, Any]) -> StateDict:
    """Accept common wrappers: {'model': sd}, {'state_dict': sd}, DINOv2 training {'teacher': ...}."""
    for key in ("teacher", "model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if any(k.startswith("backbone.") for k in obj):  # training checkpoint: drop the heads
        obj = {k: v for k, v in obj.items() if k.startswith("backbone.")}
    state = {strip_prefix(k, ("module.", "backbone.")): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries are not tensors: {name_keys(bad)}")
    return state


# ----------------------------------------------------------------------------- our timm-encoder file


def is_timm_encoder_file(obj: Mapping[str, Any]) -> bool:
    return obj.get("format") == TIMM_ENCODER_FORMAT


TINY_BASE_MODEL = "vit_tiny_patch16_224"  # the tiny encoder's timm family member (every size overridden)

def save_timm_encoder(
    path: str | Path,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save a timm VisionTransformer in our own format, loadable with ``load_encoder("timm:<name>")``.

    The file is a ``torch.save`` dict: ``format``, ``version``, ``arch`` ("timm:<name>"),
    ``model_name``, ``model_kwargs`` (what ``timm.create_model`` needs besides the name, e.g.
    embed_dim/depth/patch_size/img_size), ``state_dict`` and ``meta`` (``extra_meta``, e.g. the
    training run). kwargs and meta must be JSON-serialisable (checked), so the file loads with
    ``torch.load(weights_only=True)``.
    """
    model_name = model_name.removeprefix("timm:")
    payload = {
        "format": TIMM_ENCODER_FORMAT,
        "version": TIMM_ENCODER_VERSION,
        "arch": f"timm:{model_name}",
        "model_name": model_name,
        "model_kwargs": json.loads(json.dumps(dict(model_kwargs))),
        "meta": json.loads(json.dumps(dict(extra_meta or {}))),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_timm_encoder_file(path: str | Path) -> dict[str, Any]:
    """Read a `save_timm_encoder` file (the whole dict); ValueError if it is something else."""
    contents, _ = read_checkpoint(path, sha256=False)
    if not is_timm_encoder_file(contents):
        raise ValueError(f"{path} is not a {TIMM_ENCODER_FORMAT} file (keys: {name_keys(contents)})")
    return contents


# ----------------------------------------------------------------------------- building the encoder


def load_encoder(
    arch: str,
    checkpoint: str | Path | None,
    layer: int | str = 3,
    img_size: int = 224,
    *,
    seed: int = 0,
    compute_sha256: bool = True,
) -> PatchEncoder:
    """Build the frozen patch-feature encoder.

    arch: ``dinov2_vit{s,b,l,g}14[_reg4]`` or ``timm:<model_name>`` (any timm VisionTransformer;
    weights in our `save_timm_encoder` format or a plain timm state dict).
    checkpoint: a weights file or directory (layout detected from the keys, see the module
    docstring); None gives seeded random weights (``seed``) for tests and dry runs.
    layer: see `resolve_block_index` (3 = DiGIT's third block from the end; "block:9" explicit).
    Blocks after the chosen one are not even built. ``compute_sha256=False`` skips hashing the
    weights (``weights_sha256`` is then None).
    """
    if arch.startswith("timm:"):
        return _load_generic_timm(arch, checkpoint, layer, img_size, seed, compute_sha256)
    spec = dinov2_spec(arch)
    grid = grid_for(img_size, spec.patch_size)
    block_index = resolve_block_index(layer, spec.depth)  # fail before reading a large file
    digest = None
    if checkpoint is None:
        official, layout = build_random_dinov2(arch, seed), "random"
    else:
        contents, digest = read_checkpoint(checkpoint, arch, sha256=compute_sha256)
        if is_timm_encoder_file(contents):
            contents = contents["state_dict"]
        official, layout = to_official_state_dict(_unwrap_state_dict(contents), arch)
    validate_official_state_dict(official, spec)
    vit = empty_timm_model(spec.timm_name, img_size=img_size, depth=block_index + 1, num_classes=0)
    timm_state = official_to_timm_state_dict(official, arch, grid=grid, n_blocks=block_index + 1)
    load_exact(vit, timm_state, f"timm {spec.timm_name} (blocks 0..{block_index})")
    return wrap_truncated_vit(vit, arch, layer, block_index, spec.depth, img_size, checkpoint, layout, digest)


def _load_generic_timm(
    arch: str, checkpoint: str | Path | None, layer: int | str, img_size: int, seed: int, compute_sha256: bool
) -> PatchEncoder:
    """``timm:<name>``: any timm VisionTransformer; position embeddings resampled the DINOv2 way."""
    model_kwargs: dict[str, Any] = {}
    state: StateDict | None = None
    digest, layout = None, "random"
    if checkpoint is not None:
        contents, digest = read_checkpoint(checkpoint, sha256=compute_sha256)
        if is_timm_encoder_file(contents):
            if contents["arch"] != arch:
                raise ValueError(f"{checkpoint} holds {contents['arch']!r}, not {arch!r}")
            model_kwargs, state = dict(contents["model_kwargs"]), dict(contents["state_dict"])
            layout = TIMM_ENCODER_FORMAT
        else:
            state, layout = _unwrap_state_dict(contents), "timm"
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    kwargs = {**model_kwargs, "img_size": img_size, "num_classes": 0, "dynamic_img_size": False}
    if state is None:
        vit, block_index, depth = _random_timm_vit(arch, kwargs, layer, seed)
    else:
        vit, block_index, depth = _timm_vit_from_state(arch, kwargs, layer, state)
    return wrap_truncated_vit(vit, arch, layer, block_index, depth, img_size, checkpoint, layout, digest)


def _random_timm_vit(arch: str, kwargs: dict, layer: int | str, seed: int) -> tuple[nn.Module, int, int]:
    """A seeded random timm ViT cut after the chosen block -> (vit, block index, full depth)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = timm.create_model(arch.removeprefix("timm:"), pretrained=False, **kwargs)
    _check_vision_transformer(vit, arch)
    depth = len(vit.blocks)
    block_index = resolve_block_index(layer, depth)
    vit.blocks = vit.blocks[: block_index + 1]
    return vit, block_index, depth


def _timm_vit_from_state(arch: str, kwargs: dict, layer: int | str,
                         state: StateDict) -> tuple[nn.Module, int, int]:
    """A timm ViT holding ``state``'s blocks up to the chosen one -> (vit, block index, full depth)."""
    model_name = arch.removeprefix("timm:")
    depth = block_count(state)
    block_index = resolve_block_index(layer, depth)
    vit = empty_timm_model(model_name, **{**kwargs, "depth": block_index + 1})
    _check_vision_transformer(vit, arch)
    state = {
        k: v for k, v in state.items()
        if not (m := re.match(r"blocks\.(\d+)\.", k)) or int(m.group(1)) <= block_index
    }
    if vit.pos_embed is not None and "pos_embed" in state:
        state["pos_embed"] = resample_timm_pos_embed(state["pos_embed"], vit)
    load_exact(vit, state, f"timm {model_name} (blocks 0..{block_index})")
    return vit, block_index, depth


def _check_vision_transformer(vit: nn.Module, arch: str) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"{arch}: only timm VisionTransformer models are supported")


def load_configured_encoder(config: dict, encoder_path: str | None) -> PatchEncoder:
    """The frozen encoder the config asks for: the tiny trained one or DINOv2 weights on disk."""
    enc = config["encoder"]
    if enc["train"] is not None:
        if not encoder_path:
            raise ConfigError("encoder.train is set: pass --encoder with the trained encoder file")
        arch, checkpoint = f"timm:{TINY_BASE_MODEL}", encoder_path
    else:
        if enc["checkpoint"] is None:
            raise ConfigError("config key 'encoder.checkpoint' is null and 'encoder.train' is not set: point "
                              "encoder.checkpoint at local DINOv2 weights (e.g. dinov2_vitb14_reg4_pretrain.pth) "
                              "or set encoder.train to train the tiny encoder")
        arch, checkpoint = enc["arch"], encoder_path or enc["checkpoint"]
    return load_encoder(arch, checkpoint, enc["layer"], enc["image_size"])
