"""MAR's diffusion-loss head in pure torch (our own compact version of LTH14/mar's method).

MAR (``models/diffloss.py``) models each continuous token ``x`` given the transformer's output ``z``
with a small denoising MLP, ``SimpleMLPAdaLN``:

* ``input_proj`` (``in_channels -> width``); a timestep embedding (256-d sinusoid, cos first, then an
  MLP ``Linear-SiLU-Linear``) plus ``cond_embed(z)`` gives the conditioning vector ``y``;
* ``num_res_blocks`` residual blocks ``x + gate * MLP(LN(x) * (1 + scale) + shift)`` with
  ``(shift, scale, gate)`` from ``SiLU -> Linear(y)`` (adaLN);
* a final adaLN layer (LayerNorm without affine, shift/scale from ``y``) and a linear output with
  ``2 * in_channels`` channels: predicted noise ``eps`` and the variance interpolation value.

MAR's init: xavier-uniform linears with zero bias, N(0, 0.02) timestep-MLP weights, and zero
weights/biases for every adaLN modulation and for the output linear, so a fresh head outputs exactly
zero (eps = 0 and variance value 0, i.e. the log variance half-way between the two bounds).

The diffusion (``diffusion/`` there, IDDPM's code via DiT): cosine schedule over 1000 steps
(``betas_for_alpha_bar`` with ``max_beta=0.999``), epsilon prediction, learned-range variance,
loss = MSE(eps) + variational-bound term (the eps part detached; decoder NLL at t = 0, in bits);
sampling with the schedule respaced to ``num_sampling_steps`` (``space_timesteps``) and the sampling
noise multiplied by ``temperature``. The schedules are plain float64 CPU tensors (explicitly, so a
model built under ``torch.device("meta")`` to load weights into still has real ones).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# MAR's diffusion-loss head presets: name -> (width, depth)
DIFFLOSS_PRESETS = {"B": (1024, 6), "L": (1280, 8), "H": (1536, 12)}

TIMESTEP_FREQUENCY_DIM = 256
TRAINING_STEPS = 1000


# --------------------------------------------------------------------------------------------
# the denoising MLP


def sinusoidal_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = TIMESTEP_FREQUENCY_DIM):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class AdaLNResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(adaln_modulate(self.in_ln(x), shift, scale))


class AdaLNFinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(adaln_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoising MLP: ``forward(x_t, t, c) -> (N, out_channels)``."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([AdaLNResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = AdaLNFinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.res_blocks:
            h = checkpoint(block, h, y, use_reentrant=False) if recompute else block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Batch = [conditional half; unconditional half] sharing x: guide eps, keep the variance."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        eps_cond, eps_uncond = eps.chunk(2, dim=0)
        guided = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# --------------------------------------------------------------------------------------------
# Gaussian diffusion (eps prediction, learned-range variance)


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> torch.Tensor:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), float64."""
    return torch.tensor([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                         for i in range(num_steps)], dtype=torch.float64, device="cpu")


def cosine_alpha_bar(u: float) -> float:
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int = TRAINING_STEPS) -> torch.Tensor:
    return betas_for_alpha_bar(num_steps, cosine_alpha_bar)


