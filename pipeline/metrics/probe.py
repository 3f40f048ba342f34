"""Linear probe of the stage-1 GPT (DiGIT Figure 3b).

The model is frozen. Each image's view-0 token grid (raster order) is fed in full with the NULL
class as condition (class-conditional model, so the label does not leak) or BOS (unconditional);
the hidden state of every block (``GPT.features``, before the final LayerNorm, condition position
dropped) is mean-pooled over the h*w positions -> one (N, D) feature matrix per layer.

Per layer, features are standardised with the train mean/std and a linear classifier
(``nn.Linear``, zero init, AdamW + cross-entropy, seeded minibatch order) is trained on the train
features; top-1 on the test features is reported. Layers are 0-based (layer l = output of block
l). ``best_layer`` is picked by test accuracy, as the paper reports the best layer.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import write_json_atomic
from ..tokens import load_tokens


def _load_split(files: list[str], cap: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """View 0 of every shard -> tokens (N, h*w) int64, labels (N,) int64 (first ``cap`` images)."""
    toks, labs, info = [], [], {}
    n = 0
    for f in files:
        if cap is not None and n >= cap:
            break
        grids, meta = load_tokens(f)
        if grids.ndim != 4:
            raise ValueError(f"{f}: expected (N, V, h, w) tokens, got shape {grids.shape}")
        m = len(grids) if cap is None else min(len(grids), cap - n)
        toks.append(np.asarray(grids[:m, 0]).reshape(m, -1).astype(np.int64))
        if meta.get("labels") is None or len(meta["labels"]) < m:
            raise ValueError(f"{f}: json has no labels for its {len(grids)} grids")
        labs.append(np.asarray(meta["labels"][:m], dtype=np.int64))
        info = {"grid": meta.get("grid"), "codebook_size": meta.get("codebook_size")}
        n += m
    if not toks:
        raise ValueError("no token files")
    return np.concatenate(toks), np.concatenate(labs), info


@torch.no_grad()
def extract_features(model, tokens: np.ndarray, batch_size: int, device, progress: bool = False,
                     desc: str = "features") -> list[np.ndarray]:
    """Mean-pooled hidden states of every layer: list of n_layer (N, D) float32 arrays."""
    from tqdm import tqdm

    from ..encode import autocast_for

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


def probe_stage(checkpoint: str, train_files: list[str], test_files: list[str], out_json: str,
                probe_cfg: dict, *, device: str = "auto", progress: bool = True) -> dict:
    from ..encode import resolve_device
    from ..train import load_model

    t0 = time.time()
    dev = resolve_device(device)
    model, ckpt_meta = load_model(str(checkpoint), ema=bool(probe_cfg.get("ema", True)), device=dev)
    c = model.config
    xtr_tok, ytr, info = _load_split(list(train_files), probe_cfg.get("max_train"))
    xte_tok, yte, _ = _load_split(list(test_files))
    for name, t in (("train", xtr_tok), ("test", xte_tok)):
        if t.shape[1] != c.block_size:
            raise ValueError(f"{name} grids have {t.shape[1]} tokens, model block is {c.block_size}")
        if t.size and t.max() >= c.vocab_size:
            raise ValueError(f"{name} tokens up to {t.max()} >= model vocab {c.vocab_size}")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    bs = int(probe_cfg["batch_size"])
    ftr = extract_features(model, xtr_tok, bs, dev, progress, "probe features train")
    fte = extract_features(model, xte_tok, bs, dev, progress, "probe features test")
    ytr_t, yte_t = torch.from_numpy(ytr).to(dev), torch.from_numpy(yte).to(dev)

    per_layer = []
    for l in range(c.n_layer):
        tr, te = train_linear(torch.from_numpy(ftr[l]).to(dev), ytr_t, torch.from_numpy(fte[l]).to(dev), yte_t,
                              num_classes, probe_cfg["epochs"], float(probe_cfg["lr"]), bs,
                              float(probe_cfg["weight_decay"]), int(probe_cfg["seed"]))
        per_layer.append({"layer": l, "train_acc": round(tr, 6), "test_acc": round(te, 6)})
        if progress:
            print(f"[probe] layer {l}: train {tr:.4f} test {te:.4f}", file=sys.stderr)
    best = max(per_layer, key=lambda r: r["test_acc"])
    result = {
        "stage": "probe", "checkpoint": str(checkpoint), "checkpoint_sha256": ckpt_meta["sha256"],
        "weights": ckpt_meta["weights"], "model_step": ckpt_meta.get("step"),
        "condition": "null class" if c.num_classes else "BOS", "view": 0, "pooling": "mean over positions",
        "layers": "0-based block outputs before ln_f", "per_layer": per_layer,
        "best_layer": best["layer"], "best_test_acc": best["test_acc"],
        "n_train": int(len(ytr)), "n_test": int(len(yte)), "num_classes": num_classes,
        "chance": round(1.0 / num_classes, 6), "probe_cfg": dict(probe_cfg),
        "train_files": [str(f) for f in train_files], "test_files": [str(f) for f in test_files],
        "token_grid": info.get("grid"), "device": str(dev), "seconds": round(time.time() - t0, 3),
    }
    write_json_atomic(out_json, result)
    print(f"[probe] best layer {best['layer']}: test top-1 {best['test_acc']:.4f} -> {out_json}", file=sys.stderr)
    return result
