"""Fabricated DINOv2 weights and checkpoint writers, for tests, benches and dry runs.

Nothing in the pipeline writes DINOv2 checkpoints: real runs read released weights. The tests and
benches use `save_official_checkpoint` / `save_hf_checkpoint` to make files in each layout, and
`build_random_dinov2` gives the seeded random weights `load_encoder(arch, None)` builds.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .encoder_layouts import (StateDict, block_count, expected_official_shapes, official_to_hf_state_dict,
                              to_official_state_dict, validate_official_state_dict)
from .io import atomic_path
from .models.patch_encoder import DINOV2_ARCHS, dinov2_spec

Tensor = torch.Tensor


def build_random_dinov2(arch: str, seed: int = 0) -> StateDict:
    """Random official-layout DINOv2 weights (37x37 position grid) for tests and dry runs.

    Scales keep activations O(1) and attention non-uniform; LayerScale gammas, norm weights and
    biases are random rather than 1e-5 / ones / zeros, so any mistake in a forward pass shows.
    """
    spec = dinov2_spec(arch)
    gen = torch.Generator().manual_seed(seed)
    return {key: _random_value(key, shape, gen) for key, shape in expected_official_shapes(spec).items()}


def _random_value(key: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """One random tensor, scaled for what the key names."""
    if key == "mask_token":
        return torch.zeros(shape)
    if key.endswith("ls1.gamma") or key.endswith("ls2.gamma"):
        return 0.1 + 0.9 * torch.rand(shape, generator=gen)
    if re.search(r"norm\d?\.weight$", key):
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if key.endswith(".weight"):
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    if key.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if key == "pos_embed":
        return 0.5 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen)  # cls_token, register_tokens


def _infer_dinov2_arch(state: Mapping[str, Tensor]) -> str:
    """The DINOv2 arch whose width/depth/registers match an official or timm state dict."""
    dim = state["patch_embed.proj.weight"].shape[0]
    depth = block_count(state)
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
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(_hf_config(arch), indent=2) + "\n")
        save_file(hf, str(tmp / "model.safetensors"))
    return directory


def _hf_config(arch: str) -> dict:
    """The ``config.json`` of a Hugging Face DINOv2 model of this arch."""
    spec = dinov2_spec(arch)
    return {
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
