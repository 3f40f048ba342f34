"""MAR's causal variant (pipeline.models.mar_causal): config, causality, KV cache, sampling, training.

Tolerances. Latent samples are floats, so the KV-cache and the recomputing paths (a one-query
attention over the cache vs a full causal attention), or batches of different sizes (other GEMM
blockings), agree only up to float32 rounding (~1e-7 relative). The diffusion sampler amplifies
absolute differences: its first reverse step divides by sqrt(alpha_bar) at t = 999 (~1e-4), so our
randomly perturbed, untrained heads (eps error O(1)) draw latents of size ~1e3..1e5 -- the sizes
are meaningless, the algebra is what is tested. We therefore compare every token relative to its
own size: max_c |a - b| <= 1e-4 * max_c |a| for each (sample, position). Measured worst case over
3 models x cfg 1/3 x cache/batch 1/batch 3: 1.2e-6 (80x margin); a different seed changes every
token by >= 0.4 of its size, and a wrong cache position, seed or label by O(1). Conditions z
(unit scale, before any diffusion) are compared at an absolute 1e-5 (measured ~2e-6).
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.mar import cfg_scale_at
from pipeline.models.mar_causal import MARCausal, MARCausalConfig, mar_causal_sample

GRID, C, K = (3, 3), 4, 5
L = GRID[0] * GRID[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls: threads only contend on a shared CPU (26 ms vs 1 ms per head call)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw) -> MARCausalConfig:
    base = dict(grid=GRID, token_dim=C, num_classes=K, num_sampling_steps="5", n_layer=2)
    return MARCausalConfig.preset("tiny", **{**base, **kw})


def randomized(config: MARCausalConfig, seed: int = 0) -> MARCausal:
    """A model whose head depends on x_t and z: MAR's init zeroes the adaLN modulations and the
    output layer (a fresh head predicts eps = 0 whatever z is), so perturb the head."""
    torch.manual_seed(seed)
    model = MARCausal(config).eval()
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model() -> MARCausal:
    return randomized(tiny_config())


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4):
    """Every token (last dim = channels) of b within rel x the token's size in a."""
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    ratio = (a - b).abs().amax(-1) / a.abs().amax(-1)
    assert ratio.max().item() <= rel, f"worst token: max |a - b| = {ratio.max().item():.3g} x its size > {rel}"


def assert_max_abs(a: torch.Tensor, b: torch.Tensor, atol: float):
    # (not torch.testing.assert_close: its first call imports torch.distributed.tensor, ~2 s)
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol, f"max |a - b| = {err:.3g} > {atol}"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


# -- config ------------------------------------------------------------------------------------------


def test_config_round_trip_and_presets():
    cfg = MARCausalConfig.preset("large", grid=(8, 4), num_classes=0, dropout=0.0)
    d = cfg.to_dict()
    assert MARCausalConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert d["grid"] == [8, 4] and cfg.seq_len == 32 and (cfg.n_layer, cfg.n_embd) == (32, 1024)
    assert MARCausalConfig.from_dict(tiny_config().to_dict()) == tiny_config()
    with pytest.raises(ValueError, match="unknown MARCausalConfig keys"):
        MARCausalConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        MARCausalConfig.preset("giant")
    # MAR-B/L/H: depth = encoder + decoder depth, same width; heads 6x1024, 8x1280, 12x1536
    sizes = {name: (c.n_layer, c.n_embd, c.head_depth, c.head_width)
             for name in ("base", "large", "huge") for c in [MARCausalConfig.preset(name)]}
    assert sizes == {"base": (24, 768, 6, 1024), "large": (32, 1024, 8, 1280), "huge": (40, 1280, 12, 1536)}
    tiny = MARCausalConfig.preset("tiny")
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.head_depth, tiny.head_width) == (4, 4, 128, 3, 128)
    d = MARCausalConfig()
    assert (d.num_sampling_steps, d.diffusion_batch_mul, d.label_drop_prob) == ("100", 4, 0.1)


