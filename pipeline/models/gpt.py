"""Stage-1 GPT over a grid of discrete tokens (DiGIT step 5), in one file, nanoGPT style.

A pre-norm causal transformer over the h*w tokens of one image in raster order. The first input
position holds the condition: a learned BOS vector (unconditional model) or a class embedding
(class-conditional model). The class table has ``num_classes + 1`` rows; the last row is the
"null" class, used for label dropout in training and as the unconditional branch of
classifier-free guidance at sampling time.

    input  = [cond, x_0, x_1, ..., x_{T-2}]      (T = h*w positions)
    output =  logits for x_0, x_1, ..., x_{T-1}

Position embeddings are learned, one row per input position plus one: row 0 is the condition,
row t+1 the grid position t (raster order). Training and sampling use rows 0..T-1; ``features``
also feeds the last token and so uses row T.

The token embedding and the output head are NOT tied (the 219M / 732M paper sizes count both).
Init follows GPT-2: normal(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2*n_layer),
biases zero.

Incremental decoding: ``new_cache`` -> ``prefill`` (the condition position) -> ``decode_step``
(one token at a time). It gives the same logits as ``forward`` on the whole prefix.

Stage 2 (DiGIT step 6) is the same model with a *context*: a second token grid (the DiGIT tokens,
``context_vocab_size`` codes, ``context_grid``) with its own embedding table, placed between the
condition and the predicted grid (the VQ tokens). Outputs are read only at the positions that
predict the VQ grid, so the loss covers the VQ part only:

    input  = [cond, c_0, ..., c_{C-1}, x_0, ..., x_{T-2}]
    output =                 logits for x_0, ..., x_{T-1}   (read at positions C .. C+T-1)

``prefill`` then writes the condition and the whole context into the KV cache at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS: dict[str, dict] = {
    # CPU-trainable in minutes; keeps the caller's vocab and grid.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    # DiGIT 219M: K=8192 DINOv2-B/14 k-means tokens, 16x16 grid.
    "base": dict(n_layer=16, n_head=16, n_embd=1024, vocab_size=8192),
    # DiGIT 732M: K=16384 DINOv2-L/14 k-means tokens, 16x16 grid.
    "large": dict(n_layer=24, n_head=16, n_embd=1536, vocab_size=16384),
}


@dataclass
class GPTConfig:
    vocab_size: int = 8192            # codebook size K
    grid: tuple[int, int] = (16, 16)  # (h, w) -> block of h*w tokens
    n_layer: int = 16
    n_head: int = 16
    n_embd: int = 1024
    dropout: float = 0.0
    num_classes: int = 0              # 0 = unconditional (BOS); else class-conditional
    class_dropout: float = 0.1        # label dropout probability (training only, for CFG)
    bias: bool = False                # bias in Linear and LayerNorm
    context_vocab_size: int = 0       # stage 2: codebook of the context grid (0 = no context)
    context_grid: tuple[int, int] = (0, 0)

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        self.context_grid = tuple(int(g) for g in self.context_grid)
        if (self.context_vocab_size > 0) != (self.context_len > 0):
            raise ValueError("a context needs both context_vocab_size and context_grid")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} not divisible by n_head {self.n_head}")

    @property
    def block_size(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def context_len(self) -> int:
        return self.context_grid[0] * self.context_grid[1]

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


class KVCache:
    """Preallocated keys/values of every layer: (n_layer, B, n_head, max_len, head_dim).

    ``pos`` is the number of positions already written (the next input goes to ``pos``)."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=None):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``causal=False`` lets every position see every other (the
    mask-predict model of ``models/maskgit.py``, which never uses a KV cache)."""

    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, L, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            s = cache.pos
            cache.k[layer, :, :, s:s + L] = k
            cache.v[layer, :, :, s:s + L] = v
            k, v = cache.k[layer, :, :, :s + L], cache.v[layer, :, :, :s + L]
            if L == 1:      # one new query sees every cached position
                y = F.scaled_dot_product_attention(q, k, v)
            elif s == 0:    # prefill from an empty cache
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:           # a chunk after a prefix: query i sees positions <= s + i
                mask = torch.ones(L, s + L, dtype=torch.bool, device=x.device).tril(diagonal=s)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, L, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


def cached_step(model: nn.Module, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Advance ``cache`` by the embedded positions ``x`` (B, L, D) through ``model``'s position
    table, dropout, blocks and final norm; the last position's hidden state (B, D). Shared by the
    GPT and MAR's causal variant, which differ only in what reads it (logits vs diffusion head)."""
    L = x.shape[1]
    if cache.pos + L > cache.max_len:
        raise ValueError(f"KV cache full ({cache.max_len} positions)")
    x = model.drop(x + model.pos_emb(torch.arange(cache.pos, cache.pos + L, device=x.device)))
    for i, block in enumerate(model.blocks):
        x = block(x, cache, i)
    cache.pos += L
    return model.ln_f(x[:, -1])


