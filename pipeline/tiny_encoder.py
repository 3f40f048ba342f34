"""Tiny default encoder: a small timm ViT trained on the training shards (no SSL weights exist here).

Objective: supervised classification (label smoothing 0.1) on the patch tokens' mean, so the
patch tokens themselves become discriminative. Inputs are the same views the tokenizer uses
(a fresh seeded random crop + flip each epoch; images are decoded once and views cut by slicing,
since this small model trains faster than PNGs decode). Held-out accuracy on the test split's
centre views is recorded in the checkpoint's metadata and in `encoder.json`.
Real configs skip this stage and point `encoder.checkpoint` at DINOv2 weights.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import ViewSpec, cut_views, encoder_input, index_shard, load_resized_images, original_size
from .encoder_loading import TINY_BASE_MODEL, save_timm_encoder
from .errors import StageFailed
from .io import write_json_atomic
from .train_steps import optimizer_step, shuffled_batches, warmup_cosine

BASE_MODEL = TINY_BASE_MODEL


def model_kwargs(train_cfg: dict, spec: ViewSpec, num_classes: int) -> dict:
    return {"img_size": spec.image_size, "patch_size": train_cfg["patch_size"], "embed_dim": train_cfg["embed_dim"],
            "depth": train_cfg["depth"], "num_heads": train_cfg["num_heads"], "num_classes": num_classes,
            "global_pool": "avg", "class_token": False}


@torch.no_grad()
def evaluate(model, views: torch.Tensor, labels: np.ndarray, spec: ViewSpec, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(views), batch_size):
        logits = model(encoder_input(views[start:start + batch_size], spec))
        correct += (logits.argmax(1).numpy() == labels[start:start + batch_size]).sum()
    return float(correct) / max(1, len(views))


def train_encoder(train_tars, test_tars, out_path: str | Path, spec: ViewSpec, train_cfg: dict, *,
                  num_classes: int, progress: bool = True) -> dict:
    import timm

    seed = train_cfg["seed"]
    torch.manual_seed(seed)
    t0 = time.time()
    train_images, train_keys, train_labels = load_resized_images(train_tars, spec)
    test_images, test_keys, test_labels = load_resized_images(test_tars, spec)
    train_size = original_size(train_tars)
    kwargs = model_kwargs(train_cfg, spec, num_classes)
    model = timm.create_model(BASE_MODEL, pretrained=False, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    bs, epochs = train_cfg["batch_size"], train_cfg["epochs"]
    sched = warmup_cosine(opt, epochs * math.ceil(len(train_images) / bs), 0.05)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        views = cut_views(train_images, train_keys, 1 + epoch, seed, spec, train_size)
        running, steps = 0.0, 0
        for idx, batch in shuffled_batches(views, bs, gen, desc=f"encoder epoch {epoch + 1}/{epochs}",
                                           progress=progress):
            logits = model(encoder_input(batch, spec))
            loss = F.cross_entropy(logits, torch.from_numpy(train_labels[idx.numpy()]), label_smoothing=0.1)
            optimizer_step(model, opt, sched, loss)
            running, steps = running + loss.item(), steps + 1
        test_views = cut_views(test_images, test_keys, 0, seed, spec, original_size(test_tars))
        acc = evaluate(model, test_views, test_labels, spec, 500)
        history.append({"epoch": epoch + 1, "train_loss": round(running / max(1, steps), 5), "test_accuracy": acc,
                        "seconds": round(time.time() - t0, 1)})
        print(f"[encoder] epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, test accuracy {acc:.4f}",
              file=sys.stderr)
    accuracy = history[-1]["test_accuracy"]
    meta = {"objective": "supervised classification, label smoothing 0.1", "test_accuracy": accuracy,
            "test_images": len(test_images), "history": history, "train_config": train_cfg,
            "num_classes": num_classes,
            "train_shards": [str(p) for p in train_tars], "test_shards": [str(p) for p in test_tars],
            "view_spec": spec.to_dict(), "seconds": round(time.time() - t0, 1)}
    save_timm_encoder(out_path, BASE_MODEL, kwargs, model.state_dict(), meta)
    write_json_atomic(Path(out_path).with_suffix(".json"),
                      {"arch": f"timm:{BASE_MODEL}", "model_kwargs": kwargs, **meta})
    print(f"[encoder] test accuracy {accuracy:.4f} -> {out_path}", file=sys.stderr)
    return meta


def train_encoder_stage(config: dict, train_tars, test_tars, out_path: str | Path, *, progress: bool = True) -> dict:
    """The train-encoder stage as the config describes it (``encoder.train``); StageFailed below
    ``encoder.train.min_test_accuracy``."""
    enc = config["encoder"]
    if enc["train"] is None:
        raise ConfigError("config key 'encoder.train' is null: nothing to train (real runs use encoder.checkpoint)")
    num_classes = 1 + max(s.label for p in train_tars for s in index_shard(p))
    meta = train_encoder(train_tars, test_tars, out_path, ViewSpec.from_config(enc), enc["train"],
                         num_classes=num_classes, progress=progress)
    floor = enc["train"]["min_test_accuracy"]
    if meta["test_accuracy"] < floor:
        raise StageFailed(f"tiny encoder test accuracy {meta['test_accuracy']:.4f} < "
                          f"encoder.train.min_test_accuracy {floor}")
    return meta
