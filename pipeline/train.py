"""Training stage for the token-grid generators (DiGIT steps 5 and 6, and the baselines).

    summary = train_stage1(train_cfg, token_files, out_dir, max_steps=None, family="gpt")
    model, meta = load_model(out_dir + "/final.pt", ema=True)

Two families over token grids: the causal GPT (``models/gpt.py``, next-token CE) and the
mask-predict transformer (``models/maskgit.py``, masked-token CE; ``family="maskgit"``). Stage 1
models DiGIT (or VQ) token grids; with ``context_files`` (one DiGIT token shard per VQ token shard,
same images and views) the same model trains as stage 2, predicting the VQ grid given the DiGIT
grid. The loop itself (resume, DDP, EMA, logging, checkpoints) is the generic ``trainer.train``;
this module only builds the job: data (``token_data.TokenDataset``), the model and its objective.

Which config section trains which model (``TRAIN_SECTIONS``):

    train              GPT over DiGIT or VQ tokens (stage 1, and the VQ-token baseline)
    stage2.train       GPT over VQ tokens after the DiGIT grid (AR stage 2)
    stage2_nar.train   mask-predict over VQ tokens given the DiGIT grid (NAR stage 2, "DiGIT (+MaskGIT)")
    maskgit.train      mask-predict over VQ tokens (the MaskGIT baseline)

Provenance: training stops unless every token shard comes from one tokenizer (and every context
shard from one), as their sidecars record it (``provenance.shard_tokenizer``); the checkpoint's
``token_files`` keep each shard's ``tokenizer`` record, which rendering checks against.
"""
from __future__ import annotations

import os

import numpy as np

from . import checkpoints, trainer
from .config import ConfigError
from .families import FAMILIES, gpt_config_dict
from .models.gpt import GPT, GPTConfig
from .models.maskgit import MaskPredictor
from .objectives import LatentDiffusionLoss, MaskedTokenCE, NextTokenCE
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


# section -> (family, whether it takes a DiGIT context grid)
TRAIN_SECTIONS = {"train": ("gpt", False), "stage2.train": ("gpt", True),
                  "stage2_nar.train": ("maskgit", True), "maskgit.train": ("maskgit", False),
                  "mar.train": ("mar", False), "mar_causal.train": ("mar_causal", False)}
LATENT_FAMILIES = ("mar", "mar_causal")


def model_and_objective(family: str, config: GPTConfig, cfg: dict, conditional: bool):
    if family == "maskgit":
        model = MaskPredictor(config)
        return model, MaskedTokenCE(model.mask_code, float(cfg["label_smoothing"]), conditional)
    if family == "gpt":
        return GPT(config), NextTokenCE(float(cfg["label_smoothing"]), conditional)
    raise ValueError(f"no training job for generator family {family!r}")


def token_model_job(cfg: dict, token_files: list[str], context_files: list[str] | None, family: str = "gpt"):
    """``build_job`` for the trainer: the ``family`` model sized to the token shards, and its objective."""
    def build(device) -> trainer.TrainJob:
        data = TokenDataset(token_files, seed=int(cfg["seed"]), context_files=context_files)
        num_classes = data.num_classes if cfg["conditional"] else 0
        overrides = {**cfg.get("model", {}), "vocab_size": data.codebook_size, "grid": data.grid,
                     "num_classes": num_classes, "class_dropout": float(cfg["class_dropout"])}
        if context_files:
            overrides.update(context_vocab_size=data.context_codebook_size, context_grid=data.context_grid)
        model, objective = model_and_objective(family, GPTConfig.preset(cfg["preset"], **overrides), cfg,
                                               bool(num_classes))
        model = model.to(device)
        inputs = input_ids(token_files) + (input_ids(context_files) if context_files else [])
        return trainer.TrainJob(
            family=family, model=model, model_config=gpt_config_dict(model), objective=objective,
            data=data, inputs=inputs,
            tokens_per_sample=model.config.context_len + model.config.block_size,
            summary={"stage": "stage2" if context_files else "stage1"})
    return build


def latent_config(family: str, preset: str, overrides: dict):
    """The model config of a latent family: ``preset`` with ``overrides``; a ConfigError naming an
    unknown override key."""
    if family == "mar":
        from .models.mar import MARConfig as config_class
    else:
        from .models.mar_causal import MARCausalConfig as config_class
    try:
        return config_class.preset(preset, **overrides)
    except TypeError as e:   # an unknown field in {section}.model
        raise ConfigError(f"{family}.train.model: {e}") from e