def test_param_counts_near_mar(monkeypatch):
    """The causal presets have about MAR-B/L/H's 208M / 479M / 943M parameters (MAR's extra
    buffer position rows, mask token and decoder_embed make up the rest). Built on the meta
    device with the init functions stubbed (their first meta call imports torch._dynamo, ~3 s)."""
    for fn in ("normal_", "zeros_", "xavier_uniform_", "ones_"):
        monkeypatch.setattr(torch.nn.init, fn, lambda t, *a, **k: t)
    for name, published in (("base", 208e6), ("large", 479e6), ("huge", 943e6)):
        with torch.device("meta"):
            m = MARCausal(MARCausalConfig.preset(name))
        assert abs(m.num_params() - published) / published < 0.02, (name, m.num_params())


def test_init_follows_gpt_and_mar(model):
    fresh = MARCausal(tiny_config())
    # transformer: GPT-2 init; head: MAR's (zero output layer -> eps = 0)
    assert fresh.z_proj.weight.std().item() == pytest.approx(0.02, rel=0.3)
    out_layer = fresh.diffloss.net.final_layer.linear.weight
    assert torch.equal(out_layer, torch.zeros_like(out_layer))
    out = fresh.head(torch.randn(6, C), torch.randint(0, 1000, (6,)), torch.randn(6, fresh.config.n_embd))
    assert out.shape == (6, 2 * C) and torch.equal(out, torch.zeros_like(out))
    nwd = fresh.no_weight_decay()
    assert {"pos_emb.weight", "class_emb.weight"} <= nwd and all(n.startswith("diffloss.") or "_emb" in n for n in nwd)
    assert "blocks.0.attn.c_attn.weight" not in nwd and any(n.startswith("diffloss.") for n in nwd)


# -- the transformer: causality and the KV cache -----------------------------------------------------


def test_condition_is_causal(model):
    torch.manual_seed(1)
    x, y = torch.randn(2, L, C), torch.tensor([1, 3])
    with torch.no_grad():
        z = model.condition(x, y)
        assert z.shape == (2, L, model.config.n_embd)
        for t in (0, 1, 4, L - 1):
            x2 = x.clone()
            x2[:, t:] = torch.randn(2, L - t, C)
            z2 = model.condition(x2, y)
            # z_s for s <= t has seen tokens < t only ...
            assert_max_abs(z2[:, :t + 1], z[:, :t + 1], 1e-5)
            # ... and z_{t+1} sees token t
            if t + 1 < L:
                assert (z2[:, t + 1] - z[:, t + 1]).abs().max() > 1e-2
        # the class reaches every position; eval mode has no label dropout
        z3 = model.condition(x, torch.tensor([2, 3]))
        assert (z3[0] - z[0]).abs().amax(dim=-1).min() > 1e-3 and torch.equal(z3[1], z[1])
        assert torch.equal(model.condition(x, None), model.condition(x, torch.full((2,), K)))


def test_kv_cache_equals_recompute(model):
    torch.manual_seed(2)
    x, y = torch.randn(3, L, C), torch.tensor([0, 4, 2])
    with torch.no_grad():
        full = model.condition(x, y)
        cache = model.new_cache(3)
        steps = [model.prefill(y, cache)] + [model.decode_step(x[:, t], cache) for t in range(L - 1)]
        assert_max_abs(torch.stack(steps, 1), full, 1e-5)
        for t in (0, 3, L - 1):
            assert_max_abs(model.next_condition(x[:, :t], y), full[:, t], 1e-5)
        with pytest.raises(ValueError, match="cache full"):
            model.decode_step(x[:, -1], cache)
        with pytest.raises(ValueError, match="empty cache"):
            model.prefill(y, cache)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_sampling_equals_recompute(model, cfg_scale):
    y = [0, 1, 4]
    a = mar_causal_sample(model, 3, labels=y, seeds=[5, 6, 7], cfg_scale=cfg_scale, use_cache=True)
    b = mar_causal_sample(model, 3, labels=y, seeds=[5, 6, 7], cfg_scale=cfg_scale, use_cache=False)
    assert a.shape == (3, L, C) and a.dtype == torch.float32
    assert_close_rel(a, b)
    # a cache fed at the wrong position would fail: shifting the tokens changes the samples
    assert rel_diff(a, mar_causal_sample(model, 3, labels=y, seeds=[6, 7, 5], cfg_scale=cfg_scale)) > 0.05


