"""Conversions between the key layouts DINOv2 weights come in.

* ``official``: the DINOv2 release ``.pth`` (``dinov2_vitb14_reg4_pretrain.pth``: ``cls_token``,
  ``pos_embed`` on a 37x37 grid, ``register_tokens``, ``mask_token``, ``blocks.{i}.*``, ``norm.*``);
* ``timm``: a timm ``vit_*_patch14[_reg4]_dinov2`` state dict;
* ``hf``: a Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` state dict (``embeddings.*``,
  ``encoder.layer.{i}.*``, ``layernorm.*``).

Every layout is converted to the official one first (`to_official_state_dict`), validated there
(`validate_official_state_dict`, the one validation point), then converted to the timm layout the
encoder is built from (`official_to_timm_state_dict`). No file is read or written here.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from .models.patch_encoder import Dinov2Spec, dinov2_spec, interpolate_patch_pos_embed
from .models.state_dicts import key_problems, name_keys

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

OFFICIAL_GRID = 37  # the DINOv2 release was trained at 518 px = 37 x 14


# ----------------------------------------------------------------------------- the official layout


def block_count(state: Mapping[str, Tensor], prefix: str = "blocks.") -> int:
    """How many ``blocks.{i}.*`` a state dict holds; ValueError unless they are numbered 0..n-1."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = sorted({int(m.group(1)) for k in state if (m := pat.match(k))})
    if ids != list(range(len(ids))):
        raise ValueError(f"checkpoint blocks are not numbered 0..n-1: {ids}")
    return len(ids)


def expected_official_shapes(spec: Dinov2Spec, grid: int = OFFICIAL_GRID) -> dict[str, tuple[int, ...]]:
    """Every key of an official DINOv2 checkpoint with its shape (``mask_token`` included)."""
    d, p = spec.embed_dim, spec.patch_size
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
    per_block = _official_block_shapes(spec)
    for i in range(spec.depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in per_block.items()})
    return shapes


def _official_block_shapes(spec: Dinov2Spec) -> dict[str, tuple[int, ...]]:
    """The keys (and shapes) inside one official block."""
    d, h = spec.embed_dim, spec.mlp_hidden
    ffn = (
        {"mlp.w12.weight": (2 * h, d), "mlp.w12.bias": (2 * h,), "mlp.w3.weight": (d, h), "mlp.w3.bias": (d,)}
        if spec.swiglu
        else {"mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)}
    )
    return {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "ls1.gamma": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        **ffn,
        "ls2.gamma": (d,),
    }


def validate_official_state_dict(state: Mapping[str, Tensor], spec: Dinov2Spec) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key (pos grid: any square)."""
    pos = state.get("pos_embed")
    grid = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.ndim == 3 else OFFICIAL_GRID
    problems = key_problems(expected_official_shapes(spec, grid), state,
                            optional={"mask_token"})  # mask_token is training-only
    if problems:
        raise ValueError(f"checkpoint does not match {spec.arch}: " + " | ".join(problems))


# ----------------------------------------------------------------------------- timm


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


# ----------------------------------------------------------------------------- Hugging Face


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
    state = {strip_prefix(k, _HF_PREFIXES): v for k, v in state.items() if not k.startswith("classifier.")}
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
        official = _rename_prefix(rest, [(hf, off) for off, hf in _HF_BLOCK_RENAMES])
        out[f"blocks.{i}.{official}" if official else key] = value
    for i, parts in qkv.items():
        out.update(_hf_qkv_to_official(i, parts))
    return out


def _rename_prefix(name: str, renames: list[tuple[str, str]]) -> str | None:
    """``name`` with the first matching ``(old, new)`` prefix replaced, or None when none matches."""
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def _hf_qkv_to_official(i: int, parts: dict[str, Tensor]) -> StateDict:
    """Block ``i``'s separate query/key/value tensors -> ``attn.qkv.*``; an incomplete triple is
    returned under its HF names (so validation reports it)."""
    out: StateDict = {}
    for kind in ("weight", "bias"):
        names = [f"{p}.{kind}" for p in ("query", "key", "value")]
        if all(n in parts for n in names):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in names], dim=0)
        else:
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
        hf = _rename_prefix(rest, _HF_BLOCK_RENAMES)
        if hf is None:
            raise ValueError(f"no Hugging Face name for official key {key}")
        out[prefix + hf] = value
    return out


# ----------------------------------------------------------------------------- any layout


def strip_prefix(key: str, prefixes) -> str:
    """``key`` without the first of ``prefixes`` it starts with."""
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """'official', 'timm' or 'hf' from the keys; ValueError naming the keys otherwise."""
    keys = set(state)
    if any(strip_prefix(k, _HF_PREFIXES).startswith(("embeddings.", "encoder.layer.")) for k in keys):
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
        f"encoder.layer.N.*); found keys: {name_keys(keys)}"
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
