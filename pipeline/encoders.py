"""Frozen discriminative encoders: images -> patch features of one intermediate ViT block.

DiGIT (DESIGN.md, "The method, exactly", step 2) tokenizes images with a frozen DINOv2 ViT cut
after the THIRD BLOCK FROM THE END (block 9 of 12 for ViT-B, 21 of 24 for ViT-L); the final
LayerNorm is applied and the CLS/register tokens are dropped. This module builds that encoder with
timm, from weights on disk only (nothing is ever downloaded), in any of these layouts:

* ``official``: the DINOv2 release ``.pth`` (``dinov2_vitb14_reg4_pretrain.pth``: ``cls_token``,
  ``pos_embed`` on a 37x37 grid, ``register_tokens``, ``mask_token``, ``blocks.{i}.*``, ``norm.*``);
* ``timm``: a timm ``vit_*_patch14[_reg4]_dinov2`` state dict (``.pth``/``.bin``/``.safetensors``
  or a directory holding ``model.safetensors``/``pytorch_model.bin``);
* ``hf``: a Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` directory (``embeddings.*``,
  ``encoder.layer.{i}.*``, ``layernorm.*``);
* ``digit-timm-encoder``: our own file for any timm ViT (see `save_timm_encoder`), used for the tiny
  encoder the CPU demo trains itself, loaded with ``arch="timm:<model_name>"``.

Every DINOv2 layout is converted to the official key layout first (one validation point), then to
a timm model whose image size is the target size. Its position embedding is computed once at load
time with exactly the run-time interpolation of DiGIT's DINOv2 code (bicubic,
``scale_factor=(g+0.1)/M``, no antialias, see `interpolate_patch_pos_embed`); timm's own
load-time resampling gives different numbers and DiGIT's published centroids would not apply.

Careful: DiGIT builds its ViT with the DinoVisionTransformer defaults (``interpolate_offset=0.1``,
``interpolate_antialias=False``) for the ``_reg4`` weights too, whereas the DINOv2 torch.hub
constructors ``dinov2_vit*14_reg`` set ``interpolate_offset=0.0, interpolate_antialias=True``
(``size=``, antialiased). We follow DiGIT; features equal the official DinoVisionTransformer's
``get_intermediate_layers`` under DiGIT's settings bit for bit (checked on CPU, ViT-S/B/g).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_path, file_sha256

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

TIMM_ENCODER_FORMAT = "digit-timm-encoder"
TIMM_ENCODER_VERSION = 1
POS_EMBED_INTERPOLATION = "dinov2-official: bicubic, scale_factor=(grid+0.1)/M, antialias=False, float32"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
_OFFICIAL_GRID = 37  # the DINOv2 release was trained at 518 px = 37 x 14


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Dinov2Spec:
    """Shape facts of one DINOv2 architecture (enough to validate and convert checkpoints)."""

    arch: str
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    num_registers: int = 0
    swiglu: bool = False  # ViT-g uses a SwiGLU FFN (official keys mlp.w12 / mlp.w3)
    patch_size: int = 14

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the FFN (for SwiGLU: of one of its two halves), as DINOv2 computes it."""
        hidden = 4 * self.embed_dim
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden

    @property
    def weights_url(self) -> str:
        base = self.arch.replace("_reg4", "")
        return f"{_DINOV2_URL}/{base}/{self.arch}_pretrain.pth"


def _dinov2_specs() -> dict[str, Dinov2Spec]:
    sizes = {  # letter: (timm size word, dim, depth, heads, swiglu)
        "s": ("small", 384, 12, 6, False),
        "b": ("base", 768, 12, 12, False),
        "l": ("large", 1024, 24, 16, False),
        "g": ("giant", 1536, 40, 24, True),
    }
    specs = {}
    for letter, (word, dim, depth, heads, swiglu) in sizes.items():
        for regs in (0, 4):
            arch = f"dinov2_vit{letter}14" + ("_reg4" if regs else "")
            timm_name = f"vit_{word}_patch14_" + ("reg4_" if regs else "") + "dinov2"
            specs[arch] = Dinov2Spec(arch, timm_name, dim, depth, heads, regs, swiglu)
    return specs


DINOV2_ARCHS: dict[str, Dinov2Spec] = _dinov2_specs()


