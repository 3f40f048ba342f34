"""Exact state-dict checks shared by every weight loader (encoders, VQGAN, Inception, generators).

``key_problems`` compares a state dict with the shapes a module expects and returns one phrase per
kind of problem (missing keys, unexpected keys, wrong shapes), so every loader names the keys that
are wrong in the same words; ``load_exact`` loads strictly and raises with those phrases.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import nn


def key_order(key: str) -> tuple:
    """Top-level keys first, then numbered blocks in numeric order (messages show the telling keys)."""
    m = re.match(r"(?:blocks|encoder\.layer|layers|h)\.(\d+)\.(.*)", key)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, key)


def name_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys, key=key_order)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _first(items: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def key_problems(expected: Mapping[str, tuple], state: Mapping[str, torch.Tensor], *,
                 optional: Iterable[str] = ()) -> list[str]:
    """Phrases naming the missing, unexpected and mis-shaped keys of ``state`` against ``expected``
    (key -> shape); keys in ``optional`` may be absent. Empty when the two agree."""
    missing = set(expected) - set(state) - set(optional)
    unexpected = set(state) - set(expected)
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
             for k in sorted(set(expected) & set(state), key=key_order)
             if tuple(state[k].shape) != tuple(expected[k])]
    problems = [f"missing keys: {name_keys(missing)}"] if missing else []
    problems += [f"unexpected keys: {name_keys(unexpected)}"] if unexpected else []
    problems += [f"wrong shapes: {_first(wrong)}"] if wrong else []
    return problems


def module_shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, *,
               optional: Iterable[str] = ()) -> None:
    """``module.load_state_dict(state)`` (strict, assign) or a ValueError naming every missing,
    unexpected or mis-shaped key; the module may live on the meta device."""
    problems = key_problems(module_shapes(module), state, optional=optional)
    if problems:
        raise ValueError(f"checkpoint does not match {what}: " + " | ".join(problems))
    module.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=not optional, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{what}: tensors not filled by the checkpoint: {name_keys(left)}")
