"""The batched inference loop shared by the features and tokens stages.

Decoding and cropping run in DataLoader workers; the encoder runs on the GPU when there is one
(bf16 autocast, channels-last), else on the CPU in fp32 (see `pipeline.devices`).
"""
from __future__ import annotations

import sys
from typing import Iterator

import torch

from .data import ShardViews, ViewSpec, encoder_input
from .devices import autocast_for


def make_loader(dataset: ShardViews, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        multiprocessing_context="fork" if num_workers > 0 else None,
    )


@torch.inference_mode()
def encode_shard_views(encoder: torch.nn.Module, dataset: ShardViews, spec: ViewSpec, *, batch_size: int,
                       num_workers: int, device: torch.device, precision: str = "auto",
                       progress: bool = True, desc: str = "encode") -> Iterator[tuple]:
    """Yield (indices (B,), view v, patch features float32 (B, T, D) on `device`, crop params (B,V,3))
    for every view of every image, batch by batch, in dataset order."""
    from tqdm import tqdm

    encoder = encoder.to(device)
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    loader = make_loader(dataset, batch_size, num_workers)
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for views, labels, indices, params in loader:
            views = views.to(device, non_blocking=True)
            for v in range(views.shape[1]):
                x = encoder_input(views[:, v], spec)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_for(device, precision):
                    feats = encoder(x)
                yield indices, v, feats.float(), params
            bar.update(len(indices))