def dinov2_spec(arch: str) -> Dinov2Spec:
    try:
        return DINOV2_ARCHS[arch]
    except KeyError:
        raise ValueError(
            f"unknown encoder arch {arch!r}; expected one of {sorted(DINOV2_ARCHS)} "
            "or 'timm:<model_name>' for another timm VisionTransformer"
        ) from None


# ----------------------------------------------------------------------------- layer choice


def resolve_block_index(layer: int | str, depth: int) -> int:
    """Index (0-based) of the block whose output is used.

    * an int ``n > 0`` (or its decimal string) counts FROM THE END, the way DiGIT's "layer 3" does:
      ``get_intermediate_layers(x, n=3)`` takes the last 3 blocks and keeps the first of them, so
      ``n`` means block ``depth - n`` (3 -> 9 of 12, 21 of 24);
    * ``"block:i"`` names block ``i`` directly (``0 <= i < depth``).
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise ValueError(f"layer must be an int (blocks from the end) or 'block:<i>', got {layer!r}")
    if isinstance(layer, str):
        text = layer.strip()
        if text.startswith("block:"):
            try:
                index = int(text[len("block:"):])
            except ValueError:
                raise ValueError(f"layer {layer!r}: expected 'block:<int>'") from None
            if not 0 <= index < depth:
                raise ValueError(
                    f"layer {layer!r}: block index must be in [0, {depth - 1}] for depth {depth}"
                )
            return index
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"layer {layer!r}: expected an int (blocks from the end) or 'block:<i>'")
        layer = int(text)
    if not 1 <= layer <= depth:
        raise ValueError(
            f"layer={layer} counts blocks from the end and must be in [1, {depth}] for depth {depth} "
            "(use 'block:<i>' for an explicit 0-based block index)"
        )
    return depth - layer


# ----------------------------------------------------------------------------- position embedding


def interpolate_patch_pos_embed(patch_pos: Tensor, grid: tuple[int, int], offset: float = 0.1) -> Tensor:
    """Resample a square (1, M*M, D) patch position embedding to (1, h*w, D), the official way.

    This is DINOv2's ``interpolate_pos_encoding``: float32, bicubic, no antialias and, importantly,
    ``scale_factor=((h + 0.1) / M, (w + 0.1) / M)`` rather than ``size=(h, w)``. With a scale factor
    PyTorch maps output to input coordinates with 1/scale_factor (M/16.1 at 224 px, not M/16), so
    ``size=`` (what timm's ``resample_abs_pos_embed`` uses, with antialias on top) gives different
    embeddings. Like the official code, an unchanged square grid is returned as is.
    """
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"patch position embedding has {n} positions, not a square grid")
    h, w = grid
    patch_pos = patch_pos.float()
    if (h, w) == (m, m):
        return patch_pos
    square = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        square, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic", antialias=False
    )
    if tuple(out.shape[-2:]) != (h, w):  # the +offset exists to make the floor land on (h, w)
        raise AssertionError(f"interpolated grid {tuple(out.shape[-2:])} != {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim)


# ----------------------------------------------------------------------------- key layouts


def _block_ids(state: Mapping[str, Tensor], prefix: str = "blocks.") -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pat.match(k))})


def _block_count(state: Mapping[str, Tensor], prefix: str = "blocks.") -> int:
    ids = _block_ids(state, prefix)
    if ids != list(range(len(ids))):
        raise ValueError(f"checkpoint blocks are not numbered 0..n-1: {ids}")
    return len(ids)


def expected_official_shapes(spec: Dinov2Spec, grid: int = _OFFICIAL_GRID) -> dict[str, tuple[int, ...]]:
    """Every key of an official DINOv2 checkpoint with its shape (``mask_token`` included)."""
    d, h, p = spec.embed_dim, spec.mlp_hidden, spec.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if spec.num_registers:
        shapes["register_tokens"] = (1, spec.num_registers, d)
    ffn = (
        {"mlp.w12.weight": (2 * h, d), "mlp.w12.bias": (2 * h,), "mlp.w3.weight": (d, h), "mlp.w3.bias": (d,)}
        if spec.swiglu
        else {"mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)}
    )
    per_block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "ls1.gamma": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        **ffn,
        "ls2.gamma": (d,),
    }
    for i in range(spec.depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in per_block.items()})
    return shapes


def _key_order(key: str) -> tuple:
    """Top-level keys first, then blocks in numeric order (so messages show the telling keys)."""
    m = re.match(r"(?:blocks|encoder\.layer)\.(\d+)\.(.*)", key)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, key)


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys, key=_key_order)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _first(items: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def validate_official_state_dict(state: Mapping[str, Tensor], spec: Dinov2Spec) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key (pos grid: any square)."""
    pos = state.get("pos_embed")
    grid = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.ndim == 3 else _OFFICIAL_GRID
    expected = expected_official_shapes(spec, grid)
    missing = set(expected) - set(state) - {"mask_token"}  # mask_token is training-only
    unexpected = set(state) - set(expected)
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in sorted(set(expected) & set(state), key=_key_order)
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_first(wrong)}")
    if problems:
        raise ValueError(f"checkpoint does not match {spec.arch}: " + " | ".join(problems))