def latent_scale(data: TokenDataset) -> float:
    """The factor the latents are multiplied by before the generator (MAR: 0.2325 for kl16), as
    the KL latent shards record it (training has checked they agree)."""
    scales = {m.get("latent_scale") for m in data.shards.metas}
    if len(scales) != 1 or None in scales:
        raise ValueError(f"latent shards record latent_scale {sorted(map(str, scales))}: need one value "
                         f"(shards written by the kl-latents stage record it)")
    return float(scales.pop())


def latent_model_job(cfg: dict, latent_files: list[str], family: str):
    """``build_job`` for the trainer: a MAR-family model over KL latent shards (N, V, h, w, 2C: the
    posterior mean and log-variance), sized to them, and the diffusion loss."""
    def build(device) -> trainer.TrainJob:
        data = TokenDataset(latent_files, seed=int(cfg["seed"]))
        sample = data.shards.arrays[0]
        if np.issubdtype(sample.dtype, np.integer) or sample.ndim != 5:
            raise ValueError(f"{latent_files[0]}: holds token grids, not KL latents; {family}.train trains on "
                             f"the kl-latents stage's shards")
        num_classes = data.num_classes if cfg["conditional"] else 0
        overrides = {**cfg.get("model", {}), "grid": data.grid, "token_dim": sample.shape[-1] // 2,
                     "num_classes": num_classes, "label_drop_prob": float(cfg["class_dropout"])}
        config = latent_config(family, cfg["preset"], overrides)
        model = FAMILIES[family].build(config.to_dict()).to(device)
        scale = latent_scale(data)
        return trainer.TrainJob(
            family=family, model=model, model_config=config.to_dict(),
            objective=LatentDiffusionLoss(scale, bool(num_classes)), data=data, inputs=input_ids(latent_files),
            tokens_per_sample=data.grid[0] * data.grid[1], summary={"stage": "latent", "latent_scale": scale})
    return build


def train_stage1(train_cfg: dict, token_files: list[str], out_dir: str, *, max_steps: int | None = None,
                 progress: bool = True, context_files: list[str] | None = None, family: str = "gpt") -> dict:
    """Train (or resume) a ``family`` model; returns the summary also written to
    ``out_dir/train.json`` when all steps are done."""
    token_files = [str(f) for f in token_files]
    context_files = [str(f) for f in context_files] if context_files else None
    check_one_tokenizer(token_files, context_files)
    if family in LATENT_FAMILIES:
        build = latent_model_job(checkpoints.normalise_cfg(train_cfg), token_files, family)
    else:
        build = token_model_job(checkpoints.normalise_cfg(train_cfg), token_files, context_files, family)
    desc = ("stage2" if context_files else "stage1") + ("" if family == "gpt" else f" {family}")
    return trainer.train(train_cfg, out_dir, build, max_steps=max_steps, progress=progress, desc=desc)


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
                max_steps: int | None = None, progress: bool = True, section: str | None = None) -> dict:
    """The train stage as the config ``section`` (a key of ``TRAIN_SECTIONS``) describes it; default
    ``train``, or ``stage2.train`` when ``context`` shards are given. Context shards are paired
    with the token shards by file name."""
    section = section or ("stage2.train" if context else "train")
    if section not in TRAIN_SECTIONS:
        raise ConfigError(f"unknown training section {section!r}; choose from {', '.join(TRAIN_SECTIONS)}")
    family, needs_context = TRAIN_SECTIONS[section]
    if needs_context != bool(context):
        raise ConfigError(f"section {section!r} " + ("needs --context (the DiGIT token shards)" if needs_context
                                                     else "takes no --context"))
    if context and len(context) != len(token_files):
        raise ConfigError(f"--context needs one DiGIT token shard per --tokens shard "
                          f"({len(context)} vs {len(token_files)})")
    cfg = config
    for part in section.split("."):
        cfg = cfg[part]
    return train_stage1(cfg, sorted(token_files, key=os.path.basename), out_dir, max_steps=max_steps,
                        progress=progress, context_files=sorted(context, key=os.path.basename) if context else None,
                        family=family)
