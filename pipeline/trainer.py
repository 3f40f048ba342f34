"""One training loop for every generator family: a model, an objective and a batch source plug in.

    summary = train(cfg, out_dir, build_job, max_steps=None)

``build_job(device)`` returns a ``TrainJob``: the model (built after seeding, on ``device``), an
objective (``loss(model, batch) -> scalar``), a batch source (``batch(position, size) ->
(named arrays, next position)``, deterministic in the position) and the identities of its input
files. The loop owns the rest: AdamW with a schedule (``schedule``: ``cosine`` or ``inverse_sqrt``),
EMA, gradient accumulation, DDP under torchrun, bf16 autocast, ``torch.compile``, exact resume,
the non-finite-loss stop, logging (``metrics.jsonl``/``.csv``, TensorBoard when installed) and
atomic checkpoints (``checkpoints.py``).

Checkpoints. ``last.pt`` and the one before it, ``prev.pt``. At start, temp files of a killed save
are removed; a damaged ``last.pt`` is reported on stderr and the run resumes from ``prev.pt``
(which gives the same final weights as an uninterrupted run), or starts over when neither is good.

Steps. Global batch -> ``grad_accum`` micro-batches -> each split over the ranks with a stride
(rank r takes rows r, r+W, ...), so the gradient equals the single-process one. The torch RNG
(dropout, label dropout, masking) is reseeded from (seed, step, rank) before every step: resume
does not depend on RNG state left over from earlier steps (the states are still saved).

Test hook: the environment variable ``DIGIT_INJECT_NAN_AT_STEP=k`` replaces the loss of step k
(1-based) with NaN, to exercise the non-finite-loss stop (``FloatingPointError``, no checkpoint of
the bad step).
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from . import checkpoints
from .devices import autocast_for, resolve_device
from .io import file_sha256, remove_stale_temps, write_json_atomic
from .token_data import mix
from .training_log import MetricsLog, read_last_loss

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
# dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


class Objective(Protocol):
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


class BatchSource(Protocol):
    def __len__(self) -> int: ...
    def batch(self, pos: tuple[int, int], size: int) -> tuple[dict[str, np.ndarray], tuple[int, int]]: ...


@dataclass
class TrainJob:
    family: str                       # key of families.FAMILIES: how the checkpoint is loaded again
    model: nn.Module
    model_config: dict                # JSON-able, enough for families.FAMILIES[family].build
    objective: Objective
    data: BatchSource
    inputs: list[dict]                # checkpoints.file_ids of every input file (resume check)
    tokens_per_sample: int            # positions per sample, for throughput and MFU
    summary: dict[str, Any] = field(default_factory=dict)   # extra entries of train.json


# -- schedule, optimizer, EMA -----------------------------------------------------------------------

def lr_at(step: int, cfg: dict) -> float:
    """LR of optimizer step ``step`` (0-based).

    cosine: linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at ``steps``.
    inverse_sqrt (fairseq, DiGIT's configs): linear from ``warmup_init_lr`` to ``lr`` over
    ``warmup_steps``, then ``lr * sqrt(warmup_steps / step)`` (``min_lr`` is not used).
    constant (MAR's ``lr_schedule constant``): linear warmup to ``lr``, then ``lr``."""
    lr, warm = float(cfg["lr"]), int(cfg["warmup_steps"])
    kind = cfg.get("schedule", "cosine")
    if kind == "inverse_sqrt":
        if warm <= 0:
            raise ValueError("train.schedule 'inverse_sqrt' needs train.warmup_steps > 0")
        init = float(cfg.get("warmup_init_lr", 0.0))
        if step < warm:
            return init + (lr - init) * step / warm
        return lr * math.sqrt(warm / step)
    if kind == "constant":
        return lr * (step + 1) / warm if step < warm else lr
    if kind != "cosine":
        raise ValueError(f"unknown train.schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    min_lr, total = float(cfg["min_lr"]), int(cfg["steps"])
    if step < warm:
        return lr * (step + 1) / warm
    if step >= total:
        return min_lr
    p = (step - warm) / max(1, total - warm)
    return min_lr + 0.5 * (1 + math.cos(math.pi * p)) * (lr - min_lr)


def make_optimizer(model: nn.Module, cfg: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices except the names the model lists in ``no_weight_decay()``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and name not in skip else no_decay).append(p)
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


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((val for key, val in PEAK_BF16.items() if key in name), None)


# -- processes ---------------------------------------------------------------------------------------

def train(train_cfg: dict, out_dir: str | Path, build_job: Callable[[torch.device], TrainJob], *,
          max_steps: int | None = None, progress: bool = True, desc: str = "train") -> dict:
    """Train (or resume) one job; under torchrun (WORLD_SIZE > 1) with DDP. Returns the summary that
    is also written to ``out_dir/train.json`` once all ``steps`` are done."""
    cfg = checkpoints.normalise_cfg(train_cfg)
    lr_at(0, cfg)   # an invalid schedule fails before any work
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = False
    rank, device = 0, resolve_device(cfg.get("device", "auto"))
    if world > 1:
        import torch.distributed as dist
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    try:
        run = _Run(cfg, Path(out_dir), device, rank, world, build_job)
        return run.run(max_steps, progress, desc)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


class _Run:
    """The state of one training process: model, optimizer, schedule, EMA, stream position."""

    def __init__(self, cfg: dict, out: Path, device: torch.device, rank: int, world: int, build_job):
        self.cfg, self.out, self.device, self.rank, self.world = cfg, out, device, rank, world
        self.master = rank == 0
        self.total_steps = int(cfg["steps"])
        self.B, self.accum = int(cfg["batch_size"]), int(cfg["grad_accum"])
        if self.B % (world * self.accum):
            raise ValueError(f"batch_size {self.B} not divisible by world_size {world} x grad_accum {self.accum}")
        self.seed = int(cfg["seed"])
        torch.manual_seed(self.seed)
        self.job = build_job(device)
        self.raw = self.job.model
        self.opt = make_optimizer(self.raw, cfg, device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_at(s, cfg) / float(cfg["lr"]))
        self.ema = EMA(self.raw, cfg["ema"]) if cfg.get("ema") else None
        self.step, self.pos, self.elapsed_before = 0, (0, 0), 0.0
        self.last, self.prev = out / "last.pt", out / "prev.pt"
        self.last_is_good = False   # whether last.pt may become prev.pt at the next save
        if self.master:
            for tmp in remove_stale_temps(out):
                self._say(f"removed {tmp}, left by a killed save")
        self.resume_step = self._resume()
        out.mkdir(parents=True, exist_ok=True)
        self.n_params = sum(p.numel() for p in self.raw.parameters())

    def _say(self, msg: str) -> None:
        if self.master:
            print(f"[train] {msg}", file=sys.stderr, flush=True)

    def _newest_good_checkpoint(self) -> tuple[dict | None, Path | None]:
        """``last.pt``, else ``prev.pt``, whichever is first readable; says on stderr what was damaged."""
        damaged = []
        for path in (self.last, self.prev):
            if not path.exists():
                continue
            try:
                ck = checkpoints.read(path, self.device, needs=checkpoints.RESUME_KEYS)
            except FileNotFoundError:   # gone meanwhile
                continue
            except ValueError as e:
                self._say(f"damaged checkpoint, not resuming from it: {e}")
                damaged.append(path.name)
                continue
            self.last_is_good = path == self.last
            return ck, path
        if damaged:
            self._say(f"no good checkpoint in {self.out} ({' and '.join(damaged)} damaged): starting over from step 0")
        return None, None

    def _resume(self) -> int | None:
        ck, path = self._newest_good_checkpoint()
        if ck is None:
            return None
        if not checkpoints.resumable(ck, self.cfg, self.job.inputs, self.total_steps):
            self._say(f"{path} does not match this config/data (or is past train.steps): starting fresh")
            return None
        self.raw.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.state = {k: v.to(self.device) for k, v in ck["ema"].items()}
        self.step, self.pos = int(ck["step"]), tuple(int(x) for x in ck["data_position"])
        self.elapsed_before = float(ck.get("elapsed", 0.0))
        checkpoints.set_rng_states(ck["rng"])
        self._say(f"resuming from {path} at step {self.step}")
        return self.step

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t_start)

    def save(self) -> None:
        """Write last.pt; the previous one becomes prev.pt unless it is damaged (then it is replaced)."""
        checkpoints.write(self.last, {
            "format": checkpoints.FORMAT, "family": self.job.family, "model_config": self.job.model_config,
            "model": self.raw.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "ema": self.ema.state if self.ema is not None else None,
            "step": self.step, "data_position": list(self.pos), "rng": checkpoints.rng_states(),
            "train_cfg": self.cfg, "token_files": self.job.inputs, "elapsed": self.elapsed(),
            "num_params": self.n_params,
        }, previous=self.prev if self.last_is_good else None)
        self.last_is_good = True

    def _wrap(self) -> nn.Module:
        model = torch.compile(self.raw) if self.cfg.get("compile") else self.raw
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _micro_batches(self, batch: dict[str, np.ndarray]):
        micro = self.B // self.accum   # rows of the global batch per micro-step (all ranks)
        for m in range(self.accum):
            sl = slice(m * micro + self.rank, (m + 1) * micro, self.world)
            yield m, {k: torch.from_numpy(v[sl]).to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, model: nn.Module, inject: int | None) -> tuple[float, float, float]:
        """One optimizer step over the next global batch: (loss, grad norm, lr used)."""
        torch.manual_seed(mix(self.seed, self.step, self.rank) & ((1 << 63) - 1))
        batch, pos_next = self.job.data.batch(self.pos, self.B)
        loss_sum = torch.zeros((), device=self.device)
        for m, micro in self._micro_batches(batch):
            last_micro = m == self.accum - 1
            with nullcontext() if (self.world == 1 or last_micro) else model.no_sync():
                with autocast_for(self.device, self.cfg.get("precision", "auto")):
                    loss = self.job.objective.loss(model, micro)
                if inject is not None and self.step + 1 == inject:
                    loss = loss * float("nan")
                (loss / self.accum).backward()
            loss_sum += loss.detach().float()
        loss_v = self._mean_over_ranks(loss_sum / self.accum)
        if not math.isfinite(loss_v):
            raise FloatingPointError(
                f"non-finite training loss ({loss_v}) at step {self.step + 1}; stopping without saving this "
                f"step (last good checkpoint: {self.last if self.last.exists() else 'none'})")
        clip = float(self.cfg["grad_clip"])
        params = [p for p in self.raw.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        lr_now = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw)
        self.step, self.pos = self.step + 1, pos_next
        return loss_v, grad_norm, lr_now

    def _mean_over_ranks(self, loss_t: torch.Tensor) -> float:
        if self.world > 1:
            import torch.distributed as dist
            cuda = self.device.type == "cuda"
            dist.all_reduce(loss_t, op=dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM)
            if not cuda:
                loss_t /= self.world
        return float(loss_t)

    def run(self, max_steps: int | None, progress: bool, desc: str) -> dict:
        self._say(f"{self.job.family} {self.n_params:,} parameters ({self.n_params / 1e6:.2f}M); "
                  f"{self.raw.extra_repr()}; device {self.device}, world {self.world}, global batch {self.B}, "
                  f"grad_accum {self.accum}")
        model = self._wrap()
        log = MetricsLog(self.out, self.resume_step, self.master)
        inject = os.environ.get("DIGIT_INJECT_NAN_AT_STEP")   # test hook, see the module docstring
        inject = int(inject) if inject else None
        stop_at = self.total_steps if max_steps is None else min(self.total_steps, int(max_steps))
        log_every, ckpt_every = max(1, int(self.cfg["log_every"])), int(self.cfg["checkpoint_every"])
        bar = _progress_bar(stop_at, self.step, desc) if self.master and progress else None
        peak, T = peak_flops(self.device), self.job.tokens_per_sample
        start_step, last_loss = self.step, None
        self.t_start = t_log = time.time()
        tok_log = 0
        model.train()
        try:
            while self.step < stop_at:
                last_loss, grad_norm, lr_now = self.train_step(model, inject)
                tok_log += self.B * T
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr_now:.2e}")
                if self.step % log_every == 0 or self.step == stop_at:
                    now = time.time()
                    tps = tok_log / max(now - t_log, 1e-9)
                    row = {"step": self.step, "epoch": self.pos[0] + self.pos[1] / len(self.job.data),
                           "loss": last_loss, "lr": lr_now, "tokens_per_s": tps, "grad_norm": grad_norm,
                           "elapsed": self.elapsed()}
                    if peak:
                        row["mfu"] = 6 * self.n_params * tps / (peak * self.world)
                    log.log(row)
                    t_log, tok_log = time.time(), 0
                if self.master and ckpt_every > 0 and self.step % ckpt_every == 0 and self.step < stop_at:
                    self.save()
            if self.master and (self.step > start_step or not self.last_is_good):
                self.save()
        finally:
            if bar is not None:
                bar.close()
            log.close()
        self._barrier()
        summary = self._finish(start_step, last_loss)
        self._barrier()
        return summary

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _finish(self, start_step: int, last_loss: float | None) -> dict:
        elapsed = self.elapsed()
        summary = {"params": self.n_params, "final_loss": last_loss, "steps": self.step,
                   "total_steps": self.total_steps, "finished": self.step >= self.total_steps, "time_s": elapsed,
                   "tokens_per_s": self.step * self.B * self.job.tokens_per_sample / max(elapsed, 1e-9),
                   "checkpoint": str(self.last), "model_config": self.job.model_config,
                   "world_size": self.world, **self.job.summary}
        if last_loss is None and self.last.exists():   # nothing to do (already finished): the last logged loss
            summary["final_loss"] = read_last_loss(self.out)
        if self.master and self.step >= self.total_steps:
            final = self.out / "final.pt"
            if self.step > start_step or not final.exists():
                checkpoints.copy(self.last, final)
            summary["checkpoint"] = str(final)
            summary["checkpoint_sha256"] = file_sha256(final)
            write_json_atomic(self.out / "train.json", summary)
        return summary


def _progress_bar(total: int, initial: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