def official_to_timm_state_dict(
    state: Mapping[str, Tensor],
    arch: str,
    grid: tuple[int, int] | None = None,
    n_blocks: int | None = None,
) -> StateDict:
    """Official DINOv2 keys -> timm ``vit_*_dinov2`` keys (float32).

    ``grid``: resample the patch position embedding to this grid with the official interpolation
    (None keeps the checkpoint's grid, which is how timm publishes DINOv2 weights).
    ``n_blocks``: keep only the first blocks. With registers, timm adds no position to the class
    token and keeps none for registers, so the class position is folded into ``cls_token`` (the
    same sum the official forward computes).
    """
    spec = dinov2_spec(arch)
    out: StateDict = {}
    pos = state["pos_embed"].float()
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    if grid is not None:
        patch_pos = interpolate_patch_pos_embed(patch_pos, grid)
    if spec.num_registers:
        out["cls_token"] = state["cls_token"].float() + cls_pos
        out["reg_token"] = state["register_tokens"].float()
        out["pos_embed"] = patch_pos
    else:
        out["cls_token"] = state["cls_token"].float()
        out["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
    for key, value in state.items():
        if key in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            continue
        m = re.match(r"blocks\.(\d+)\.", key)
        if m and n_blocks is not None and int(m.group(1)) >= n_blocks:
            continue
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value.float()
    return out


def _timm_ffn_to_official(key: str) -> str:
    """ViT-g: timm packs the SwiGLU FFN as mlp.fc1/fc2, DINOv2 names it mlp.w12/w3."""
    return key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")


def timm_to_official_state_dict(state: Mapping[str, Tensor], arch: str) -> StateDict:
    """timm ``vit_*_dinov2`` keys -> official keys. Inverse of `official_to_timm_state_dict`
    (with registers the class position comes back as zeros and stays folded into ``cls_token``)."""
    spec = dinov2_spec(arch)
    out: StateDict = {}
    state = dict(state)
    if "reg_token" in state:
        out["register_tokens"] = state.pop("reg_token")
        cls = state.pop("cls_token")
        patch_pos = state.pop("pos_embed")
        out["cls_token"] = cls
        out["pos_embed"] = torch.cat([torch.zeros_like(patch_pos[:, :1]), patch_pos], dim=1)
    for key, value in state.items():
        if key.startswith("head.") or key.startswith("fc_norm."):  # classifier parts, not features
            continue
        out[_timm_ffn_to_official(key) if spec.swiglu else key] = value
    out.setdefault("mask_token", torch.zeros(1, spec.embed_dim))
    return out


_HF_BLOCK_RENAMES = [  # (official suffix, HF suffix) inside one block
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("attn.proj.", "attention.output.dense."),
    ("ls1.gamma", "layer_scale1.lambda1"),
    ("ls2.gamma", "layer_scale2.lambda1"),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("mlp.w12.", "mlp.weights_in."),
    ("mlp.w3.", "mlp.weights_out."),
]
_HF_TOP_RENAMES = [
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("register_tokens", "embeddings.register_tokens"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
]
_HF_PREFIXES = ("dinov2_with_registers.", "dinov2.")  # ...ForImageClassification wrappers


def hf_to_official_state_dict(state: Mapping[str, Tensor]) -> StateDict:
    """Hugging Face ``Dinov2Model`` keys -> official keys (q, k, v are concatenated into qkv).
    Unknown keys are kept under their HF name so validation can report them."""
    state = {_strip_prefix(k, _HF_PREFIXES): v for k, v in state.items() if not k.startswith("classifier.")}
    top = {hf: off for off, hf in _HF_TOP_RENAMES}
    out: StateDict = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if not m:
            out[key] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        a = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if a:
            qkv.setdefault(i, {})[f"{a.group(1)}.{a.group(2)}"] = value
            continue
        for off, hf in _HF_BLOCK_RENAMES:
            if rest.startswith(hf):
                out[f"blocks.{i}.{off}{rest[len(hf):]}"] = value
                break
        else:
            out[key] = value
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            names = [f"{p}.{kind}" for p in ("query", "key", "value")]
            if all(n in parts for n in names):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in names], dim=0)
            else:  # report the incomplete triple under its HF names
                prefix = f"encoder.layer.{i}.attention.attention."
                out.update({prefix + n: parts[n] for n in names if n in parts})
    return out


