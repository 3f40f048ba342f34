"""Autoregressive sampling for the stage-1 GPT (LlamaGen style: small and separate from the model).

Every sample has its own ``torch.Generator`` seeded by ``seeds[i]`` and draws exactly one uniform
number per token, so a sample does not depend on the batch it was drawn in nor on the other seeds.
The draw is inverse-CDF: token = first index whose cumulative probability exceeds u * total.

Classifier-free guidance runs the conditional and the null-class rows as one doubled batch and
mixes the logits: uncond + cfg_scale * (cond - uncond). cfg_scale == 1 skips the null branch, so
it is exactly the conditional model.
"""
from __future__ import annotations

import torch

from pipeline.models.gpt import GPT


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf."""
    if k is None or k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sum >= p
    (the most likely token is always kept)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p  # mass before this token already >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (..., V) from uniforms u (...): the first index whose cumulative
    probability exceeds u * total."""
    cdf = probs.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=probs.size(-1) - 1)


def uniforms(generators: list[torch.Generator], n: int | None = None, device=None) -> torch.Tensor:
    """float64 uniforms, row i from generators[i]: shape (B,) when n is None, else (B, n)."""
    shape = () if n is None else (n,)
    u = torch.stack([torch.rand(shape, generator=g, device=g.device, dtype=torch.float64) for g in generators])
    return u.to(device) if device is not None else u


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs (B, V), row i using generators[i] (one uniform each)."""
    return inverse_cdf(probs, uniforms(generators, device=probs.device))


def pick(logits, generators, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """Filter/temper logits (B, V) and draw one token per row. temperature 0 = argmax (the
    generators are still advanced, so seeds stay aligned)."""
    logits = logits.float()
    if temperature == 0:
        draw(torch.ones_like(logits), generators)
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return draw(logits.softmax(dim=-1), generators)


@torch.inference_mode()
def _sample_batch(model: GPT, labels, generators, temperature, top_k, top_p, cfg_scale, use_cache, context=None):
    B, T = len(generators), model.config.block_size
    device = model.head.weight.device
    guided = cfg_scale != 1.0
    if guided:
        if model.config.num_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        null = torch.full((B,), model.null_class, dtype=torch.long, device=device)
        labels = torch.cat([labels, null])
        if context is not None:
            context = torch.cat([context, context])

    def mix(logits):
        if not guided:
            return logits
        cond, uncond = logits.float().chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    x = torch.zeros(B, T, dtype=torch.long, device=device)
    cache = model.new_cache(2 * B if guided else B) if use_cache else None
    for t in range(T):
        if use_cache:
            if t == 0:
                logits = model.prefill(labels, cache, context)
            else:
                prev = x[:, t - 1]
                logits = model.decode_step(torch.cat([prev, prev]) if guided else prev, cache)
        else:
            prefix = x[:, :t]
            logits = model.next_logits(torch.cat([prefix, prefix]) if guided else prefix, labels, context)
        x[:, t] = pick(mix(logits), generators, temperature, top_k, top_p)
    return x


CFG_SCHEDULES = ("linear", "constant")


def cfg_scale_at(cfg_scale: float, schedule: str, done: int, total: int) -> float:
    """The guidance scale of a step after which ``done`` of ``total`` tokens are known (LTH14/mar ``models/mar.py:312-318``):
    ``"linear"``: 1 + (cfg_scale - 1) * done / total; ``"constant"``: cfg_scale.
    (MAR passes done = L - ``masked_after_steps``[s], i.e. L - 1 at its last step.)"""
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * done / total
    if schedule == "constant":
        return float(cfg_scale)
    raise ValueError(f"unknown cfg schedule {schedule!r}; known: {', '.join(CFG_SCHEDULES)}")


def sample_seeds(n: int, seeds) -> list[int]:
    """One int seed per sample: ``seeds`` (default 0..n-1), checked to number n."""
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} samples")
    return seeds


def seeded_batches(model, seeds: list[int], labels, context, batch_size: int, draw_batch,
                   empty: torch.Tensor | None = None) -> torch.Tensor:
    """``draw_batch(labels, context, generators)`` over batches of at most ``batch_size`` samples,
    sample i with its own generator seeded by ``seeds[i]``, the model in eval mode for the call;
    the batches' rows concatenated (every family's sampler shares this). ``empty``: what zero
    samples give (default: no token grids of the model's block size)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(seeds), batch_size):
            gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[i:i + batch_size]]
            lab = None if labels is None else labels[i:i + batch_size]
            ctx = None if context is None else context[i:i + batch_size]
            out.append(draw_batch(lab, ctx, gens))
        if out:
            return torch.cat(out)
        return empty if empty is not None else torch.zeros(0, model.config.block_size, dtype=torch.long, device=device)
    finally:
        model.train(was_training)


def sample(model: GPT, n: int, labels=None, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, cfg_scale: float = 1.0, seeds=None, use_cache: bool = True,
           batch_size: int = 64, context=None) -> torch.LongTensor:
    """Draw n token grids (n, h*w) from ``model`` (put in eval mode for the call).

    labels: (n,) class ids for a class-conditional model (None = null class / unconditional).
    seeds: one int per sample (default 0..n-1); sample i depends only on seeds[i] and labels[i].
    use_cache=False recomputes the whole prefix every step (the baseline for bench/sampling.py).
    context: (n, C) context tokens of a stage-2 model (the DiGIT grids), prefilled into the KV cache.
    """
    device = model.head.weight.device
    seeds = sample_seeds(n, seeds)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1 and n > 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise ValueError(f"{labels.numel()} labels for {n} samples")
    elif cfg_scale != 1.0:
        raise ValueError("classifier-free guidance needs labels")
    if context is not None:
        context = torch.as_tensor(context, dtype=torch.long, device=device).reshape(n, -1)
    return seeded_batches(model, seeds, labels, context, batch_size, lambda lab, ctx, gens: _sample_batch(
        model, lab, gens, temperature, top_k, top_p, cfg_scale, use_cache, ctx))
