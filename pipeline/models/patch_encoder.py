"""The frozen patch-feature encoder: images -> patch features of one intermediate ViT block.

DiGIT (DESIGN.md, "The method, exactly", step 2) tokenizes images with a frozen DINOv2 ViT cut
after the THIRD BLOCK FROM THE END (block 9 of 12 for ViT-B, 21 of 24 for ViT-L); the final
LayerNorm is applied and the CLS/register tokens are dropped. `PatchEncoder` wraps a timm ViT
truncated after that block. This module is pure torch: the weight files are read by
`pipeline.encoder_loading`, their key layouts converted by `pipeline.encoder_layouts`.

The position embedding is computed once at load time with exactly the run-time interpolation of
DiGIT's DINOv2 code (bicubic, ``scale_factor=(g+0.1)/M``, no antialias, see
`interpolate_patch_pos_embed`); timm's own load-time resampling gives different numbers and
DiGIT's published centroids would not apply.

Careful: DiGIT builds its ViT with the DinoVisionTransformer defaults (``interpolate_offset=0.1``,
``interpolate_antialias=False``) for the ``_reg4`` weights too, whereas the DINOv2 torch.hub
constructors ``dinov2_vit*14_reg`` set ``interpolate_offset=0.0, interpolate_antialias=True``
(``size=``, antialiased). We follow DiGIT; features equal the official DinoVisionTransformer's
``get_intermediate_layers`` under DiGIT's settings bit for bit (checked on CPU, ViT-S/B/g).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

POS_EMBED_INTERPOLATION = "dinov2-official: bicubic, scale_factor=(grid+0.1)/M, antialias=False, float32"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"


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
            return _explicit_block_index(layer, text[len("block:"):], depth)
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"layer {layer!r}: expected an int (blocks from the end) or 'block:<i>'")
        layer = int(text)
    if not 1 <= layer <= depth:
        raise ValueError(
            f"layer={layer} counts blocks from the end and must be in [1, {depth}] for depth {depth} "
            "(use 'block:<i>' for an explicit 0-based block index)"
        )
    return depth - layer


def _explicit_block_index(layer: str, number: str, depth: int) -> int:
    """The ``i`` of ``"block:i"``, checked against the depth."""
    try:
        index = int(number)
    except ValueError:
        raise ValueError(f"layer {layer!r}: expected 'block:<int>'") from None
    if not 0 <= index < depth:
        raise ValueError(f"layer {layer!r}: block index must be in [0, {depth - 1}] for depth {depth}")
    return index


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


def resample_timm_pos_embed(pos: Tensor, vit: nn.Module) -> Tensor:
    """Bring a stored timm position embedding to the model's grid with the official interpolation
    (prefix positions, if the model has them, are kept as they are)."""
    if pos.shape == vit.pos_embed.shape:
        return pos.float()
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    patch = interpolate_patch_pos_embed(pos[:, n_prefix:], tuple(vit.patch_embed.grid_size))
    return torch.cat([pos[:, :n_prefix].float(), patch], dim=1)


def grid_for(img_size: int, patch_size: int) -> tuple[int, int]:
    """The patch grid of a square image; ValueError unless the patch size divides it."""
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
    return img_size // patch_size, img_size // patch_size


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


def empty_timm_model(model_name: str, **kwargs) -> nn.Module:
    """A timm model with parameters on the meta device: skips timm's random init (seconds for
    ViT-B on CPU); `state_dicts.load_exact` then puts the checkpoint tensors in place."""
    import timm

    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False, **kwargs)


def wrap_truncated_vit(vit: nn.Module, arch: str, layer: int | str, block_index: int, depth: int, img_size: int,
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