def official_to_hf_state_dict(state: Mapping[str, Tensor]) -> StateDict:
    """Official keys -> Hugging Face ``Dinov2Model`` keys (used to fabricate HF checkpoints)."""
    top = dict(_HF_TOP_RENAMES)
    out: StateDict = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if not m:
            raise ValueError(f"not an official DINOv2 key: {key}")
        i, rest = int(m.group(1)), m.group(2)
        prefix = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest[len("attn.qkv."):]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()
            continue
        for off, hf in _HF_BLOCK_RENAMES:
            if rest.startswith(off):
                out[prefix + hf + rest[len(off):]] = value
                break
        else:
            raise ValueError(f"no Hugging Face name for official key {key}")
    return out


def _strip_prefix(key: str, prefixes) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """'official', 'timm' or 'hf' from the keys; ValueError naming the keys otherwise."""
    keys = set(state)
    if any(_strip_prefix(k, _HF_PREFIXES).startswith(("embeddings.", "encoder.layer.")) for k in keys):
        return "hf"
    if "reg_token" in keys:
        return "timm"
    if {"cls_token", "pos_embed"} <= keys or any(k.startswith("blocks.") for k in keys):
        # official and timm differ only by mask_token / register names / ViT-g FFN names, all
        # handled by timm_to_official_state_dict, so both go through the same conversion.
        return "official" if ("mask_token" in keys or "register_tokens" in keys) else "timm"
    raise ValueError(
        "unrecognised checkpoint layout; expected official DINOv2 keys (cls_token, pos_embed, "
        "blocks.N.*), timm keys (reg_token, blocks.N.*) or Hugging Face keys (embeddings.*, "
        f"encoder.layer.N.*); found keys: {_names(keys)}"
    )


def to_official_state_dict(state: Mapping[str, Tensor], arch: str) -> tuple[StateDict, str]:
    """Any supported DINOv2 layout -> (official state dict in float32, detected layout)."""
    layout = detect_layout(state)
    if layout == "hf":
        out = hf_to_official_state_dict(state)
    elif layout == "timm":
        out = timm_to_official_state_dict(state, arch)
    else:
        out = dict(state)
        if dinov2_spec(arch).swiglu:  # tolerate timm FFN names next to official ones
            out = {_timm_ffn_to_official(k): v for k, v in out.items()}
    return {k: v.float() for k, v in out.items()}, layout


