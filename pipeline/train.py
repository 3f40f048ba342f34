"""GPT training stage (DiGIT steps 5 and 6): the causal GPT of ``models/gpt.py`` over token grids.

    summary = train_stage1(train_cfg, token_files, out_dir, max_steps=None)
    model, meta = load_model(out_dir + "/final.pt", ema=True)

Stage 1 models DiGIT (or VQ) token grids; with ``context_files`` (one DiGIT token shard per VQ
token shard, same images and views) the same model trains as stage 2, predicting the VQ grid
after the DiGIT grid. The loop itself (resume, DDP, EMA, logging, checkpoints) is the generic
``trainer.train``; this module only builds the job: data (``token_data.TokenDataset``), the
model and the objective (``objectives.NextTokenCE``).

Provenance: training stops unless every token shard comes from one tokenizer (and every context
shard from one), as their sidecars record it (``provenance.shard_tokenizer``); the checkpoint's
``token_files`` keep each shard's ``tokenizer`` record, which rendering checks against.
"""
from __future__ import annotations

import os

from . import checkpoints, trainer
from .config import ConfigError
from .families import gpt_config_dict
from .models.gpt import GPT, GPTConfig
from .objectives import NextTokenCE
from .provenance import read_sidecar, shard_tokenizer, token_files_tokenizer
from .token_data import TokenDataset


def input_ids(files: list[str]) -> list[dict]:
    """`checkpoints.file_ids` plus the tokenizer each shard's sidecar records (``tokenizer``), so
    a checkpoint says which tokenizer its tokens came from even after the shards change."""
    return [{**fid, "tokenizer": shard_tokenizer(read_sidecar(f))}
            for fid, f in zip(checkpoints.file_ids(files), files)]


def check_one_tokenizer(token_files: list[str], context_files: list[str] | None) -> None:
    """Raise unless all token shards come from one tokenizer, and all context shards from one
    (centroids / VQ checkpoint sha256 and encoder, as their sidecars record them)."""
    hint = "all shards of one training run must come from the same tokenizer; retokenize or remove the odd one"
    token_files_tokenizer(token_files, hint)
    if context_files:
        token_files_tokenizer(context_files, hint)


def gpt_job(cfg: dict, token_files: list[str], context_files: list[str] | None):
    """``build_job`` for the trainer: the GPT sized to the token shards, and its objective."""
    def build(device) -> trainer.TrainJob:
        data = TokenDataset(token_files, seed=int(cfg["seed"]), context_files=context_files)
        num_classes = data.num_classes if cfg["conditional"] else 0
        overrides = {**cfg.get("model", {}), "vocab_size": data.codebook_size, "grid": data.grid,
                     "num_classes": num_classes, "class_dropout": float(cfg["class_dropout"])}
        if context_files:
            overrides.update(context_vocab_size=data.context_codebook_size, context_grid=data.context_grid)
        model = GPT(GPTConfig.preset(cfg["preset"], **overrides)).to(device)
        inputs = input_ids(token_files) + (input_ids(context_files) if context_files else [])
        return trainer.TrainJob(
            family="gpt", model=model, model_config=gpt_config_dict(model),
            objective=NextTokenCE(float(cfg["label_smoothing"]), conditional=bool(num_classes)),
            data=data, inputs=inputs,
            tokens_per_sample=model.config.context_len + model.config.block_size,
            summary={"stage": "stage2" if context_files else "stage1"})
    return build


def train_stage1(train_cfg: dict, token_files: list[str], out_dir: str, *, max_steps: int | None = None,
                 progress: bool = True, context_files: list[str] | None = None) -> dict:
    """Train (or resume) the GPT; returns the summary also written to ``out_dir/train.json`` when all
    steps are done."""
    token_files = [str(f) for f in token_files]
    context_files = [str(f) for f in context_files] if context_files else None
    check_one_tokenizer(token_files, context_files)
    build = gpt_job(checkpoints.normalise_cfg(train_cfg), token_files, context_files)
    return trainer.train(train_cfg, out_dir, build, max_steps=max_steps, progress=progress,
                         desc="stage2" if context_files else "stage1")


def load_model(checkpoint: str, ema: bool = True, device: str = "cpu") -> tuple[GPT, dict]:
    """Frozen GPT from a training checkpoint (EMA weights when present and ``ema``), in eval mode."""
    model, meta = checkpoints.load_generator(checkpoint, ema=ema, device=device)
    if not isinstance(model, GPT):
        raise ValueError(f"{checkpoint}: holds a {meta['family']!r} model, not a GPT")
    c = model.config
    meta.update(num_classes=c.num_classes, vocab_size=c.vocab_size, grid=list(c.grid),
                context_vocab_size=c.context_vocab_size, context_grid=list(c.context_grid))
    return model, meta


def train_stage(config: dict, token_files: list[str], out_dir: str, *, context: list[str] | None = None,
                max_steps: int | None = None, progress: bool = True) -> dict:
    """The train stage as the config describes it: stage 1 (``train``), or stage 2 (``stage2.train``)
    with ``context`` shards, paired with the token shards by file name."""
    if context and len(context) != len(token_files):
        raise ConfigError(f"--context needs one DiGIT token shard per --tokens shard "
                          f"({len(context)} vs {len(token_files)})")
    section = config["stage2"]["train"] if context else config["train"]
    return train_stage1(section, sorted(token_files, key=os.path.basename), out_dir, max_steps=max_steps,
                        progress=progress, context_files=sorted(context, key=os.path.basename) if context else None)
