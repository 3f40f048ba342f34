"""Stage-1 training (DiGIT step 5): the GPT of ``models/gpt.py`` over token grids, with exact resume.

    summary = train_stage1(train_cfg, token_files, out_dir, max_steps=None)
    model, meta = load_model(out_dir + "/final.pt", ema=True)

Data. ``TokenDataset`` memory-maps every ``{split}-{i:06d}.npy`` token shard (N, V, h, w) and
concatenates them. Each epoch has its own deterministic order (``torch.randperm`` seeded by
``seed + epoch``) and sample i of epoch e uses view ``hash(seed, e, i) % V``. A global batch is the
next ``batch_size`` samples of that stream (running on into the next epoch when one ends); the
stream position ``(epoch, index)`` is saved in the checkpoint, so a resumed run reads exactly the
samples the uninterrupted run would have read.

Steps. Global batch -> ``grad_accum`` micro-batches -> each split over the ranks with a stride
(rank r takes rows r, r+W, ...), so the gradient equals the single-process one. The torch RNG
(dropout, label dropout) is reseeded from (seed, step, rank) before every step: resume does not
depend on RNG state left over from earlier steps (the states are still saved).

Checkpoints (``last.pt``, atomic, every ``checkpoint_every`` steps and at the end; ``final.pt``
when all ``steps`` are done) load with ``torch.load(weights_only=True)``.

Test hook: the environment variable ``DIGIT_INJECT_NAN_AT_STEP=k`` replaces the loss of step k
(1-based) with NaN, to exercise the non-finite-loss stop (``FloatingPointError``, no checkpoint of
the bad step).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .encode import autocast_for, resolve_device
from .io import atomic_path, file_sha256, write_json_atomic
from .models.gpt import GPT, GPTConfig

CKPT_FORMAT = "digit-stage1-v1"
METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm", "elapsed", "mfu"]
# keys of train_cfg that may change between an interrupted run and its resumption
RESUME_FREE_KEYS = ("steps", "log_every", "checkpoint_every", "device", "processes")
# dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12}

_M64 = (1 << 64) - 1


# -- data --------------------------------------------------------------------------------------------

def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _mix(*ints: int) -> int:
    h = np.zeros(1, dtype=np.uint64)
    for v in ints:
        with np.errstate(over="ignore"):
            h = _splitmix64(h ^ np.uint64(int(v) & _M64))
    return int(h[0])


def _open_token_files(files: list[str]) -> tuple[list[np.ndarray], list[dict], tuple[int, int], int]:
    """Memory-map (N, V, h, w) token shards; check their grids and codebooks agree."""
    arrays, metas, grid0, k0 = [], [], None, None
    for f in files:
        arr = np.load(f, mmap_mode="r")
        meta = json.loads(Path(f).with_suffix(".json").read_text())
        if arr.ndim != 4:
            raise ValueError(f"{f}: expected (N, V, h, w) tokens, got shape {arr.shape}")
        grid = tuple(int(g) for g in meta["grid"])
        if tuple(arr.shape[2:]) != grid:
            raise ValueError(f"{f}: grid {arr.shape[2:]} != metadata grid {grid}")
        if grid0 is None:
            grid0, k0 = grid, int(meta["codebook_size"])
        elif grid != grid0 or int(meta["codebook_size"]) != k0:
            raise ValueError(f"{f}: grid/codebook {grid}/{meta['codebook_size']} differ from "
                             f"{grid0}/{k0} of {files[0]}")
        arrays.append(arr)
        metas.append(meta)
    return arrays, metas, grid0, k0


class TokenDataset:
    """All token shards as one indexable set of N images x V views (memory-mapped).

    With ``context_files`` (stage 2) every token shard has a partner holding the DiGIT tokens of
    the same images and views (same keys, same crops); a batch then also returns the partner's
    grids for the same (image, view) pairs."""

    def __init__(self, token_files: list[str], seed: int = 0, context_files: list[str] | None = None):
        if not token_files:
            raise ValueError("no token files given")
        self.files = [str(f) for f in token_files]
        self.seed = int(seed)
        self.arrays, metas, self.grid, self.codebook_size = _open_token_files(self.files)
        labels, sizes = [], []
        for f, arr, meta in zip(self.files, self.arrays, metas):
            lab = np.asarray(meta.get("labels", [0] * arr.shape[0]), dtype=np.int64)
            if len(lab) != arr.shape[0]:
                raise ValueError(f"{f}: {len(lab)} labels for {arr.shape[0]} images")
            labels.append(lab)
            sizes.append(arr.shape[0])
        self.labels = np.concatenate(labels)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise ValueError("token files hold no images")
        self.context_files = [str(f) for f in context_files] if context_files else None
        self.context_arrays = None
        if self.context_files:
            self._open_context(metas)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _open_context(self, metas: list[dict]) -> None:
        if len(self.context_files) != len(self.files):
            raise ValueError(f"{len(self.context_files)} context files for {len(self.files)} token files")
        arrays, cmetas, self.context_grid, self.context_codebook_size = _open_token_files(self.context_files)
        for f, cf, arr, carr, meta, cmeta in zip(self.files, self.context_files, self.arrays, arrays, metas, cmetas):
            if carr.shape[:2] != arr.shape[:2]:
                raise ValueError(f"{cf}: {carr.shape[0]} images x {carr.shape[1]} views, but its partner {f} "
                                 f"has {arr.shape[0]} x {arr.shape[1]}")
            if "keys" in meta and "keys" in cmeta and list(meta["keys"]) != list(cmeta["keys"]):
                raise ValueError(f"{cf} and {f} list different image keys: they must come from the same shard")
            if "crops" in meta and "crops" in cmeta and meta["crops"] != cmeta["crops"]:
                raise ValueError(f"{cf} and {f} hold different crops: tokenize both from the same views")
        self.context_arrays = arrays

    def __len__(self) -> int:
        return self.n

    @property
    def num_classes(self) -> int:
        if self.labels.min() < 0:
            raise ValueError("class-conditional training needs labels >= 0 for every image")
        return int(self.labels.max()) + 1

    def order(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_cache = (epoch, torch.randperm(self.n, generator=g).numpy())
        return self._perm_cache[1]

    def view_of(self, epoch: int, idx: np.ndarray) -> np.ndarray:
        """Hash of (seed, epoch, sample index) for every index; caller takes it modulo V."""
        base = np.uint64(_mix(self.seed, epoch))
        return _splitmix64(np.asarray(idx, dtype=np.uint64) ^ base)

    def next_batch(self, pos: tuple[int, int], size: int, with_context: bool = False):
        """The next ``size`` samples of the stream from position (epoch, index):
        tokens (size, h*w) int64, labels (size,) int64, and the position after them; with
        ``with_context`` also the context tokens (size, h'*w') of the same images and views,
        returned as (tokens, context, labels, position)."""
        epoch, i = pos
        parts = []
        need = size
        while need > 0:
            take = min(need, self.n - i)
            idx = self.order(epoch)[i:i + take]
            parts.append((epoch, idx))
            need -= take
            i += take
            if i == self.n:
                epoch, i = epoch + 1, 0
        toks = np.concatenate([self._gather(self.arrays, self.grid, ep, idx) for ep, idx in parts])
        labs = np.concatenate([self.labels[idx] for _, idx in parts])
        if not with_context:
            return toks, labs, (epoch, i)
        if self.context_arrays is None:
            raise ValueError("this dataset has no context files")
        ctx = np.concatenate([self._gather(self.context_arrays, self.context_grid, ep, idx) for ep, idx in parts])
        return toks, ctx, labs, (epoch, i)

    def _gather(self, arrays: list[np.ndarray], grid: tuple[int, int], epoch: int, idx: np.ndarray) -> np.ndarray:
        """(len(idx), h*w) int64 grids of images ``idx`` at the views that epoch assigns them."""
        h = self.view_of(epoch, idx)
        f = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx),) + grid, dtype=np.int64)
        for k in np.unique(f):
            sel = np.nonzero(f == k)[0]
            arr = arrays[k]
            local = idx[sel] - self.offsets[k]
            views = (h[sel] % np.uint64(arr.shape[1])).astype(np.int64)
            out[sel] = arr[local, views]
        return out.reshape(len(idx), -1)


# -- schedule, optimizer, EMA -----------------------------------------------------------------------

def lr_at(step: int, cfg: dict) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup then cosine to min_lr at ``steps``."""
    lr, min_lr, warm, total = float(cfg["lr"]), float(cfg["min_lr"]), int(cfg["warmup_steps"]), int(cfg["steps"])
    if step < warm:
        return lr * (step + 1) / warm
    if step >= total:
        return min_lr
    p = (step - warm) / max(1, total - warm)
    return min_lr + 0.5 * (1 + math.cos(math.pi * p)) * (lr - min_lr)


