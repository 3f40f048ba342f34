"""Sample stage: draw samples from a trained generator (DiGIT step 8, the 50k samples for FID/IS):
token grids from the stage-1 GPT (autoregressive, KV cache) or a MaskGIT model (iterative
mask-predict decoding), continuous KL latents from MAR (masked, random order) or its causal
variant, as the checkpoint's ``family`` says (``families.FAMILIES``). ``render.py`` turns them
into pixels.

Layout of ``out_dir``::

    parts/part-{j:05d}.npy    tokens (m, h, w) uint16 of samples [j*chunk, j*chunk + m), or
                              latents (m, h, w, C) float32 (latent families, in the scaled space
                              the generator was trained in)
    parts/part-{j:05d}.json   labels of the part, its range and the hash of every parameter that
                              decides its contents; written last, so it marks the part finished
    tokens.npy                (n_total, h, w) uint16, all parts in order (latents.npy for latents)
    labels.npy                (n_total,) int64, -1 for an unconditional model
    samples.json              checkpoint + sha256, every sampling parameter, seed rule, timings,
                              and ``tokenizer``: what the model's token shards record (centroids /
                              VQ / KL checkpoint sha256, encoder, latent scale), which rendering
                              checks

Which samples: a class-conditional model gets exactly ``n_per_class`` samples of each class
0..C-1 in class-major order (labels 0,0,..,1,1,..); an unconditional model gets ``n`` samples.

Seeds: sample i (global index) is drawn with its own generator seeded with
``seed * 1_000_003 + i`` (``sample_seed``); both samplers draw a fixed number of uniforms per token
and step from it, so a sample depends neither on ``batch_size`` nor ``chunk`` nor on the number of
processes.

Resuming: a restarted run skips every part whose json holds the same parameter hash (checkpoint
sha256, EMA or not, the family's sampling settings (temperature, top_k, top_p, cfg_scale, seed;
iterations and choice_temperature for MaskGIT; num_iter, num_sampling_steps and cfg_schedule for
MAR), sample counts, chunk) and redoes the others.
Changing a parameter therefore regenerates everything; changing ``batch_size`` or the device does
not.

Several processes: with env ``WORLD_SIZE`` > 1 and ``RANK`` set (e.g. a SLURM array or torchrun,
no torch.distributed used), rank r produces the parts j with j % WORLD_SIZE == r. Any process that,
after its own parts, finds every part finished writes the final files (atomically, so two writers
are harmless); the others return ``{"complete": False, ...}``. A last run with WORLD_SIZE unset
always assembles.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoints import load_generator
from .config import ConfigError
from .devices import resolve_device
from .families import family
from .io import write_json_atomic, write_npy_atomic
from .provenance import model_tokenizer, record_to_json

SAMPLE_FILES = {"tokens": "tokens.npy", "latents": "latents.npy"}   # by the family's output kind
SEED_STRIDE = 1_000_003
SEED_RULE = f"sample i uses torch.Generator seeded with seed * {SEED_STRIDE} + i"


def sample_seed(seed: int, i: int) -> int:
    return int(seed) * SEED_STRIDE + int(i)


def plan_labels(num_classes: int, sample_cfg: dict) -> np.ndarray:
    """Labels of every sample: class-major n_per_class of each class, or n times -1."""
    if num_classes > 0:
        return np.repeat(np.arange(num_classes, dtype=np.int64), int(sample_cfg["n_per_class"]))
    return np.full(int(sample_cfg["n"]), -1, dtype=np.int64)


def sampling_keys(fam_name: str, sample_cfg: dict, what: str, drop: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The sampling settings of family ``fam_name`` (less ``drop``); ConfigError naming the missing
    ones when ``sample_cfg`` lacks any (a MaskGIT model sampled with a GPT's settings section)."""
    keys = tuple(k for k in family(fam_name).sample_keys if k not in drop)
    missing = [k for k in keys if k not in sample_cfg]
    if missing:
        raise ConfigError(f"{what} is a {fam_name!r} model, whose sampling needs {', '.join(missing)}, absent "
                          f"from the settings given (a MaskGIT model samples with maskgit.sample or "
                          f"stage2_nar.sample)")
    return keys


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _part_paths(out_dir: Path, j: int) -> tuple[Path, Path]:
    base = out_dir / "parts" / f"part-{j:05d}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def _part_done(out_dir: Path, j: int, phash: str, start: int, stop: int) -> bool:
    npy, js = _part_paths(out_dir, j)
    if not (npy.is_file() and js.is_file()):
        return False
    try:
        meta = json.loads(js.read_text())
        shape = np.load(npy, mmap_mode="r").shape
    except (OSError, ValueError):
        return False
    return (meta.get("params_hash") == phash and meta.get("start") == start and meta.get("stop") == stop
            and shape[0] == stop - start)


def _world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0) if world > 1 else 0
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} outside WORLD_SIZE {world}")
    return rank, world


