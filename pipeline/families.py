"""Generator families: how a saved model configuration becomes a module again.

A checkpoint written by the trainer records its ``family`` and a JSON-able ``model_config``; this
table turns the pair back into a module, so every stage that loads a trained generator (sampling,
rendering, the probe) goes through one function, ``checkpoints.load_generator``. A new family adds
one entry here, one model file in ``models/`` and one objective in ``objectives.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from torch import nn

from .models.gpt import GPT, GPTConfig


def gpt_from_config(mc: dict) -> GPT:
    mc = dict(mc)
    mc["grid"] = tuple(mc["grid"])
    mc["context_grid"] = tuple(mc.get("context_grid", (0, 0)))
    return GPT(GPTConfig(**mc))


def gpt_config_dict(model: GPT) -> dict:
    mconf = model.config
    return {**asdict(mconf), "grid": list(mconf.grid), "context_grid": list(mconf.context_grid)}


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    build: Callable[[dict], nn.Module]        # saved model_config -> module
    config_dict: Callable[[nn.Module], dict]  # module -> JSON-able model_config


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", "causal transformer over a token grid (stage 1; stage 2 with a context grid)",
                  gpt_from_config, gpt_config_dict),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown generator family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