# ----------------------------------------------------------------------------- reading files


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
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
    state = {_strip_prefix(k, ("module.", "backbone.")): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries are not tensors: {_names(bad)}")
    return state


def is_timm_encoder_file(obj: Mapping[str, Any]) -> bool:
    return obj.get("format") == TIMM_ENCODER_FORMAT


# ----------------------------------------------------------------------------- writing files


def build_random_dinov2(arch: str, seed: int = 0) -> StateDict:
    """Random official-layout DINOv2 weights (37x37 position grid) for tests and dry runs.

    Scales keep activations O(1) and attention non-uniform; LayerScale gammas, norm weights and
    biases are random rather than 1e-5 / ones / zeros, so any mistake in a forward pass shows.
    """
    spec = dinov2_spec(arch)
    gen = torch.Generator().manual_seed(seed)
    state: StateDict = {}
    for key, shape in expected_official_shapes(spec).items():
        if key == "mask_token":
            value = torch.zeros(shape)
        elif key.endswith("ls1.gamma") or key.endswith("ls2.gamma"):
            value = 0.1 + 0.9 * torch.rand(shape, generator=gen)
        elif re.search(r"norm\d?\.weight$", key):
            value = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif key.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif key.endswith(".bias"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif key == "pos_embed":
            value = 0.5 * torch.randn(shape, generator=gen)
        else:  # cls_token, register_tokens
            value = torch.randn(shape, generator=gen)
        state[key] = value
    return state


def _infer_dinov2_arch(state: Mapping[str, Tensor]) -> str:
    """The DINOv2 arch whose width/depth/registers match an official or timm state dict."""
    dim = state["patch_embed.proj.weight"].shape[0]
    depth = _block_count(state)
    regs = state.get("register_tokens", state.get("reg_token"))
    n_regs = 0 if regs is None else regs.shape[1]
    for spec in DINOV2_ARCHS.values():
        if (spec.embed_dim, spec.depth, spec.num_registers) == (dim, depth, n_regs):
            return spec.arch
    raise ValueError(f"no DINOv2 arch with width {dim}, depth {depth}, {n_regs} registers")


def save_official_checkpoint(model_or_state: nn.Module | Mapping[str, Tensor], path: str | Path) -> Path:
    """Write weights in the official DINOv2 ``.pth`` key layout (atomically).

    Accepts an official or timm state dict or a timm ``vit_*_dinov2`` model. The position grid is
    written as given: the official release (and `build_random_dinov2`) uses 37x37, so a timm
    model should be created with ``img_size=518`` to produce a faithful file.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    state = {k: v.detach().cpu() for k, v in state.items()}
    arch = _infer_dinov2_arch(state)
    official, _ = to_official_state_dict(state, arch)
    validate_official_state_dict(official, dinov2_spec(arch))
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(official, tmp)
    return path


def save_hf_checkpoint(state: Mapping[str, Tensor], directory: str | Path, arch: str) -> Path:
    """Write official-layout weights as a Hugging Face DINOv2 directory (config.json +
    model.safetensors), the layout `load_encoder` reads; for fabricating test checkpoints."""
    from safetensors.torch import save_file

    spec = dinov2_spec(arch)
    validate_official_state_dict(state, spec)
    hf = {k: v.detach().cpu().contiguous() for k, v in official_to_hf_state_dict(state).items()}
    config = {
        "model_type": "dinov2_with_registers" if spec.num_registers else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if spec.num_registers else "Dinov2Model"],
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": 4,
        "patch_size": spec.patch_size,
        "image_size": 518,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "use_swiglu_ffn": spec.swiglu,
        "num_register_tokens": spec.num_registers,
    }
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(hf, str(tmp / "model.safetensors"))
    return directory


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
        raise ValueError(f"{path} is not a {TIMM_ENCODER_FORMAT} file (keys: {_names(contents)})")
    return contents


# ----------------------------------------------------------------------------- the encoder module


@dataclass(frozen=True)
class EncoderInfo:
    """What later stages record next to features (JSON-friendly via `encoder_info`)."""

    arch: str
    layer: int | str
    block_index: int
    depth: int
    embed_dim: int
    patch_size: int
    img_size: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    checkpoint: str | None
    checkpoint_format: str  # official | timm | hf | digit-timm-encoder | random
    weights_sha256: str | None
    pos_embed_interpolation: str = POS_EMBED_INTERPOLATION


class PatchEncoder(nn.Module):
    """A frozen timm ViT holding only blocks 0..block_index: (B,3,H,W) -> (B, T, D) patch features
    after the final norm, prefix (CLS and register) tokens dropped. Always in eval mode."""

    def __init__(self, vit: nn.Module, info: EncoderInfo):
        super().__init__()
        self.vit = vit
        self.info = info
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PatchEncoder":  # frozen: stays in eval mode
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        return self.info.grid

    @property
    def num_patches(self) -> int:
        return self.info.grid[0] * self.info.grid[1]

    def forward(self, x: Tensor) -> Tensor:
        size = self.info.img_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(x.shape)}")
        tokens = self.vit.forward_features(x)  # patch embed, pos embed, the kept blocks, final norm
        return tokens[:, self.vit.num_prefix_tokens:]


def encoder_info(module: PatchEncoder) -> dict[str, Any]:
    """The encoder's metadata as a JSON-serialisable dict."""
    info = dataclasses.asdict(module.info)
    info["grid"] = list(info["grid"])
    return info


def _grid_for(img_size: int, patch_size: int) -> tuple[int, int]:
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
    return img_size // patch_size, img_size // patch_size


def _create_empty(model_name: str, **kwargs) -> nn.Module:
    """A timm model with parameters on the meta device: skips timm's random init (seconds for
    ViT-B on CPU); `_load_exact` then puts the checkpoint tensors in place."""
    import timm

    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False, **kwargs)


def _load_exact(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """load_state_dict(strict, assign) with a ValueError naming missing / unexpected / mis-shaped
    keys; the module may live on the meta device."""
    own = module.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
        for k in sorted(set(own) & set(state), key=_key_order)
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"missing keys: {_names(missing)}"] if missing else []
        parts += [f"unexpected keys: {_names(unexpected)}"] if unexpected else []
        parts += [f"wrong shapes: {_first(wrong)}"] if wrong else []
        raise ValueError(f"checkpoint does not match {what}: " + " | ".join(parts))
    module.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{what}: tensors not filled by the checkpoint: {_names(left)}")


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
    grid = _grid_for(img_size, spec.patch_size)
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
    vit = _create_empty(spec.timm_name, img_size=img_size, depth=block_index + 1, num_classes=0)
    timm_state = official_to_timm_state_dict(official, arch, grid=grid, n_blocks=block_index + 1)
    _load_exact(vit, timm_state, f"timm {spec.timm_name} (blocks 0..{block_index})")
    return _patch_encoder(vit, arch, layer, block_index, spec.depth, img_size, checkpoint, layout, digest)


def _load_generic_timm(
    arch: str, checkpoint: str | Path | None, layer: int | str, img_size: int, seed: int, compute_sha256: bool
) -> PatchEncoder:
    """``timm:<name>``: any timm VisionTransformer; position embeddings resampled the DINOv2 way."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model_name = arch.removeprefix("timm:")
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = timm.create_model(model_name, pretrained=False, **kwargs)
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"{arch}: only timm VisionTransformer models are supported")
        depth = len(vit.blocks)
        block_index = resolve_block_index(layer, depth)
        vit.blocks = vit.blocks[: block_index + 1]
    else:
        depth = _block_count(state)
        block_index = resolve_block_index(layer, depth)
        vit = _create_empty(model_name, **{**kwargs, "depth": block_index + 1})
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"{arch}: only timm VisionTransformer models are supported")
        state = {
            k: v for k, v in state.items()
            if not (m := re.match(r"blocks\.(\d+)\.", k)) or int(m.group(1)) <= block_index
        }
        if vit.pos_embed is not None and "pos_embed" in state:
            state["pos_embed"] = _resample_timm_pos_embed(state["pos_embed"], vit)
        _load_exact(vit, state, f"timm {model_name} (blocks 0..{block_index})")

    return _patch_encoder(vit, arch, layer, block_index, depth, img_size, checkpoint, layout, digest)


def _patch_encoder(vit: nn.Module, arch: str, layer: int | str, block_index: int, depth: int, img_size: int,
                   checkpoint: str | Path | None, layout: str, digest: str | None) -> PatchEncoder:
    """Wrap a truncated timm ViT; sizes (width, patch, grid, prefix tokens) are read off the model."""
    info = EncoderInfo(
        arch=arch,
        layer=layer,
        block_index=block_index,
        depth=depth,
        embed_dim=vit.embed_dim,
        patch_size=vit.patch_embed.patch_size[0],
        img_size=img_size,
        grid=tuple(vit.patch_embed.grid_size),
        num_prefix_tokens=vit.num_prefix_tokens,
        checkpoint=None if checkpoint is None else str(checkpoint),
        checkpoint_format=layout,
        weights_sha256=digest,
    )
    return PatchEncoder(vit, info)


def _resample_timm_pos_embed(pos: Tensor, vit: nn.Module) -> Tensor:
    """Bring a stored timm position embedding to the model's grid with the official interpolation
    (prefix positions, if the model has them, are kept as they are)."""
    if pos.shape == vit.pos_embed.shape:
        return pos.float()
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    patch = interpolate_patch_pos_embed(pos[:, n_prefix:], tuple(vit.patch_embed.grid_size))
    return torch.cat([pos[:, :n_prefix].float(), patch], dim=1)