def run_parts(out: Path, labels: np.ndarray, chunk: int, phash: str, make_part, *, progress: bool = True,
              desc: str = "parts") -> dict:
    """Produce every unfinished part ``[j*chunk, ...)`` of this rank with ``make_part(start, stop)``
    (an array whose first axis is the samples), each written atomically with its json last.
    Returns whether all parts (of every rank) are now finished, and counts for the metadata."""
    from tqdm import tqdm

    n_total = len(labels)
    n_parts = (n_total + chunk - 1) // chunk
    ranges = [(j * chunk, min(n_total, (j + 1) * chunk)) for j in range(n_parts)]
    rank, world = _world()
    mine = [j for j in range(n_parts) if j % world == rank]
    todo = [j for j in mine if not _part_done(out, j, phash, *ranges[j])]
    made, seconds = 0, 0.0
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="part", disable=not progress,
              file=sys.stderr) as bar:
        for j in todo:
            start, stop = ranges[j]
            t0 = time.time()
            arr = make_part(start, stop)
            seconds += time.time() - t0
            made += stop - start
            npy, js = _part_paths(out, j)
            write_npy_atomic(npy, arr)
            write_json_atomic(js, {"params_hash": phash, "start": start, "stop": stop,
                                   "labels": labels[start:stop].tolist()})
            bar.update(1)
    complete = all(_part_done(out, j, phash, *ranges[j]) for j in range(n_parts))
    return {"complete": complete, "rank": rank, "world_size": world, "parts": n_parts, "made_samples": made,
            "seconds": seconds, "params_hash": phash}


def gather_parts(out: Path, labels: np.ndarray, chunk: int) -> np.ndarray:
    """All finished parts concatenated in order (labels checked against the plan)."""
    arrays = []
    for j, start in enumerate(range(0, len(labels), chunk)):
        npy, js = _part_paths(out, j)
        if json.loads(js.read_text())["labels"] != labels[start:start + chunk].tolist():
            raise RuntimeError(f"labels of {js} do not match the plan")
        arrays.append(np.load(npy))
    return np.concatenate(arrays)


def sample_stage(checkpoint: str, out_dir: str, sample_cfg: dict, *, device: str = "auto",
                 progress: bool = True) -> dict:
    """Sample tokens from ``checkpoint`` into ``out_dir`` (see the module docstring). Returns the
    samples.json dict, or {"complete": False, ...} if other ranks still have parts to do."""
    t_start = time.time()
    dev = resolve_device(device)
    out = Path(out_dir)
    ema = bool(sample_cfg.get("ema", True))
    model, ckpt_meta = load_generator(str(checkpoint), ema=ema, device=dev)
    fam = family(ckpt_meta["family"])
    keys = sampling_keys(fam.name, sample_cfg, str(checkpoint))
    ckpt_sha = ckpt_meta["sha256"]
    c = model.config
    if getattr(c, "context_len", 0):
        raise ValueError(f"{checkpoint} is a stage-2 model (it needs a context grid): render with it instead")
    h, w = c.grid
    labels = plan_labels(c.num_classes, sample_cfg)
    n_total = len(labels)
    chunk = int(sample_cfg["chunk"])
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    cfg_scale = float(sample_cfg["cfg_scale"])
    if c.num_classes == 0 and cfg_scale != 1.0:
        raise ValueError("cfg_scale != 1 needs a class-conditional model")
    latents = fam.output == "latents"
    if not latents and c.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab {c.vocab_size} does not fit uint16 tokens")

    params = {k: sample_cfg[k] for k in keys}
    params.update(checkpoint_sha256=ckpt_sha, weights=ckpt_meta["weights"], n_total=n_total,
                  num_classes=c.num_classes, chunk=chunk, seed_rule=SEED_RULE)

    def make_part(start: int, stop: int) -> np.ndarray:
        lab = labels[start:stop]
        drawn = fam.draw(model, stop - start, labels=None if c.num_classes == 0 else torch.from_numpy(lab),
                         context=None, seeds=[sample_seed(sample_cfg["seed"], i) for i in range(start, stop)],
                         cfg=params, batch_size=int(sample_cfg["batch_size"]))
        if latents:   # (m, L, C) float, in the generator's scaled latent space
            return drawn.float().cpu().numpy().reshape(-1, h, w, c.token_dim)
        return drawn.cpu().numpy().astype(np.uint16).reshape(-1, h, w)

    run = run_parts(out, labels, chunk, params_hash(params), make_part, progress=progress,
                    desc=f"sample {Path(out_dir).name}")
    if not run["complete"]:
        return run
    phash, n_parts, world = run["params_hash"], run["parts"], run["world_size"]
    made, t_sampling = run["made_samples"], run["seconds"]
    write_npy_atomic(out / SAMPLE_FILES[fam.output], gather_parts(out, labels, chunk))
    write_npy_atomic(out / "labels.npy", labels)
    meta = {
        "stage": "sample", "family": fam.name, "checkpoint": str(checkpoint), "checkpoint_sha256": ckpt_sha,
        "weights": ckpt_meta["weights"], "model_step": ckpt_meta.get("step"),
        "model_config": ckpt_meta.get("model_config"), "sample_cfg": dict(sample_cfg),
        **{k: sample_cfg[k] for k in keys}, "batch_size": int(sample_cfg["batch_size"]),
        "chunk": chunk, "n": n_total, "n_per_class": int(sample_cfg["n_per_class"]) if c.num_classes else None,
        "num_classes": c.num_classes, "grid": [h, w], "output": SAMPLE_FILES[fam.output],
        **({"token_dim": c.token_dim} if latents else {"vocab_size": c.vocab_size}),
        "labels_rule": "class-major, n_per_class per class" if c.num_classes else "unconditional: -1",
        "seed_rule": SEED_RULE, "params_hash": phash, "parts": n_parts, "world_size": world,
        "tokenizer": record_to_json(model_tokenizer(ckpt_meta.get("token_files"))),
        "device": str(dev), "made_samples_this_run": made,
        "sampling_seconds_this_run": round(t_sampling, 3),
        "tokens_per_s": round(made * h * w / t_sampling, 1) if t_sampling > 0 else None,
        "seconds": round(time.time() - t_start, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": True,
    }
    write_json_atomic(out / "samples.json", meta)
    print(f"[sample] {n_total} samples ({made} new) -> {out}", file=sys.stderr)
    return meta