class TokenTransformer(nn.Module):
    """What the GPT and the mask-predict model (``models/maskgit.py``) share: the token, position,
    context and class tables, the pre-norm blocks (causal or not), the final norm and the head,
    GPT-2 init, and the condition / context embedding. ``extra_codes`` adds input-only rows to the
    token table after the ``vocab_size`` codes (the [MASK] code); the head predicts the codes only."""

    def __init__(self, config: GPTConfig, causal: bool = True, extra_codes: int = 0):
        super().__init__()
        self.config = config
        D = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size + extra_codes, D)
        # row 0: condition; then one row per context position, then one per grid position
        self.pos_emb = nn.Embedding(config.context_len + config.block_size + 1, D)
        if config.context_len:
            self.ctx_emb = nn.Embedding(config.context_vocab_size, D)
        if config.num_classes > 0:
            self.class_emb = nn.Embedding(config.num_classes + 1, D)  # last row: null class
        else:
            self.bos = nn.Parameter(torch.zeros(1, 1, D))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, causal) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(D, bias=config.bias)
        self.head = nn.Linear(D, config.vocab_size, bias=False)  # untied from tok_emb

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.num_classes == 0:
            nn.init.normal_(self.bos, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def null_class(self) -> int:
        """Label of the unconditional ("null") class row; only for class-conditional models."""
        return self.config.num_classes

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out token/position/class tables and the head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel() + self.head.weight.numel()
            n -= self.class_emb.weight.numel() if self.config.num_classes else self.bos.numel()
            n -= self.ctx_emb.weight.numel() if self.config.context_len else 0
        return n

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay: the embedding tables and the BOS vector."""
        return {name for name, _ in self.named_parameters() if "_emb" in name or name == "bos"}

    def extra_repr(self) -> str:
        c = self.config
        cond = f"{c.num_classes} classes (+null), label dropout {c.class_dropout}" \
            if c.num_classes else "unconditional (BOS)"
        ctx = f", context {c.context_grid[0]}x{c.context_grid[1]} of K={c.context_vocab_size}" \
            if c.context_len else ""
        return (f"params={self.num_params() / 1e6:.1f}M, K={c.vocab_size}, grid={c.grid[0]}x{c.grid[1]}{ctx}, "
                f"{c.n_layer}L x {c.n_head}H x {c.n_embd}d, {cond}")

    # -- embeddings --------------------------------------------------------------------------------

    def cond_embedding(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """(B, 1, D) condition vectors. ``labels=None`` on a class model means the null class.
        Label dropout (to the null class) is applied only in training mode."""
        c = self.config
        if c.num_classes == 0:
            return self.bos.expand(batch_size, 1, -1)
        device = self.class_emb.weight.device
        if labels is None:
            labels = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        if self.training and c.class_dropout > 0:
            drop = torch.rand(labels.shape, device=device) < c.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.class_emb(labels).unsqueeze(1)

    def _head_embedding(self, labels, context, batch_size: int) -> torch.Tensor:
        """(B, 1 + C, D): the condition, then the context tokens (stage 2)."""
        cond = self.cond_embedding(labels, batch_size)
        C = self.config.context_len
        if C == 0:
            if context is not None:
                raise ValueError("this model takes no context")
            return cond
        if context is None or tuple(context.shape) != (batch_size, C):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this model needs a context of shape ({batch_size}, {C}), got {got}")
        return torch.cat([cond, self.ctx_emb(context)], dim=1)

    def _embed(self, prefix: torch.Tensor, labels, context=None) -> torch.Tensor:
        """[cond, context] + prefix -> (B, 1 + C + L, D) with position embeddings added."""
        B, L = prefix.shape
        x = torch.cat([self._head_embedding(labels, context, B), self.tok_emb(prefix)], dim=1)
        pos = torch.arange(x.shape[1], device=x.device)
        return self.drop(x + self.pos_emb(pos))


class GPT(TokenTransformer):
    def __init__(self, config: GPTConfig):
        super().__init__(config, causal=True)

    # -- full sequence -----------------------------------------------------------------------------

    def forward(self, tokens, labels=None, targets=None, label_smoothing: float = 0.0, context=None):
        """tokens (B, T) long -> logits (B, T, V) where logits[:, t] predicts tokens[:, t] from
        the condition, the context (stage 2) and tokens[:, :t]. loss: cross-entropy against
        ``targets`` (usually the tokens themselves), or None."""
        B, T = tokens.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens > block size {self.config.block_size}")
        x = self._embed(tokens[:, :-1], labels, context)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x[:, self.config.context_len:]))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   label_smoothing=label_smoothing)
        return logits, loss

    def next_logits(self, prefix: torch.Tensor, labels=None, context=None) -> torch.Tensor:
        """Logits (B, V) for the token after ``prefix`` (B, t), recomputing everything (no cache)."""
        x = self._embed(prefix, labels, context)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, -1]))

    @torch.no_grad()
    def features(self, tokens, labels=None, layer: int | None = None, context=None):
        """Hidden states for linear probing: the output of every block (before ``ln_f``), at the
        T token positions only (the condition position is dropped), so that state t has seen the
        condition and tokens[:, :t+1] (all T tokens are fed). Returns a list of n_layer (B, T, D)
        tensors, or the single (B, T, D) tensor of block ``layer`` (0-based; later blocks are not
        computed)."""
        x = self._embed(tokens, labels, context)
        out = []
        last = self.config.n_layer - 1 if layer is None else layer
        first = 1 + self.config.context_len
        for block in self.blocks[:last + 1]:
            x = block(x)
            out.append(x[:, first:])
        return out if layer is None else out[-1]

    # -- incremental decoding ----------------------------------------------------------------------

    def new_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        c = self.config
        w = self.head.weight
        return KVCache(c.n_layer, batch_size, c.n_head, c.context_len + c.block_size, c.n_embd // c.n_head,
                       device=device or w.device, dtype=dtype or w.dtype)

    def _step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.head(cached_step(self, x, cache))

    def prefill(self, labels, cache: KVCache, context=None) -> torch.Tensor:
        """Write the condition (and the context) into an empty cache; logits (B, V) for token 0."""
        if cache.pos != 0:
            raise ValueError("prefill needs an empty cache")
        return self._step(self._head_embedding(labels, context, cache.k.shape[1]), cache)

    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed token (B,) at the next position; logits (B, V) for the token after it."""
        return self._step(self.tok_emb(token.view(-1, 1)), cache)
