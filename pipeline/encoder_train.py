"""Tiny default encoder: a small timm ViT trained on the training shards (no SSL weights exist here).

Objective: supervised classification (label smoothing 0.1) on the patch tokens' mean, so the
patch tokens themselves become discriminative. Inputs are the same views the tokenizer uses
(a fresh seeded random crop + flip each epoch). Held-out accuracy on the test split's centre
views is recorded in the checkpoint's metadata and in `encoder.json`.
Real configs skip this stage and point `encoder.checkpoint` at DINOv2 weights.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import ShardViews, ViewSpec, encoder_input
from .encode import make_loader
from .encoders import save_timm_encoder
from .io import write_json_atomic

BASE_MODEL = "vit_tiny_patch16_224"  # timm family member; every size below is overridden


def model_kwargs(train_cfg: dict, spec: ViewSpec, num_classes: int) -> dict:
    return {"img_size": spec.image_size, "patch_size": train_cfg["patch_size"], "embed_dim": train_cfg["embed_dim"],
            "depth": train_cfg["depth"], "num_heads": train_cfg["num_heads"], "num_classes": num_classes,
            "global_pool": "avg", "class_token": False}


@torch.no_grad()
def evaluate(model, tar_paths, spec: ViewSpec, batch_size: int, num_workers: int) -> float:
    model.eval()
    data = ShardViews(tar_paths, spec, views=(0,))
    correct = 0
    for views, labels, _, _ in make_loader(data, batch_size, num_workers):
        correct += (model(encoder_input(views[:, 0], spec)).argmax(1) == labels).sum().item()
    return correct / max(1, len(data))


def train_encoder(train_tars, test_tars, out_path: str | Path, spec: ViewSpec, train_cfg: dict, *,
                  num_classes: int, num_workers: int = 0, progress: bool = True) -> dict:
    import timm
    from tqdm import tqdm

    torch.manual_seed(train_cfg["seed"])
    kwargs = model_kwargs(train_cfg, spec, num_classes)
    model = timm.create_model(BASE_MODEL, pretrained=False, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    bs, epochs = train_cfg["batch_size"], train_cfg["epochs"]
    steps_per_epoch = math.ceil(len(ShardViews(train_tars, spec).entries) / bs)
    total = epochs * steps_per_epoch
    warmup = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    history, t0 = [], time.time()
    for epoch in range(epochs):
        model.train()
        data = ShardViews(train_tars, spec, views=(1 + epoch,), seed=train_cfg["seed"])
        gen = torch.Generator().manual_seed(train_cfg["seed"] * 1000 + epoch)
        loader = torch.utils.data.DataLoader(data, batch_size=bs, shuffle=True, generator=gen, drop_last=False,
                                             num_workers=num_workers,
                                             multiprocessing_context="fork" if num_workers else None)
        running = 0.0
        for step, (views, labels, _, _) in enumerate(tqdm(loader, desc=f"encoder epoch {epoch + 1}/{epochs}",
                                                          disable=not progress, file=sys.stderr)):
            loss = F.cross_entropy(model(encoder_input(views[:, 0], spec)), labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item()
        history.append({"epoch": epoch + 1, "train_loss": running / max(1, step + 1),
                        "seconds": round(time.time() - t0, 1)})
        print(f"[encoder] epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}", file=sys.stderr)
    accuracy = evaluate(model, test_tars, spec, bs, num_workers)
    meta = {"objective": "supervised classification, label smoothing 0.1", "test_accuracy": accuracy,
            "history": history, "train_config": train_cfg, "num_classes": num_classes,
            "train_shards": [str(p) for p in train_tars], "test_shards": [str(p) for p in test_tars],
            "view_spec": {"resize": spec.resize, "crop": spec.crop, "image_size": spec.image_size,
                          "mean": list(spec.mean), "std": list(spec.std)},
            "seconds": round(time.time() - t0, 1)}
    save_timm_encoder(out_path, BASE_MODEL, kwargs, model.state_dict(), meta)
    write_json_atomic(Path(out_path).with_suffix(".json"), {"arch": f"timm:{BASE_MODEL}", "model_kwargs": kwargs, **meta})
    print(f"[encoder] test accuracy {accuracy:.4f} -> {out_path}", file=sys.stderr)
    return meta
