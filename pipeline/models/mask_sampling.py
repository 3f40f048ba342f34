"""Iterative mask-predict decoding (MaskGIT; DiGIT's NAR stage 2 inference), seeded per sample.

All grid tokens start as [MASK]. Step t of T (``iterations``, 8 in the official inference script):

1. one forward pass; every masked position draws a code (temperature, optional top-k / top-p);
2. unless it is the last step, the newly drawn codes with the lowest confidence go back to
   [MASK], as many as ``maskgit.decode_schedule`` says stay masked after step t. Confidence =
   log-prob of the drawn code + Gumbel noise x ``choice_temperature`` x (1 - (t+1)/T); codes fixed
   in earlier steps are never re-masked.

Sample i has its own ``torch.Generator`` seeded by ``seeds[i]`` and draws, per step, one uniform
per grid position for the codes and one for the Gumbel noise, so a sample depends neither on the
batch it is drawn in nor on the other seeds. Classifier-free guidance mixes the logits of the
conditional and null-class rows (one doubled batch) as the AR sampler does.
"""
from __future__ import annotations

import torch

from pipeline.models.maskgit import MaskPredictor, decode_schedule
from pipeline.models.sampling import inverse_cdf, sample_seeds, seeded_batches, top_k_filter, top_p_filter, uniforms


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms in [0, 1)."""
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1 - 1e-12)))


def _guided_logits(model: MaskPredictor, x, labels, context, cfg_scale: float) -> torch.Tensor:
    if cfg_scale == 1.0:
        return model(x, labels, context).float()
    null = torch.full_like(labels, model.null_class)
    ctx = None if context is None else torch.cat([context, context])
    cond, uncond = model(torch.cat([x, x]), torch.cat([labels, null]), ctx).float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.inference_mode()
def _decode_batch(model: MaskPredictor, labels, context, generators, iterations: int, temperature: float,
                  top_k, top_p, choice_temperature: float, cfg_scale: float) -> torch.Tensor:
    B, n = len(generators), model.config.block_size
    device = model.head.weight.device
    x = torch.full((B, n), model.mask_code, dtype=torch.long, device=device)
    schedule = decode_schedule(n, iterations)
    for t in range(iterations):
        logits = _guided_logits(model, x, labels, context, cfg_scale)            # (B, n, V)
        u_code = uniforms(generators, n, device)
        u_noise = uniforms(generators, n, device)
        if temperature == 0:
            drawn = logits.argmax(dim=-1)
        else:
            filtered = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
            drawn = inverse_cdf(filtered.softmax(dim=-1), u_code)
        unknown = x == model.mask_code
        x = torch.where(unknown, drawn, x)
        if t == iterations - 1:
            break
        log_p = logits.log_softmax(dim=-1).gather(-1, x.unsqueeze(-1)).squeeze(-1).double()
        confidence = log_p + choice_temperature * (1 - (t + 1) / iterations) * gumbel(u_noise)
        confidence = confidence.masked_fill(~unknown, float("inf"))
        remask = confidence.topk(schedule[t], dim=1, largest=False).indices
        x = x.scatter(1, remask, model.mask_code)
    return x


def mask_predict_sample(model: MaskPredictor, n: int, labels=None, context=None, *, iterations: int = 8,
                        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        choice_temperature: float = 4.5, cfg_scale: float = 1.0, seeds=None,
                        batch_size: int = 64) -> torch.LongTensor:
    """Draw n grids (n, h*w) from ``model`` (put in eval mode for the call).

    labels: (n,) class ids of a class-conditional model (None: the null class / unconditional).
    context: (n, C) context grids of a stage-2 model (the DiGIT tokens).
    seeds: one int per sample (default 0..n-1); sample i depends only on seeds[i], labels[i],
    context[i] and the settings."""
    device = model.head.weight.device
    seeds = sample_seeds(n, seeds)
    if model.config.num_classes > 0:
        labels = torch.full((n,), model.null_class) if labels is None else labels
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1).expand(n)
    elif labels is not None or cfg_scale != 1.0:
        raise ValueError("labels and classifier-free guidance need a class-conditional model")
    if context is not None:
        context = torch.as_tensor(context, dtype=torch.long, device=device).reshape(n, -1)
    return seeded_batches(model, seeds, labels, context, batch_size, lambda lab, ctx, gens: _decode_batch(
        model, lab, ctx, gens, iterations, temperature, top_k, top_p, choice_temperature, cfg_scale))