def space_timesteps(num_steps: int, section_counts: Union[str, int, Sequence[int]]) -> list[int]:
    """Kept original steps: the range split into sections, each with evenly spaced (rounded) steps."""
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            raise NotImplementedError("ddim striding is not implemented")
        counts = [int(s) for s in section_counts.split(",")]
    else:
        counts = list(section_counts)
    size_per, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised into 256 bins (edges open)."""
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Diffusion over the given betas; ``timestep_map[i]`` is the original step the model sees."""

    def __init__(self, betas: torch.Tensor, timestep_map: Optional[Sequence[int]] = None):
        b = betas.double()
        self.betas = b
        self.num_timesteps = len(b)
        self.timestep_map = torch.tensor(list(timestep_map) if timestep_map is not None else range(len(b)),
                                         device=b.device)
        alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([b.new_ones(1), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        # the variance at step 0 is 0; its log is clipped to the step-1 value
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if len(pv) > 1 else pv.new_zeros(0)
        self.posterior_mean_coef_x0 = b * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef_xt = (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab)

    @classmethod
    def respaced(cls, base_betas: torch.Tensor, use_timesteps: Sequence[int]) -> "GaussianDiffusion":
        """Keep only ``use_timesteps``, with betas that reproduce alpha_bar at the kept steps."""
        ab = torch.cumprod(1.0 - base_betas.double(), 0)
        keep = sorted(use_timesteps)
        kept_ab = ab[keep]
        prev = torch.cat([kept_ab.new_ones(1), kept_ab[:-1]])
        return cls(1.0 - kept_ab / prev, timestep_map=keep)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return values.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        mean = self._at(self.posterior_mean_coef_x0, t, x_t) * x0 + self._at(self.posterior_mean_coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def model_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                            clip_x0: Optional[float] = None):
        """Split (eps, v); log variance interpolates log posterior var (v=-1) .. log beta (v=+1)."""
        eps, v = model_out.split(x_t.shape[1], dim=1)
        frac = (v + 1) / 2
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(torch.log(self.betas), t, x_t)
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        if clip_x0 is not None:   # IDDPM's clip_denoised, at +-clip_x0 (MAR samples without it)
            pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
        mean, _ = self.q_posterior(pred_x0, x_t, t)
        return mean, log_var, pred_x0

    def model_call(self, model, x_t, t, **kwargs):
        return model(x_t, self.timestep_map.to(t.device)[t], **kwargs)

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                        **model_kwargs) -> dict:
        """Per-example ``mse`` (eps), ``vb`` (bits; eps detached) and ``loss = mse + vb``."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self.model_call(model, x_t, t, **model_kwargs)
        eps, v = out.split(x0.shape[1], dim=1)
        frozen = torch.cat([eps.detach(), v], dim=1)
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _ = self.model_mean_variance(frozen, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).flatten(1).mean(1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    @torch.no_grad()
    def p_sample_loop(self, model, noise: torch.Tensor, temperature: float = 1.0,
                      generator: NoiseSource = None, paired: bool = False, clip_x0: Optional[float] = None,
                      **model_kwargs) -> torch.Tensor:
        """Ancestral sampling from ``noise`` over all (respaced) steps; noise x temperature.
        ``clip_x0``: clamp each step's predicted x0 to +-clip_x0 (None: no clamp, as MAR).
        ``generator``: one ``torch.Generator`` for all rows, or one per row (``draw_noise``).
        ``paired``: rows are [cond; uncond] halves (CFG) that share each step's noise, drawn for
        the first half only (``generator`` then covers the first half)."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            mean, log_var, _ = self.model_mean_variance(self.model_call(model, x, t, **model_kwargs), x, t, clip_x0)
            if i > 0:
                if paired:
                    z = draw_noise((x.shape[0] // 2, *x.shape[1:]), generator, x.device, x.dtype)
                    z = torch.cat([z, z])
                else:
                    z = draw_noise(x.shape, generator, x.device, x.dtype)
                x = mean + torch.exp(0.5 * log_var) * z * temperature
            else:
                x = mean
        return x


NoiseSource = Union[None, torch.Generator, Sequence[torch.Generator]]


def draw_noise(shape, generator: NoiseSource, device, dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` (N, C). With a sequence of N generators, row i comes from
    generator i (runs of rows sharing one generator are drawn in one call, in row order), so a
    sample's noise does not depend on which other samples share its batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} row generators for {shape[0]} rows")
    parts, start = [], 0
    while start < shape[0]:
        g, stop = generator[start], start + 1
        while stop < shape[0] and generator[stop] is g:
            stop += 1
        parts.append(torch.randn((stop - start, *shape[1:]), generator=g, device=g.device, dtype=dtype))
        start = stop
    return torch.cat(parts).to(device)


# --------------------------------------------------------------------------------------------
# the loss module


class DiffusionLoss(nn.Module):
    """MAR's DiffLoss: ``loss(target, z)`` for training, ``sample(z, temperature)`` for generation."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: Union[str, int] = "100", diffusion_batch_mul: int = 4,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = target_channels
        self.diffusion_batch_mul = diffusion_batch_mul
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth,
                                  grad_checkpointing=grad_checkpointing)
        base = cosine_betas(TRAINING_STEPS)
        self.train_diffusion = GaussianDiffusion(base)
        self.gen_diffusion = GaussianDiffusion.respaced(base, space_timesteps(TRAINING_STEPS, num_sampling_steps))
        # sampling only: clamp the predicted x0 at each reverse step (None = MAR). At t = 999,
        # sqrt(alpha_bar) ~ 5e-5 turns an eps error e into an x0 error e / 5e-5: a briefly
        # trained head (the CPU demo) then draws latents thousands of times too large.
        self.clip_x0: Optional[float] = None

    @classmethod
    def preset(cls, name: str, target_channels: int, z_channels: int, **kwargs) -> "DiffusionLoss":
        width, depth = DIFFLOSS_PRESETS[name]
        return cls(target_channels, z_channels, depth=depth, width=width, **kwargs)

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean loss; each (target, z) row is repeated ``diffusion_batch_mul`` times (own t, noise)."""
        mul = self.diffusion_batch_mul
        target = target.reshape(-1, target.shape[-1]).repeat(mul, 1)
        z = z.reshape(-1, z.shape[-1]).repeat(mul, 1)
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        per_example = self.train_diffusion.training_losses(self.net, target, t, c=z)["loss"]
        if mask is not None:
            m = mask.reshape(-1).repeat(mul).to(per_example.dtype)
            return (per_example * m).sum() / m.sum()
        return per_example.mean()

    forward = loss

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, generator: NoiseSource = None,
               cfg: float = 1.0) -> torch.Tensor:
        """(N, z_channels) -> (N, target_channels). ``cfg != 1``: z = [cond; uncond], halves share
        noise. ``generator``: one for all rows or one per row (per conditional row under CFG)."""
        if cfg != 1.0:
            half = draw_noise((z.shape[0] // 2, self.in_channels), generator, z.device, z.dtype)
            noise = torch.cat([half, half])
            fn = lambda x, t, c: self.net.forward_with_cfg(x, t, c, cfg)  # noqa: E731
        else:
            noise = draw_noise((z.shape[0], self.in_channels), generator, z.device, z.dtype)
            fn = self.net.forward
        return self.gen_diffusion.p_sample_loop(fn, noise, temperature=temperature, generator=generator,
                                                paired=cfg != 1.0, clip_x0=self.clip_x0, c=z)
