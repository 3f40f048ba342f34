"""Training-loop pieces shared by the two small in-memory trainers (tiny encoder, tiny VQGAN).

Both train on views cut from images held in memory (`data.cut_views`), shuffle them each epoch,
warm the learning rate up linearly then decay it along a cosine, and clip gradients to norm 1.
"""
from __future__ import annotations

import math
import sys
from typing import Iterator

import torch
from tqdm import tqdm


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup_fraction: float,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_fraction`` of ``total`` steps, then a cosine from 1 down to
    ``floor`` (as a fraction of the base learning rate) at step ``total``."""
    warmup = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * cosine)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shuffled_batches(views: torch.Tensor, batch_size: int, gen: torch.Generator, *, desc: str,
                     progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (indices, views[indices]) batches in an order drawn from ``gen``."""
    n = len(views)
    order = torch.randperm(n, generator=gen)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, file=sys.stderr, mininterval=2):
        idx = order[start:start + batch_size]
        yield idx, views[idx]


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor) -> None:
    """Backward, clip the gradient norm to 1, step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
