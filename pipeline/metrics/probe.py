"""Linear probe of the stage-1 GPT (DiGIT Figure 3b): features per layer, one linear classifier.

The model is frozen. Each image's view-0 token grid (raster order) is fed in full with the NULL
class as condition (class-conditional model, so the label does not leak) or BOS (unconditional);
the hidden state of every block (``GPT.features``, before the final LayerNorm, condition position
dropped) is mean-pooled over the h*w positions -> one (N, D) feature matrix per layer.

Per layer, features are standardised with the train mean/std and a linear classifier
(``nn.Linear``, zero init, AdamW + cross-entropy, seeded minibatch order) is trained on the train
features; top-1 on the test features is reported. Layers are 0-based (layer l = output of block
l). The stage that loads the checkpoint and token files is `pipeline.probe.probe_stage`.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model, tokens: np.ndarray, batch_size: int, device, progress: bool = False,
                     desc: str = "features") -> list[np.ndarray]:
    """Mean-pooled hidden states of every layer: list of n_layer (N, D) float32 arrays."""
    from tqdm import tqdm

    from ..devices import autocast_for

    n, L, D = len(tokens), model.config.n_layer, model.config.n_embd
    feats = [np.zeros((n, D), dtype=np.float32) for _ in range(L)]
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, file=sys.stderr):
        x = torch.from_numpy(tokens[s:s + batch_size]).to(device)
        with autocast_for(device):  # bf16 on GPU, fp32 on CPU
            hs = model.features(x, labels=None)  # null class / BOS
        for l, hid in enumerate(hs):
            feats[l][s:s + len(x)] = hid.float().mean(dim=1).cpu().numpy()
    return feats


def train_linear(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
                 num_classes: int, epochs: int, lr: float, batch_size: int, weight_decay: float,
                 seed: int) -> tuple[float, float]:
    """Standardise with train stats, train a linear classifier, return (train_acc, test_acc)."""
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    clf = nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(int(seed))
    n = len(xtr)
    bs = n if not batch_size or batch_size <= 0 else min(int(batch_size), n)
    with torch.enable_grad():
        for _ in range(int(epochs)):
            order = torch.randperm(n, generator=g).to(xtr.device)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                loss = F.cross_entropy(clf(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        tr = (clf(xtr).argmax(1) == ytr).float().mean().item()
        te = (clf(xte).argmax(1) == yte).float().mean().item()
    return tr, te
