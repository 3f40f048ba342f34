"""Training checkpoints: writing, reading, the resume check, and loading any trained generator.

A checkpoint is one ``torch.save`` dict (loads with ``weights_only=True``):

    format, family, model_config, model, optimizer, scheduler, ema, step, data_position, rng,
    train_cfg, token_files, elapsed, num_params

``last.pt`` is rewritten every ``checkpoint_every`` steps and at the end, keeping the one before
as ``prev.pt`` (``write`` with ``previous``: a kill at any moment leaves a complete checkpoint at
one of the two names); ``final.pt`` is a copy of it once all ``steps`` are done. A run resumes
from ``last.pt`` (or ``prev.pt`` when ``last.pt`` is damaged or missing) only when the settings
that shape the model and its data (everything but ``RESUME_FREE_KEYS``) and the input files
(size and sha256) are the same, and it has not gone past a now smaller ``steps``.

``read`` turns every unreadable, truncated, corrupt or foreign file into a ValueError naming it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .families import family
from .io import atomic_path, file_sha256, load_torch, tmp_path_for

FORMAT = "digit-stage1-v1"   # the name predates other families; kept so older runs still resume
DEFAULT_FAMILY = "gpt"       # checkpoints written before the family was recorded
# keys of train_cfg that may change between an interrupted run and its resumption
RESUME_FREE_KEYS = ("steps", "log_every", "checkpoint_every", "device", "processes")
# what a checkpoint must hold to load a generator from it, and to resume training from it
GENERATOR_KEYS = ("model_config", "model", "step", "train_cfg")
RESUME_KEYS = GENERATOR_KEYS + ("optimizer", "scheduler", "data_position", "rng")


def normalise_cfg(cfg: dict) -> dict:
    """The JSON round trip of a config (tuples become lists), as it is stored and compared."""
    return json.loads(json.dumps(cfg, sort_keys=True))


def resume_key(cfg: dict) -> dict:
    return {k: v for k, v in normalise_cfg(cfg).items() if k not in RESUME_FREE_KEYS}


def file_ids(files: list[str]) -> list[dict]:
    """Identity of the training inputs: path, size and sha256 of every file."""
    return [{"path": f, "size": os.path.getsize(f), "sha256": file_sha256(f)} for f in files]


def read(path: str | Path, device="cpu", needs: tuple[str, ...] = GENERATOR_KEYS) -> dict:
    """A training checkpoint (tensors and plain data only) holding the keys ``needs``; ValueError
    naming the file when it is unreadable, truncated, corrupt, holds pickled objects, or is not one."""
    ck = load_torch(path, device)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        what = f"format {ck.get('format')!r}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        raise ValueError(f"{path}: not a training checkpoint ({what}; expected format {FORMAT!r})")
    missing = [k for k in needs if k not in ck]
    if missing:
        raise ValueError(f"{path}: incomplete training checkpoint (no {', '.join(missing)})")
    return ck


def write(path: str | Path, checkpoint: dict, previous: str | Path | None = None) -> None:
    """Save ``checkpoint`` at ``path``; with ``previous``, the file now at ``path`` moves there.

    Order: the temp file (complete and synced), then ``path`` -> ``previous``, then temp -> ``path``.
    A kill while writing the temp leaves both old files; between the renames, ``previous`` holds
    the newest complete checkpoint and ``path`` is missing; the temp is a stale one either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def copy(src: str | Path, dst: str | Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def resumable(ck: dict, cfg: dict, inputs: list[dict], total_steps: int) -> bool:
    """Whether checkpoint ``ck`` continues a run of ``cfg`` over ``inputs`` (see the module docstring)."""
    same_files = [(f["size"], f["sha256"]) for f in ck.get("token_files", [])] == \
                 [(f["size"], f["sha256"]) for f in inputs]
    beyond = int(ck.get("step", 0)) > total_steps
    return (ck.get("format") == FORMAT and resume_key(ck["train_cfg"]) == resume_key(cfg) and same_files
            and not beyond)


# -- RNG state ---------------------------------------------------------------------------------------

def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


# -- inference ---------------------------------------------------------------------------------------

def load_generator(checkpoint: str, ema: bool = True, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A frozen trained generator of any family (EMA weights when present and ``ema``), in eval
    mode, and what the checkpoint says about it."""
    ck = read(checkpoint, device)
    use_ema = bool(ema and ck.get("ema") is not None)
    try:
        fam = family(ck.get("family", DEFAULT_FAMILY))
        model = fam.build(ck["model_config"])
        model.load_state_dict(ck["ema"] if use_ema else ck["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:   # a config or weights that do not fit
        raise ValueError(f"{checkpoint}: cannot build its {ck.get('family', DEFAULT_FAMILY)!r} model: {e}") from e
    model.to(device).eval().requires_grad_(False)
    meta = {"family": fam.name, "step": ck["step"], "train_cfg": ck["train_cfg"],
            "model_config": fam.config_dict(model), "sha256": file_sha256(checkpoint), "ema": use_ema,
            "weights": "ema" if use_ema else "model", "num_params": ck.get("num_params"),
            "token_files": ck.get("token_files")}
    return model, meta
