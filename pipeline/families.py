"""Generator families: how a saved model configuration becomes a module again.

A checkpoint written by the trainer records its ``family`` and a JSON-able ``model_config``; this
table turns the pair back into a module, so every stage that loads a trained generator (sampling,
rendering, the probe) goes through one function, ``checkpoints.load_generator``. A new family adds
one entry here, one model file in ``models/`` and one objective in ``objectives.py``.

Two kinds of output: token families (GPT, MaskGIT) draw integer grids that a VQ decoder (or a
stage 2) turns into pixels; latent families (MAR, its causal variant) draw continuous KL latents
(n, L, C) in the scaled space they were trained in, which the KL decoder renders.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from torch import nn

from .models.gpt import GPT, GPTConfig
from .models.mask_sampling import mask_predict_sample
from .models.maskgit import MaskPredictor
from .models.sampling import sample as autoregressive_sample


def gpt_config(mc: dict) -> GPTConfig:
    mc = dict(mc)
    mc["grid"] = tuple(mc["grid"])
    mc["context_grid"] = tuple(mc.get("context_grid", (0, 0)))
    return GPTConfig(**mc)


def gpt_config_dict(model: nn.Module) -> dict:
    """The JSON-able ``GPTConfig`` of a GPT or a mask-predict model (they share it)."""
    mconf = model.config
    return {**asdict(mconf), "grid": list(mconf.grid), "context_grid": list(mconf.context_grid)}


def draw_autoregressive(model: GPT, n: int, *, labels, context, seeds, cfg: dict, batch_size: int):
    return autoregressive_sample(model, n, labels=labels, context=context, seeds=seeds, batch_size=batch_size,
                                 temperature=float(cfg["temperature"]), top_k=cfg.get("top_k"),
                                 top_p=cfg.get("top_p"), cfg_scale=float(cfg.get("cfg_scale", 1.0)))


def draw_mask_predict(model: MaskPredictor, n: int, *, labels, context, seeds, cfg: dict, batch_size: int):
    return mask_predict_sample(model, n, labels=labels, context=context, seeds=seeds, batch_size=batch_size,
                               iterations=int(cfg["iterations"]), temperature=float(cfg["temperature"]),
                               top_k=cfg.get("top_k"), top_p=cfg.get("top_p"),
                               choice_temperature=float(cfg["choice_temperature"]),
                               cfg_scale=float(cfg.get("cfg_scale", 1.0)))


AR_SAMPLE_KEYS = ("temperature", "top_k", "top_p", "cfg_scale", "seed")
LATENT_SAMPLE_KEYS = ("num_sampling_steps", "clip_x0", "temperature", "cfg_scale", "cfg_schedule", "seed")


def use_sampling_steps(model: nn.Module, steps: int, clip_x0: float | None = None) -> None:
    """Respace the diffusion head's sampling chain to ``steps`` reverse steps (MAR's
    ``num_sampling_steps``) and set its x0 clamp: sampling settings, not part of the weights."""
    from .models.diffusion_head import TRAINING_STEPS, GaussianDiffusion, cosine_betas, space_timesteps
    model.diffloss.gen_diffusion = GaussianDiffusion.respaced(cosine_betas(TRAINING_STEPS),
                                                              space_timesteps(TRAINING_STEPS, str(int(steps))))
    model.diffloss.clip_x0 = None if clip_x0 is None else float(clip_x0)


# The MAR families import their models on first use: models/mar.py pulls in timm (seconds), which
# no command that never meets a MAR checkpoint should pay at start-up.
def draw_mar(model: nn.Module, n: int, *, labels, context, seeds, cfg: dict, batch_size: int):
    from .models.mar import mar_sample
    use_sampling_steps(model, cfg["num_sampling_steps"], cfg.get("clip_x0"))
    return mar_sample(model, n, labels=labels, seeds=seeds, batch_size=batch_size, num_iter=int(cfg["num_iter"]),
                      cfg_scale=float(cfg["cfg_scale"]), cfg_schedule=cfg["cfg_schedule"],
                      temperature=float(cfg["temperature"]))


def draw_mar_causal(model: nn.Module, n: int, *, labels, context, seeds, cfg: dict, batch_size: int):
    from .models.mar_causal import mar_causal_sample
    use_sampling_steps(model, cfg["num_sampling_steps"], cfg.get("clip_x0"))
    return mar_causal_sample(model, n, labels=labels, seeds=seeds, batch_size=batch_size,
                             cfg_scale=float(cfg["cfg_scale"]), cfg_schedule=cfg["cfg_schedule"],
                             temperature=float(cfg["temperature"]))


def build_mar(mc: dict) -> nn.Module:
    from .models.mar import MAR, MARConfig
    return MAR(MARConfig.from_dict(mc))


def build_mar_causal(mc: dict) -> nn.Module:
    from .models.mar_causal import MARCausal, MARCausalConfig
    return MARCausal(MARCausalConfig.from_dict(mc))


def latent_config_dict(model: nn.Module) -> dict:
    return model.config.to_dict()


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    build: Callable[[dict], nn.Module]        # saved model_config -> module
    config_dict: Callable[[nn.Module], dict]  # module -> JSON-able model_config
    draw: Callable[..., "torch.Tensor"]       # (model, n, *, labels, context, seeds, cfg, batch_size) -> (n, T[, C])
    sample_keys: tuple[str, ...]              # sampling settings that decide the drawn tokens
    output: str = "tokens"                    # "tokens" (integer grids) or "latents" (continuous, KL-decoded)


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", "causal transformer over a token grid (stage 1; stage 2 with a context grid)",
                  lambda mc: GPT(gpt_config(mc)), gpt_config_dict, draw_autoregressive, AR_SAMPLE_KEYS),
    "maskgit": Family("maskgit", "bidirectional mask-predict transformer over a token grid (MaskGIT; "
                                 "DiGIT's NAR stage 2 with a context grid)",
                      lambda mc: MaskPredictor(gpt_config(mc)), gpt_config_dict, draw_mask_predict,
                      AR_SAMPLE_KEYS + ("iterations", "choice_temperature")),
    "mar": Family("mar", "masked autoregressive transformer over continuous latents, random order, diffusion-loss "
                         "head (MAR)", build_mar, latent_config_dict, draw_mar, LATENT_SAMPLE_KEYS + ("num_iter",),
                  "latents"),
    "mar_causal": Family("mar_causal", "causal transformer over continuous latents, raster order, diffusion-loss "
                                       "head (MAR's AR variant)", build_mar_causal, latent_config_dict,
                         draw_mar_causal, LATENT_SAMPLE_KEYS, "latents"),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown generator family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