def test_unconditional_model():
    m = randomized(tiny_config(num_classes=0), seed=3)
    assert not hasattr(m, "class_emb") and m.bos.shape == (1, 1, m.config.n_embd)
    x = torch.randn(2, L, C)
    with torch.no_grad():
        assert torch.equal(m.condition(x, None), m.condition(x, torch.tensor([1, 2])))  # labels ignored
        assert m(x, None).ndim == 0
    a = mar_causal_sample(m, 2, seeds=[1, 2])
    assert_close_rel(a, mar_causal_sample(m, 2, seeds=[1, 2], use_cache=False))
    with pytest.raises(ValueError, match="class-conditional"):
        mar_causal_sample(m, 2, labels=[0, 1], cfg_scale=2.0)
    assert mar_causal_sample(m, 0).shape == (0, L, C)


# -- sampling: seeds, batches, guidance --------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_samples_independent_of_batch_size(model, cfg_scale):
    n, seeds, y = 5, [11, 12, 13, 14, 15], [0, 1, 2, 3, 4]
    runs = [mar_causal_sample(model, n, labels=y, seeds=seeds, cfg_scale=cfg_scale, batch_size=bs)
            for bs in (1, 3, n)]
    for r in runs[1:]:
        assert_close_rel(runs[0], r)
    # the samples differ from each other, and a new seed changes its own sample only
    assert min(rel_diff(runs[0][i], runs[0][i + 1]) for i in range(n - 1)) > 0.05
    other = mar_causal_sample(model, n, labels=y, seeds=[99] + seeds[1:], cfg_scale=cfg_scale, batch_size=3)
    assert rel_diff(runs[0][0], other[0]) > 0.05
    assert_close_rel(runs[0][1:], other[1:])
    # the label matters
    relabel = mar_causal_sample(model, 1, labels=[3], seeds=seeds[:1], cfg_scale=cfg_scale)
    assert rel_diff(runs[0][:1], relabel) > 0.05


def test_cfg_scale_one_is_the_unguided_path():
    """With the null row equal to the class row, cond == uncond, so guided eps equals the
    conditional eps at any scale: the doubled batch, its shared noise and the first-half pick
    must reproduce the unguided samples. With distinct rows guidance changes them."""
    m = randomized(tiny_config(), seed=4)
    y, seeds = [2, 2, 2], [1, 2, 3]
    plain = mar_causal_sample(m, 3, labels=y, seeds=seeds, cfg_scale=1.0)
    guided = mar_causal_sample(m, 3, labels=y, seeds=seeds, cfg_scale=4.0, cfg_schedule="constant")
    assert rel_diff(plain, guided) > 0.05
    with torch.no_grad():
        m.class_emb.weight[K] = m.class_emb.weight[2]
    plain = mar_causal_sample(m, 3, labels=y, seeds=seeds, cfg_scale=1.0)
    for schedule in ("constant", "linear"):
        assert_close_rel(plain, mar_causal_sample(m, 3, labels=y, seeds=seeds, cfg_scale=4.0, cfg_schedule=schedule))


def test_guided_sampling_matches_a_reference_loop(model):
    """One sample written out by hand: recompute z for [label; null], guided diffusion with that
    step's scale, keep the conditional half, the sample's generator used for every token."""
    seed, label, scale = 21, 3, 3.0
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 0, C)
    with torch.no_grad():
        for t in range(L):
            z = torch.cat([model.next_condition(x, torch.tensor([label])), model.next_condition(x, None)])
            s = cfg_scale_at(scale, "linear", t + 1, L)
            tok = model.diffloss.sample(z, 1.0, [g], cfg=s)[:1]
            x = torch.cat([x, tok[:, None]], dim=1)
    for use_cache in (True, False):
        got = mar_causal_sample(model, 1, labels=[label], seeds=[seed], cfg_scale=scale, use_cache=use_cache)
        assert_close_rel(x, got)


