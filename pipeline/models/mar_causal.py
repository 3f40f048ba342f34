"""MAR's causal variant ("AR + diffusion loss", Li et al. 2024, Table 1/2): continuous latent tokens
in raster order, a causal transformer, one token per step, each token drawn by MAR's diffusion head.

It is our GPT (``models/gpt.py``: the same pre-norm ``Block``s, ``KVCache`` and GPT-2 init) with two
changes at the ends: the token table becomes a linear projection of the C-channel latent token
(``z_proj``, MAR's name), and the softmax head becomes MAR's diffusion loss (``DiffusionLoss``),
conditioned per token on the transformer output ``z``:

    input  = [cond, x_0, x_1, ..., x_{L-2}]      (L = h*w positions, x_t in R^C)
    output =  z_0,  z_1, ...,       z_{L-1}        z_t conditions the diffusion of x_t

so ``z_t`` sees the condition and ``x_0 .. x_{t-1}`` only. The condition position holds a class
embedding (``num_classes + 1`` rows; the last row is the null class, used for label dropout and as
the unconditional branch of classifier-free guidance) or, for an unconditional model, a learned
start vector (``bos``). Position embeddings are learned, one row per input position.

Training (``forward``): the diffusion loss on all L tokens, each (token, z) pair repeated
``diffusion_batch_mul`` times with its own timestep and noise (MAR's ``forward_loss``); labels
are dropped to the null class with probability ``label_drop_prob`` (MAR: 0.1). All randomness
comes from the global torch RNG (the trainer reseeds it per step).

Sampling (``mar_causal_sample``): L steps, one token each. With the KV cache the condition is
prefilled and each drawn token fed once (``decode_step``); ``use_cache=False`` recomputes the
prefix every step (the benchmark baseline). The token's diffusion (``DiffusionLoss.sample``, 100
respaced steps by default, noise x temperature) runs with that step's CFG scale, MAR's linear ramp
``1 + (cfg - 1) * done / L`` (``models/sampling.py``'s ``cfg_scale_at``) or a constant, where ``done``
counts the tokens known after the step (token t: t + 1), as MAR's masked sampler, which at
``num_iter = L`` also draws one token per step; guidance doubles the batch with
the null class and mixes epsilon (the head's ``forward_with_cfg``), the two halves sharing their
noise. Every sample's noise comes from its own generator, so it does not depend on its batch.

Sizes: MAR-B/L/H are encoder+decoder stacks of 12+12 x 768, 16+16 x 1024 and 20+20 x 1280 with
diffusion heads 6 x 1024, 8 x 1280 and 12 x 1536; the causal presets use the total depth (24, 32,
40 blocks) at the same width, so they have about the masked models' parameter counts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from pipeline.models.diffusion_head import DiffusionLoss
from pipeline.models.gpt import Block, GPTConfig, KVCache, TokenTransformer, cached_step
from pipeline.models.sampling import cfg_scale_at, sample_seeds, seeded_batches

PRESETS: dict[str, dict] = {
    # CPU-trainable in minutes; keeps the caller's grid, token_dim and classes.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, head_width=128, head_depth=3, dropout=0.0),
    # MAR-B: 12 + 12 blocks x 768 (12 heads), diffusion head 6 x 1024.
    "base": dict(n_layer=24, n_head=12, n_embd=768, head_width=1024, head_depth=6),
    # MAR-L: 16 + 16 blocks x 1024 (16 heads), diffusion head 8 x 1280.
    "large": dict(n_layer=32, n_head=16, n_embd=1024, head_width=1280, head_depth=8),
    # MAR-H: 20 + 20 blocks x 1280 (16 heads), diffusion head 12 x 1536.
    "huge": dict(n_layer=40, n_head=16, n_embd=1280, head_width=1536, head_depth=12),
}


@dataclass
class MARCausalConfig:
    grid: tuple[int, int] = (16, 16)    # (h, w) latent grid -> L = h*w tokens (MAR: 256 px / 16)
    token_dim: int = 16                 # C, channels of one latent token (KL-16: 16)
    num_classes: int = 1000             # 0 = unconditional (learned start vector)
    n_layer: int = 24
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1                # MAR: attn_dropout = proj_dropout = 0.1
    head_width: int = 1024
    head_depth: int = 6
    num_sampling_steps: str = "100"     # respaced diffusion steps at sampling time
    diffusion_batch_mul: int = 4
    label_drop_prob: float = 0.1
    bias: bool = True                   # biases in Linear/LayerNorm (MAR's timm blocks: yes)

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        self.num_sampling_steps = str(self.num_sampling_steps)
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be two positive sizes, got {self.grid}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} not divisible by n_head {self.n_head}")
        if not 0.0 <= self.label_drop_prob <= 1.0:
            raise ValueError(f"label_drop_prob must be in [0, 1], got {self.label_drop_prob}")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def preset(cls, name: str, **overrides) -> "MARCausalConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MARCausalConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MARCausalConfig keys: {sorted(unknown)}")
        return cls(**d)

    def gpt_config(self) -> GPTConfig:
        """The ``GPTConfig`` the transformer blocks are built from (vocab fields unused)."""
        return GPTConfig(vocab_size=1, grid=self.grid, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=self.dropout, num_classes=self.num_classes,
                         class_dropout=self.label_drop_prob, bias=self.bias)


class MARCausal(nn.Module):
    """Causal transformer over continuous tokens + MAR's diffusion head (see the module doc)."""

    def __init__(self, config: MARCausalConfig):
        super().__init__()
        self.config = config
        gpt = config.gpt_config()
        D, L = config.n_embd, config.seq_len
        self.z_proj = nn.Linear(config.token_dim, D, bias=config.bias)
        self.pos_emb = nn.Embedding(L, D)                 # row 0: condition; row t+1: input x_t
        if config.num_classes > 0:
            self.class_emb = nn.Embedding(config.num_classes + 1, D)   # last row: null class
        else:
            self.bos = nn.Parameter(torch.zeros(1, 1, D))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(gpt, causal=True) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(D, bias=config.bias)

        # GPT-2 init of the transformer (as gpt.py): N(0, 0.02), residual projections scaled by
        # 1/sqrt(2 n_layer), zero biases. The head is built afterwards and keeps MAR's own init
        # (zero adaLN modulations and output: a fresh head predicts eps = 0).
        self.apply(TokenTransformer._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.num_classes == 0:
            nn.init.normal_(self.bos, mean=0.0, std=0.02)

        self.diffloss = DiffusionLoss(config.token_dim, D, depth=config.head_depth, width=config.head_width,
                                      num_sampling_steps=config.num_sampling_steps,
                                      diffusion_batch_mul=config.diffusion_batch_mul)

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def num_params(self, head: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if head else n - sum(p.numel() for p in self.diffloss.parameters())

    def no_weight_decay(self) -> set[str]:
        """Kept out of weight decay: the embedding tables and start vector (as our GPT) and the
        whole diffusion head (as MAR's ``add_weight_decay``); 1-d parameters never decay anyway."""
        return {name for name, _ in self.named_parameters()
                if name.startswith("diffloss.") or "_emb" in name or name == "bos"}

    def extra_repr(self) -> str:
        c = self.config
        cond = f"{c.num_classes} classes (+null), label dropout {c.label_drop_prob}" \
            if c.num_classes else "unconditional"
        return (f"params={self.num_params() / 1e6:.1f}M, grid={c.grid[0]}x{c.grid[1]}, C={c.token_dim}, "
                f"{c.n_layer}L x {c.n_head}H x {c.n_embd}d, head {c.head_depth} x {c.head_width}, {cond}")

    # -- the transformer ---------------------------------------------------------------------------

    def cond_embedding(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """(B, 1, D) condition vectors. ``labels=None`` on a class model means the null class; an
        unconditional model ignores labels. Label dropout (to the null class, global RNG) only
        in training mode."""
        c = self.config
        if c.num_classes == 0:
            return self.bos.expand(batch_size, 1, -1)
        device = self.class_emb.weight.device
        if labels is None:
            labels = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long).reshape(-1)
        if labels.numel() != batch_size:
            raise ValueError(f"{labels.numel()} labels for a batch of {batch_size}")
        if self.training and c.label_drop_prob > 0:
            drop = torch.rand(labels.shape, device=device) < c.label_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.class_emb(labels).unsqueeze(1)

    def _hidden(self, prefix: torch.Tensor, labels) -> torch.Tensor:
        """prefix (B, t, C), t < L -> (B, 1 + t, D): ln_f(transformer([cond] + z_proj(prefix)))."""
        B, t, C = prefix.shape
        if C != self.config.token_dim:
            raise ValueError(f"tokens of {C} channels, model takes {self.config.token_dim}")
        if t >= self.seq_len:
            raise ValueError(f"prefix of {t} tokens; at most {self.seq_len - 1}")
        x = torch.cat([self.cond_embedding(labels, B), self.z_proj(prefix)], dim=1)
        x = self.drop(x + self.pos_emb(torch.arange(1 + t, device=x.device)))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def condition(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """x (B, T, C) tokens in raster order, T <= L -> z (B, T, D); z[:, t] conditions x[:, t]
        and has seen the condition and x[:, :t] only. Label dropout only in training mode."""
        if x.dim() != 3 or x.shape[1] < 1:
            raise ValueError(f"expected tokens (B, T >= 1, C), got {tuple(x.shape)}")
        return self._hidden(x[:, :-1], labels)

    def next_condition(self, prefix: torch.Tensor, labels=None) -> torch.Tensor:
        """z (B, D) for the token after ``prefix`` (B, t, C), recomputing everything (no cache)."""
        return self._hidden(prefix, labels)[:, -1]

    def forward(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """Scalar diffusion loss of x (B, L, C) (latents already scaled, raster order) given labels
        (B,) or None; each token repeated ``diffusion_batch_mul`` times (MAR's ``forward_loss``)."""
        if x.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} tokens per image, got {x.shape[1]}")
        return self.diffloss.loss(x, self.condition(x, labels))

    def head(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The denoising MLP: noisy tokens (N, C), diffusion timesteps (N,) of the 1000-step
        schedule, conditions (N, D) -> (N, 2C) = (eps, variance interpolation value)."""
        return self.diffloss.net(x_t, t, z)

    # -- incremental decoding ----------------------------------------------------------------------

    def new_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        c = self.config
        w = self.z_proj.weight
        return KVCache(c.n_layer, batch_size, c.n_head, c.seq_len, c.n_embd // c.n_head,
                       device=device or w.device, dtype=dtype or w.dtype)

    def _step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return cached_step(self, x, cache)

    def prefill(self, labels, cache: KVCache) -> torch.Tensor:
        """Write the condition position into an empty cache; z (B, D) for token 0."""
        if cache.pos != 0:
            raise ValueError("prefill needs an empty cache")
        return self._step(self.cond_embedding(labels, cache.k.shape[1]), cache)

    def decode_step(self, token_vec: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed token (B, C) at the next position; z (B, D) for the token after it."""
        B = token_vec.shape[0]
        return self._step(self.z_proj(token_vec.reshape(B, 1, -1)), cache)


# --------------------------------------------------------------------------------------------
# sampling


@torch.inference_mode()
def _sample_batch(model: MARCausal, labels, generators, cfg_scale: float, cfg_schedule: str,
                  temperature: float, use_cache: bool) -> torch.Tensor:
    B, L, C = len(generators), model.seq_len, model.config.token_dim
    w = model.z_proj.weight
    guided = cfg_scale != 1.0
    if guided:
        null = torch.full((B,), model.null_class, dtype=torch.long, device=w.device)
        labels = torch.cat([labels, null])

    def both(t):  # the conditional and the null rows see the same tokens
        return torch.cat([t, t]) if guided else t

    x = torch.zeros(B, L, C, device=w.device, dtype=w.dtype)
    cache = model.new_cache(2 * B if guided else B) if use_cache else None
    for t in range(L):
        if use_cache:
            z = model.prefill(labels, cache) if t == 0 else model.decode_step(both(x[:, t - 1]), cache)
        else:
            z = model.next_condition(both(x[:, :t]), labels)
        # the scale of a step after which t + 1 of the L tokens are known (as the masked MAR)
        scale = cfg_scale_at(cfg_scale, cfg_schedule, t + 1, L) if guided else 1.0
        if scale != 1.0:   # [cond; null] rows, guided eps, shared noise from the cond rows' generators
            x[:, t] = model.diffloss.sample(z, temperature, generators, cfg=scale)[:B]
        else:              # unguided (or a ramp at 1): the conditional rows only, same noise draws
            x[:, t] = model.diffloss.sample(z[:B], temperature, generators)
    return x.float()


def mar_causal_sample(model: MARCausal, n: int, *, labels=None, seeds=None, cfg_scale: float = 1.0,
                      cfg_schedule: str = "linear", temperature: float = 1.0, batch_size: int = 64,
                      use_cache: bool = True) -> torch.Tensor:
    """Draw n latent grids (n, L, C) float in raster order (model in eval mode for the call).

    labels: (n,) class ids (or one for all) of a class-conditional model; None = the null class
    (an unconditional model ignores labels). seeds: one int per sample (default 0..n-1); sample i
    depends only on seeds[i] and labels[i], not on its batch. cfg_scale != 1: classifier-free
    guidance on epsilon with the scale ``cfg_scale_at(cfg_scale, cfg_schedule, t + 1, L)`` for
    token t ("linear": MAR's ramp, 1 + (cfg_scale - 1)(t + 1)/L; "constant"). temperature scales
    the diffusion sampling noise.
    use_cache=False recomputes the prefix every step (the baseline for a benchmark)."""
    device = model.z_proj.weight.device
    seeds = sample_seeds(n, seeds)
    if cfg_scale != 1.0:
        if model.config.num_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        if labels is None:
            raise ValueError("classifier-free guidance needs labels")
        cfg_scale_at(cfg_scale, cfg_schedule, 0, model.seq_len)   # reject an unknown schedule early
    if labels is not None and model.config.num_classes > 0:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1 and n > 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise ValueError(f"{labels.numel()} labels for {n} samples")
        if (labels < 0).any() or (labels >= model.config.num_classes).any():
            raise ValueError(f"labels must be in [0, {model.config.num_classes})")
    else:
        labels = None
    empty = torch.zeros(0, model.seq_len, model.config.token_dim, device=device)
    return seeded_batches(model, seeds, labels, None, batch_size, lambda lab, _ctx, gens: _sample_batch(
        model, lab, gens, cfg_scale, cfg_schedule, temperature, use_cache), empty=empty)
