"""Probe stage: linear probe of a trained stage-1 GPT on token files -> one JSON (DiGIT Figure 3b).

Loads the checkpoint and the view-0 token grids of the train and test shards, then fits one linear
classifier per layer with :mod:`pipeline.metrics.probe` (the features and the classifier are
defined there). ``best_layer`` is picked by test accuracy, as the paper reports the best layer.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from .devices import resolve_device
from .io import write_json_atomic
from .metrics.probe import extract_features, train_linear
from .tokens import load_tokens


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


def _check_tokens(name: str, tokens: np.ndarray, config) -> None:
    """The grids fit the model: one block of tokens, every id inside the vocabulary."""
    if tokens.shape[1] != config.block_size:
        raise ValueError(f"{name} grids have {tokens.shape[1]} tokens, model block is {config.block_size}")
    if tokens.size and tokens.max() >= config.vocab_size:
        raise ValueError(f"{name} tokens up to {tokens.max()} >= model vocab {config.vocab_size}")


def _probe_layers(ftr: list, fte: list, ytr: np.ndarray, yte: np.ndarray, num_classes: int, probe_cfg: dict,
                  dev, progress: bool) -> list[dict]:
    """One linear classifier per layer: [{layer, train_acc, test_acc}]."""
    ytr_t, yte_t = torch.from_numpy(ytr).to(dev), torch.from_numpy(yte).to(dev)
    per_layer = []
    for l in range(len(ftr)):
        tr, te = train_linear(torch.from_numpy(ftr[l]).to(dev), ytr_t, torch.from_numpy(fte[l]).to(dev), yte_t,
                              num_classes, probe_cfg["epochs"], float(probe_cfg["lr"]), int(probe_cfg["batch_size"]),
                              float(probe_cfg["weight_decay"]), int(probe_cfg["seed"]))
        per_layer.append({"layer": l, "train_acc": round(tr, 6), "test_acc": round(te, 6)})
        if progress:
            print(f"[probe] layer {l}: train {tr:.4f} test {te:.4f}", file=sys.stderr)
    return per_layer


def probe_stage(checkpoint: str, train_files: list[str], test_files: list[str], out_json: str,
                probe_cfg: dict, *, device: str = "auto", progress: bool = True) -> dict:
    """Probe every layer of ``checkpoint`` on the token files, write ``out_json`` atomically."""
    from .train import load_model

    t0 = time.time()
    dev = resolve_device(device)
    model, ckpt_meta = load_model(str(checkpoint), ema=bool(probe_cfg.get("ema", True)), device=dev)
    c = model.config
    xtr_tok, ytr, info = _load_split(list(train_files), probe_cfg.get("max_train"))
    xte_tok, yte, _ = _load_split(list(test_files))
    for name, t in (("train", xtr_tok), ("test", xte_tok)):
        _check_tokens(name, t, c)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    bs = int(probe_cfg["batch_size"])
    ftr = extract_features(model, xtr_tok, bs, dev, progress, "probe features train")
    fte = extract_features(model, xte_tok, bs, dev, progress, "probe features test")
    per_layer = _probe_layers(ftr, fte, ytr, yte, num_classes, probe_cfg, dev, progress)
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
