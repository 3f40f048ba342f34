"""Tiny default encoder: a small timm ViT trained on the training shards (no SSL weights exist here).

Objective: supervised classification (label smoothing 0.1) on the patch tokens' mean, so the
patch tokens themselves become discriminative. Inputs are the same views the tokenizer uses
(a fresh seeded random crop + flip each epoch; images are decoded once and
views cut by slicing, since this small model trains faster than PNGs decode). Held-out accuracy on the test split's centre
views is recorded in the checkpoint's metadata and in `encoder.json`.
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
from PIL import Image
from tqdm import tqdm

from .data import ShardViews, ViewSpec, encoder_input, index_shard, read_image, resized_size, view_params
from .encoders import save_timm_encoder
from .io import write_json_atomic

BASE_MODEL = "vit_tiny_patch16_224"  # timm family member; every size below is overridden


def model_kwargs(train_cfg: dict, spec: ViewSpec, num_classes: int) -> dict:
    return {"img_size": spec.image_size, "patch_size": train_cfg["patch_size"], "embed_dim": train_cfg["embed_dim"],
            "depth": train_cfg["depth"], "num_heads": train_cfg["num_heads"], "num_classes": num_classes,
            "global_pool": "avg", "class_token": False}


def load_resized_images(tar_paths, spec: ViewSpec) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Decode every image once, resized (shorter side = spec.resize); tiny datasets only.

    Returns uint8 (N, H, W, 3), keys, labels. Views are then cut by slicing, with the same
    seeded crop parameters as the tokens stage (`view_params`), so no image is decoded twice.
    """
    data = ShardViews(tar_paths, spec)
    images, size = [], None
    for path, sample in tqdm(data.entries, desc="decode", unit="img", file=sys.stderr, mininterval=2):
        img = read_image(path, sample)
        img = img.resize(resized_size(img.width, img.height, spec.resize), Image.BICUBIC)
        if size is not None and img.size != size:
            raise ValueError(f"the tiny encoder trainer needs images of one size; {sample.key} is {img.size}, "
                             f"others {size}")
        size = img.size
        images.append(np.asarray(img, dtype=np.uint8))
    return np.stack(images), data.keys, np.asarray(data.labels, dtype=np.int64)


def cut_views(images: np.ndarray, keys: list[str], view: int, seed: int, spec: ViewSpec,
              sizes: tuple[int, int]) -> torch.Tensor:
    """uint8 (N,3,crop,crop): view `view` of every image (view 0 = centre crop)."""
    c = spec.crop
    out = np.empty((len(images), c, c, 3), dtype=np.uint8)
    for i, key in enumerate(keys):
        left, top, flip = view_params(seed, key, view, sizes[0], sizes[1], spec)
        crop = images[i, top:top + c, left:left + c]
        out[i] = crop[:, ::-1] if flip else crop
    return torch.from_numpy(out).permute(0, 3, 1, 2)


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

    torch.manual_seed(train_cfg["seed"])
    t0 = time.time()
    train_images, train_keys, train_labels = load_resized_images(train_tars, spec)
    test_images, test_keys, test_labels = load_resized_images(test_tars, spec)
    orig_size = _original_size(train_tars)
    kwargs = model_kwargs(train_cfg, spec, num_classes)
    model = timm.create_model(BASE_MODEL, pretrained=False, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    bs, epochs, n = train_cfg["batch_size"], train_cfg["epochs"], len(train_images)
    total = epochs * math.ceil(n / bs)
    warmup = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    gen = torch.Generator().manual_seed(train_cfg["seed"])
    history = []
    for epoch in range(epochs):
        model.train()
        views = cut_views(train_images, train_keys, 1 + epoch, train_cfg["seed"], spec, orig_size)
        order = torch.randperm(n, generator=gen)
        running, steps = 0.0, 0
        for start in tqdm(range(0, n, bs), desc=f"encoder epoch {epoch + 1}/{epochs}", disable=not progress,
                          file=sys.stderr, mininterval=2):
            idx = order[start:start + bs]
            x = encoder_input(views[idx], spec)
            loss = F.cross_entropy(model(x), torch.from_numpy(train_labels[idx.numpy()]), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running, steps = running + loss.item(), steps + 1
        test_views = cut_views(test_images, test_keys, 0, train_cfg["seed"], spec, _original_size(test_tars))
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
            "view_spec": {"resize": spec.resize, "crop": spec.crop, "image_size": spec.image_size,
                          "mean": list(spec.mean), "std": list(spec.std)},
            "seconds": round(time.time() - t0, 1)}
    save_timm_encoder(out_path, BASE_MODEL, kwargs, model.state_dict(), meta)
    write_json_atomic(Path(out_path).with_suffix(".json"), {"arch": f"timm:{BASE_MODEL}", "model_kwargs": kwargs, **meta})
    print(f"[encoder] test accuracy {accuracy:.4f} -> {out_path}", file=sys.stderr)
    return meta


def _original_size(tar_paths) -> tuple[int, int]:
    """Size of the first image (all images share it, see `load_resized_images`)."""
    return read_image(tar_paths[0], index_shard(tar_paths[0])[0]).size