def make_optimizer(model: nn.Module, cfg: dict, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and "_emb" not in name and name != "bos":
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": float(cfg["weight_decay"])},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=float(cfg["lr"]), betas=tuple(float(b) for b in cfg["betas"]), **extra)


class EMA:
    """fp32 exponential moving average of every floating entry of a model's state_dict."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        sd = model.state_dict()
        keys = [k for k, v in self.state.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.state[k] for k in keys], [sd[k].detach().float() for k in keys],
                             1.0 - self.decay)


# -- helpers ----------------------------------------------------------------------------------------

def _norm_cfg(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, sort_keys=True))


def _resume_key(cfg: dict) -> dict:
    return {k: v for k, v in _norm_cfg(cfg).items() if k not in RESUME_FREE_KEYS}


def _rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16.items():
        if key in name:
            return val
    return None


def _load_ckpt(path: str | Path, device="cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


class _Logger:
    """metrics.jsonl + metrics.csv (+ TensorBoard when importable); rank 0 only."""

    def __init__(self, out_dir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.jsonl.exists():   # drop rows past the checkpoint
            rows = [r for r in (json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip())
                    if r["step"] <= resume_step]
        with atomic_path(self.jsonl) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with atomic_path(self.csv) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
                w.writeheader()
                for r in rows:
                    w.writerow({k: r.get(k, "") for k in METRIC_COLUMNS})
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=(resume_step or 0) + 1)
        except Exception:  # tensorboard not installed: no events
            self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -- training ---------------------------------------------------------------------------------------

def train_stage1(train_cfg: dict, token_files: list[str], out_dir: str, *, max_steps: int | None = None,
                 progress: bool = True, context_files: list[str] | None = None) -> dict:
    """Train (or resume) the stage-1 GPT; see the module docstring. Returns the summary dict that
    is also written to ``out_dir/train.json`` when all steps are done.

    With ``context_files`` (one DiGIT token shard per token shard, same images and views) this
    trains stage 2: the GPT predicts the ``token_files`` grids (VQ tokens) after the context grid."""
    cfg = _norm_cfg(train_cfg)
    out = Path(out_dir)
    token_files = [str(f) for f in token_files]
    context_files = [str(f) for f in context_files] if context_files else None

    # -- processes and device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ddp = world > 1
    own_group = False
    if ddp:
        import torch.distributed as dist
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(cfg.get("device", "auto"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    else:
        rank, device = 0, resolve_device(cfg.get("device", "auto"))
    master = rank == 0
    try:
        return _train(cfg, token_files, context_files, out, device, rank, world, master, max_steps, progress)
    finally:
        if own_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _file_ids(files: list[str]) -> list[dict]:
    return [{"path": f, "size": os.path.getsize(f), "sha256": file_sha256(f)} for f in files]


def _train(cfg, token_files, context_files, out: Path, device, rank, world, master, max_steps, progress) -> dict:
    ddp = world > 1
    if ddp:
        import torch.distributed as dist
    total_steps = int(cfg["steps"])
    B, accum = int(cfg["batch_size"]), int(cfg["grad_accum"])
    if B % (world * accum):
        raise ValueError(f"batch_size {B} not divisible by world_size {world} x grad_accum {accum}")
    micro = B // accum                      # rows of the global batch per micro-step (all ranks)
    seed = int(cfg["seed"])

    data = TokenDataset(token_files, seed=seed, context_files=context_files)
    file_ids = _file_ids(token_files) + (_file_ids(context_files) if context_files else [])
    num_classes = data.num_classes if cfg["conditional"] else 0
    overrides = {**cfg.get("model", {}), "vocab_size": data.codebook_size, "grid": data.grid,
                 "num_classes": num_classes, "class_dropout": float(cfg["class_dropout"])}
    if context_files:
        overrides.update(context_vocab_size=data.context_codebook_size, context_grid=data.context_grid)
    mconf = GPTConfig.preset(cfg["preset"], **overrides)
    T = mconf.context_len + mconf.block_size   # positions per sequence (stage 2: context + VQ grid)

    torch.manual_seed(seed)
    raw = GPT(mconf).to(device)
    opt = make_optimizer(raw, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / float(cfg["lr"]))
    ema = EMA(raw, cfg["ema"]) if cfg.get("ema") else None
    step, pos, elapsed_before = 0, (0, 0), 0.0

    # -- resume
    last = out / "last.pt"
    resume_step = None
    if last.exists():
        ck = _load_ckpt(last, device)
        same_files = [(f["size"], f["sha256"]) for f in ck.get("token_files", [])] == \
                     [(f["size"], f["sha256"]) for f in file_ids]
        beyond = int(ck.get("step", 0)) > total_steps   # trained past a now smaller `steps`: start over
        if ck.get("format") == CKPT_FORMAT and _resume_key(ck["train_cfg"]) == _resume_key(cfg) and same_files \
                and not beyond:
            raw.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if ema is not None and ck.get("ema") is not None:
                ema.state = {k: v.to(device) for k, v in ck["ema"].items()}
            step, pos = int(ck["step"]), tuple(int(x) for x in ck["data_position"])
            elapsed_before = float(ck.get("elapsed", 0.0))
            _set_rng_states(ck["rng"])
            resume_step = step
            if master:
                print(f"[train] resuming from {last} at step {step}", file=sys.stderr, flush=True)
        elif master:
            print(f"[train] {last} does not match this config/data (or is past train.steps): starting fresh", file=sys.stderr, flush=True)
        del ck
    out.mkdir(parents=True, exist_ok=True)

    n_params = raw.num_params()
    if master:
        print(f"[train] GPT {n_params:,} parameters ({n_params / 1e6:.2f}M); {raw.extra_repr()}; "
              f"device {device}, world {world}, global batch {B}, grad_accum {accum}", file=sys.stderr, flush=True)

    model = torch.compile(raw) if cfg.get("compile") else raw
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = _Logger(out, resume_step, master)
    peak = _peak_flops(device)
    inject = os.environ.get("DIGIT_INJECT_NAN_AT_STEP")   # test hook, see the module docstring
    inject = int(inject) if inject else None
    stop_at = total_steps if max_steps is None else min(total_steps, int(max_steps))
    clip = float(cfg["grad_clip"])
    ls = float(cfg["label_smoothing"])
    log_every, ckpt_every = max(1, int(cfg["log_every"])), int(cfg["checkpoint_every"])
    params = [p for p in raw.parameters() if p.requires_grad]

    def save(path: Path) -> None:
        ck = {
            "format": CKPT_FORMAT,
            "model_config": _model_config_dict(mconf),
            "model": raw.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "ema": ema.state if ema is not None else None,
            "step": step,
            "data_position": list(pos),
            "rng": _rng_states(),
            "train_cfg": cfg,
            "token_files": file_ids,
            "elapsed": elapsed_before + (time.time() - t_start),
            "num_params": n_params,
        }
        with atomic_path(path) as tmp:
            torch.save(ck, tmp)

    bar = None
    if master and progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=stop_at, initial=step, desc="stage1", dynamic_ncols=True)
        except ImportError:
            bar = None

    start_step = step
    t_start = time.time()
    t_log, tok_log = time.time(), 0
    last_loss = None
    model.train()
    try:
        while step < stop_at:
            torch.manual_seed(_mix(seed, step, rank) & ((1 << 63) - 1))
            if context_files:
                toks, ctx, labs, pos_next = data.next_batch(pos, B, with_context=True)
            else:
                (toks, labs, pos_next), ctx = data.next_batch(pos, B), None
            loss_sum = torch.zeros((), device=device)
            for m in range(accum):
                sl = slice(m * micro + rank, (m + 1) * micro, world)
                x = torch.from_numpy(toks[sl]).to(device, non_blocking=True)
                y = torch.from_numpy(labs[sl]).to(device, non_blocking=True) if num_classes else None
                c = torch.from_numpy(ctx[sl]).to(device, non_blocking=True) if ctx is not None else None
                sync = nullcontext() if (not ddp or m == accum - 1) else model.no_sync()
                with sync:
                    with autocast_for(device, cfg.get("precision", "auto")):
                        _, loss = model(x, labels=y, targets=x, label_smoothing=ls, context=c)
                    if inject is not None and step + 1 == inject:
                        loss = loss * float("nan")
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            loss_t = loss_sum / accum
            if ddp:
                dist.all_reduce(loss_t, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
                if device.type != "cuda":
                    loss_t /= world
            loss_v = float(loss_t)
            if not math.isfinite(loss_v):
                raise FloatingPointError(
                    f"non-finite training loss ({loss_v}) at step {step + 1}; stopping without saving this "
                    f"step (last good checkpoint: {last if last.exists() else 'none'})")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw)
            step += 1
            pos = pos_next
            last_loss = loss_v
            tok_log += B * T
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr_now:.2e}")
            if step % log_every == 0 or step == stop_at:
                now = time.time()
                tps = tok_log / max(now - t_log, 1e-9)
                row = {"step": step, "epoch": pos[0] + pos[1] / len(data), "loss": loss_v, "lr": lr_now,
                       "tokens_per_s": tps, "grad_norm": grad_norm,
                       "elapsed": elapsed_before + (now - t_start)}
                if peak:
                    row["mfu"] = 6 * n_params * tps / (peak * world)
                logger.log(row)
                t_log, tok_log = time.time(), 0
            if master and ckpt_every > 0 and step % ckpt_every == 0 and step < stop_at:
                save(last)
        if master and (step > start_step or not last.exists()):
            save(last)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    if ddp:
        dist.barrier()

    elapsed = elapsed_before + (time.time() - t_start)
    summary = {"params": n_params, "final_loss": last_loss, "steps": step, "total_steps": total_steps,
               "finished": step >= total_steps, "time_s": elapsed,
               "tokens_per_s": step * B * T / max(elapsed, 1e-9), "checkpoint": str(last),
               "model_config": _model_config_dict(mconf), "world_size": world,
               "stage": "stage2" if context_files else "stage1"}
    if last_loss is None and last.exists():   # nothing to do (already finished): report the last logged loss
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if (out / "metrics.jsonl").exists() else []
        summary["final_loss"] = rows[-1]["loss"] if rows else None
    if master and step >= total_steps:
        final = out / "final.pt"
        if step > start_step or not final.exists():
            with atomic_path(final) as tmp:
                shutil.copyfile(last, tmp)
        summary["checkpoint"] = str(final)
        summary["checkpoint_sha256"] = file_sha256(final)
        write_json_atomic(out / "train.json", summary)
    if ddp:
        dist.barrier()
    return summary


def _model_config_dict(mconf: GPTConfig) -> dict:
    return {**asdict(mconf), "grid": list(mconf.grid), "context_grid": list(mconf.context_grid)}


# -- loading ----------------------------------------------------------------------------------------

def load_model(checkpoint: str, ema: bool = True, device: str = "cpu") -> tuple[GPT, dict]:
    """Frozen GPT from a stage-1 checkpoint (EMA weights when present and ``ema``), in eval mode."""
    ck = _load_ckpt(checkpoint, device)
    if ck.get("format") != CKPT_FORMAT:
        raise ValueError(f"{checkpoint}: not a stage-1 checkpoint (format {ck.get('format')!r})")
    mc = dict(ck["model_config"])
    mc["grid"] = tuple(mc["grid"])
    mc["context_grid"] = tuple(mc.get("context_grid", (0, 0)))
    model = GPT(GPTConfig(**mc))
    use_ema = bool(ema and ck.get("ema") is not None)
    state = ck["ema"] if use_ema else ck["model"]
    model.load_state_dict(state)
    model.to(device).eval().requires_grad_(False)
    meta = {"step": ck["step"], "train_cfg": ck["train_cfg"], "model_config": _model_config_dict(model.config),
            "sha256": file_sha256(checkpoint), "num_classes": mc["num_classes"],
            "vocab_size": mc["vocab_size"], "grid": list(mc["grid"]), "ema": use_ema,
            "context_vocab_size": mc.get("context_vocab_size", 0), "context_grid": list(mc["context_grid"]),
            "weights": "ema" if use_ema else "model",
            "num_params": ck.get("num_params"), "token_files": ck.get("token_files")}
    return model, meta