def test_cfg_scale_per_step(model, monkeypatch):
    seen = []
    original = model.diffloss.sample

    def spy(z, temperature=1.0, generator=None, cfg=1.0):
        seen.append((cfg, z.shape[0]))
        return original(z, temperature, generator, cfg)

    monkeypatch.setattr(model.diffloss, "sample", spy)
    for schedule in ("linear", "constant"):
        seen.clear()
        mar_causal_sample(model, 2, labels=[0, 1], cfg_scale=3.0, cfg_schedule=schedule)
        expected = [cfg_scale_at(3.0, schedule, t + 1, L) for t in range(L)]   # t + 1 known after step t
        assert [s for s, _ in seen] == pytest.approx(expected)
        assert all(rows == (2 if s == 1.0 else 4) for s, rows in seen)   # doubled batch when guided
        scales = [s for s, _ in seen]
        if schedule == "linear":   # MAR's ramp: 1 + (3 - 1) (t + 1) / L, up to cfg_scale at the last token
            assert scales == pytest.approx([1 + 2 * (t + 1) / L for t in range(L)])
        else:
            assert scales == [3.0] * L
    seen.clear()
    mar_causal_sample(model, 2, labels=[0, 1])
    assert seen == [(1.0, 2)] * L
    assert cfg_scale_at(3.0, "linear", L, L) == pytest.approx(3.0) and cfg_scale_at(3.0, "constant", 0, L) == 3.0
    with pytest.raises(ValueError):
        mar_causal_sample(model, 2, labels=[0, 1], cfg_scale=3.0, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="needs labels"):
        mar_causal_sample(model, 2, cfg_scale=3.0)


# -- training ----------------------------------------------------------------------------------------


def test_label_dropout_rate():
    m = MARCausal(tiny_config(n_embd=32, n_head=2, head_width=32, head_depth=1))
    seen = []
    m.class_emb.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    x = torch.randn(500, L, C)
    y = torch.randint(0, K, (500,))
    torch.manual_seed(5)
    m.train()
    with torch.no_grad():
        for _ in range(10):
            m(x, y)
    labels = torch.cat(seen)
    assert labels.numel() == 5000
    dropped = labels == K
    # Binomial(5000, 0.1): sd 21 -> 5 sd = +-0.021
    assert abs(dropped.float().mean().item() - 0.1) < 0.021
    kept = ~dropped
    assert torch.equal(labels[kept], y.repeat(10)[kept])
    seen.clear()
    m.eval()
    with torch.no_grad():
        m(x[:50], y[:50])
    assert torch.equal(seen[0], y[:50])     # eval: no label dropout


def test_training_lowers_loss():
    torch.manual_seed(6)
    m = MARCausal(tiny_config(n_embd=64, head_width=64, head_depth=2, dropout=0.1))
    x, y = torch.randn(4, L, C), torch.tensor([0, 1, 2, 3])
    before_params = {k: v.clone() for k, v in m.state_dict().items()}

    def fixed_loss():   # same timesteps and noise each time, no dropout
        m.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            out = m(x, y).item()
        m.train()
        return out

    start = fixed_loss()
    # plain Adam by hand (building a torch.optim optimizer first imports torch._dynamo, ~3 s)
    params = [p for p in m.parameters() if p.requires_grad]
    mom = [torch.zeros_like(p) for p in params]
    var = [torch.zeros_like(p) for p in params]
    m.train()
    for step in range(1, 26):
        loss = m(x, y)
        assert loss.ndim == 0 and torch.isfinite(loss)
        m.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p, mo, va in zip(params, mom, var):
                if p.grad is None:
                    continue
                mo.lerp_(p.grad, 0.1)
                va.lerp_(p.grad ** 2, 0.001)
                p -= 3e-3 * (mo / (1 - 0.9 ** step)) / ((va / (1 - 0.999 ** step)).sqrt() + 1e-8)
    end = fixed_loss()
    assert end < 0.8 * start, (start, end)
    # the transformer learns too (the head's zero output layer blocks its gradient only at step 0)
    after = m.state_dict()
    for k in ("z_proj.weight", "blocks.0.attn.c_attn.weight", "class_emb.weight", "diffloss.net.cond_embed.weight"):
        assert not torch.equal(before_params[k], after[k]), k
