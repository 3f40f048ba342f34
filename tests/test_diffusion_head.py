"""MAR's diffusion-loss head (pipeline.models.diffusion_head): schedule, init, q_sample, training, sampling."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.diffusion_head import (
    DIFFLOSS_PRESETS,
    DiffusionLoss,
    GaussianDiffusion,
    SimpleMLPAdaLN,
    cosine_betas,
    space_timesteps,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These heads are tiny: one thread is faster than two fighting other work for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cosine_betas_closed_form():
    betas = cosine_betas(1000)
    assert betas.shape == (1000,)
    ab = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([min(1 - ab((i + 1) / 1000) / ab(i / 1000), 0.999) for i in range(1000)],
                            dtype=torch.float64)
    torch.testing.assert_close(betas, expected, rtol=0, atol=1e-12)
    assert (betas[1:] > betas[:-1]).all()
    assert betas[-1] == pytest.approx(0.999)   # the clip is active at the end
    assert betas[0] < 1e-4


def test_respacing_keeps_alpha_bar():
    kept = space_timesteps(1000, "100")
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    gaps = torch.diff(torch.tensor(kept))
    assert set(gaps.tolist()) <= {10, 11}
    base = cosine_betas(1000)
    full = GaussianDiffusion(base)
    spaced = GaussianDiffusion.respaced(base, kept)
    assert spaced.num_timesteps == 100
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-10, atol=1e-14)
    assert spaced.timestep_map.tolist() == kept
    assert (spaced.betas[1:] > base[kept][1:]).all()   # bigger jumps than the 1-step betas
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(1000, 50)[:3] == [0, 20, 41]


def test_fresh_head_outputs_zero_and_half_way_variance():
    torch.manual_seed(0)
    net = SimpleMLPAdaLN(in_channels=3, model_channels=32, out_channels=6, z_channels=5, num_res_blocks=2)
    x, t, c = torch.randn(7, 3), torch.randint(0, 1000, (7,)), torch.randn(7, 5)
    out = net(x, t, c)
    assert out.shape == (7, 6)
    assert torch.equal(out, torch.zeros_like(out))
    # ... but it is not a dead network: the timestep MLP and input path are not zero
    assert net.time_embed.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert net.input_proj.weight.abs().sum() > 0
    # v = 0 -> log variance half-way between log posterior variance and log beta
    diff = GaussianDiffusion(cosine_betas(1000))
    tt = torch.tensor([5, 500, 999])
    xt = torch.randn(3, 3, dtype=torch.float64)
    mean, log_var, pred_x0 = diff.model_mean_variance(torch.zeros(3, 6, dtype=torch.float64), xt, tt)
    expected = 0.5 * (torch.log(diff.betas[tt]) + diff.posterior_log_variance_clipped[tt])
    torch.testing.assert_close(log_var[:, 0], expected)
    torch.testing.assert_close(pred_x0, xt / diff.alphas_cumprod[tt].sqrt()[:, None])


def test_q_sample_statistics():
    diff = GaussianDiffusion(cosine_betas(1000))
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([[1.5, -0.7]])
    n = 40000
    for step in (10, 400, 900):
        t = torch.full((n,), step)
        xt = diff.q_sample(x0.expand(n, 2), t, torch.randn(n, 2, generator=g))
        ab = diff.alphas_cumprod[step].item()
        torch.testing.assert_close(xt.mean(0), math.sqrt(ab) * x0[0], atol=4 * math.sqrt((1 - ab) / n) + 1e-6, rtol=0)
        torch.testing.assert_close(xt.var(0), torch.full((2,), 1 - ab), rtol=0.05, atol=1e-5)


def test_training_losses_terms():
    torch.manual_seed(0)
    diff = GaussianDiffusion(cosine_betas(1000))
    net = SimpleMLPAdaLN(2, 16, 4, 3, 1)
    x0, c = torch.rand(6, 2) * 2 - 1, torch.randn(6, 3)
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    noise = torch.randn(6, 2)
    terms = diff.training_losses(net, x0, t, noise=noise, c=c)
    # fresh head: eps = 0 so mse = mean(noise^2)
    torch.testing.assert_close(terms["mse"], (noise ** 2).mean(1))
    assert (terms["vb"][1:] >= 0).all() and terms["vb"][0] > 0   # KL >= 0; decoder NLL in bits
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # the vb term must not train the eps half of the output
    out = net(x0, t, c).detach().requires_grad_(True)
    model = lambda x, tt, c: out  # noqa: E731
    diff.training_losses(model, x0, t, noise=noise, c=c)["vb"].sum().backward()
    assert torch.equal(out.grad[:, :2], torch.zeros(6, 2)) and out.grad[:, 2:].abs().sum() > 0


def test_presets_and_batch_mul():
    assert DIFFLOSS_PRESETS == {"B": (1024, 6), "L": (1280, 8), "H": (1536, 12)}
    dl = DiffusionLoss(target_channels=4, z_channels=8, depth=2, width=16, num_sampling_steps="10")
    assert dl.net.out_channels == 8 and dl.gen_diffusion.num_timesteps == 10
    seen = []
    orig = dl.net.forward
    dl.net.forward = lambda x, t, c: (seen.append((x.shape[0], t.clone())), orig(x, t, c))[1]
    dl.loss(torch.randn(5, 4), torch.randn(5, 8))
    assert seen[0][0] == 20 and dl.diffusion_batch_mul == 4
    # masked loss
    loss = dl.loss(torch.randn(2, 3, 4), torch.randn(2, 3, 8), mask=torch.tensor([[1, 0, 1], [0, 0, 1]]))
    assert torch.isfinite(loss)


MEANS = torch.tensor([[0.5, -0.3], [-0.4, 0.4]])
STDS = torch.tensor([[0.10, 0.20], [0.25, 0.08]])


def _toy_batch(n, g):
    """Condition z one-hot of 2 classes; target 2-D Gaussian whose mean/std depend on the class."""
    cls = torch.randint(0, 2, (n,), generator=g)
    z = torch.nn.functional.one_hot(cls, 2).float()
    return z, MEANS[cls] + STDS[cls] * torch.randn(n, 2, generator=g)


def _oracle_head(train_diffusion, v=0.0):
    """The exact eps (Bayes-optimal for the Gaussian toy) at original step t, with a constant v."""
    def forward(x, t, c):
        k = c.argmax(1)
        m, s = MEANS[k].to(x.dtype), STDS[k].to(x.dtype)
        ab = train_diffusion.alphas_cumprod[t].to(x.dtype)[:, None]
        e_x0 = m + ab.sqrt() * s ** 2 / (ab * s ** 2 + 1 - ab) * (x - ab.sqrt() * m)
        eps = (x - ab.sqrt() * e_x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.full_like(eps, v)], 1)
    return forward


def test_training_lowers_loss_and_learns_eps():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dl = DiffusionLoss(target_channels=2, z_channels=2, depth=2, width=64, num_sampling_steps="50")
    opt = torch.optim.Adam(dl.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        z, x = _toy_batch(256, g)
        loss = dl.loss(x, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-30:]) / 30
    assert last < 0.5 * first, (first, last)
    # the trained eps is close to the exact one, and its x0 estimate recovers the class means
    oracle = _oracle_head(dl.train_diffusion)
    with torch.no_grad():
        for step in (100, 300, 600):
            z, x = _toy_batch(2000, g)
            t = torch.full((2000,), step)
            xt = dl.train_diffusion.q_sample(x, t, torch.randn(2000, 2, generator=g))
            eps = dl.net(xt, t, z)[:, :2]
            exact = oracle(xt, t, z)[:, :2]
            assert ((eps - exact) ** 2).mean().sqrt() < 0.15, step
            ab = dl.train_diffusion.alphas_cumprod[step].item()
            x0_hat = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            for k in range(2):
                sel = z[:, k] == 1
                torch.testing.assert_close(x0_hat[sel].mean(0), MEANS[k], atol=0.06 if step < 600 else 0.12, rtol=0)


@pytest.fixture()
def oracle_loss():
    """A DiffusionLoss whose head is the exact eps (v = 0): tests the sampler apart from training.

    (A tiny head trained for seconds is not enough to sample from: with the clipped cosine schedule
    alpha_bar(999) ~ 2e-9, so the first respaced step multiplies the eps error by ~300, as in MAR
    where clip_denoised=False.)"""
    dl = DiffusionLoss(target_channels=2, z_channels=2, depth=1, width=8, num_sampling_steps="50")
    dl.net.forward = _oracle_head(dl.train_diffusion)
    return dl


def _cond(k, n=4000):
    z = torch.zeros(n, 2)
    z[:, k] = 1
    return z


def test_sampling_matches_target(oracle_loss):
    g = torch.Generator().manual_seed(5)
    for k in range(2):
        s = oracle_loss.sample(_cond(k), temperature=1.0, generator=g)
        torch.testing.assert_close(s.mean(0), MEANS[k], atol=0.02, rtol=0)
        torch.testing.assert_close(s.std(0), STDS[k], rtol=0.15, atol=0)


def test_temperature_and_reproducibility(oracle_loss):
    z = _cond(1)
    a = oracle_loss.sample(z, temperature=0.0, generator=torch.Generator().manual_seed(1))
    # temperature 0: the start noise is the only randomness, and the mean path forgets it
    assert a.std(0).max() < 1e-3
    torch.testing.assert_close(a.mean(0), MEANS[1], atol=1e-3, rtol=0)
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(9))
    diff, fwd = oracle_loss.gen_diffusion, oracle_loss.net.forward
    p = diff.p_sample_loop(fwd, noise, temperature=0.0, generator=torch.Generator().manual_seed(1), c=z[:50])
    q = diff.p_sample_loop(fwd, noise, temperature=0.0, generator=torch.Generator().manual_seed(2), c=z[:50])
    assert torch.equal(p, q)
    s1 = oracle_loss.sample(z, temperature=1.0, generator=torch.Generator().manual_seed(3))
    s1b = oracle_loss.sample(z, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s1b)
    s2 = oracle_loss.sample(z, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(s1, s2)
    s_half = oracle_loss.sample(z, temperature=0.5, generator=torch.Generator().manual_seed(3))
    ratio = s_half.std(0) / s1.std(0)
    assert ((ratio > 0.4) & (ratio < 0.6)).all(), ratio


def test_cfg_scale_one_half_matches_conditional():
    torch.manual_seed(0)
    dl = DiffusionLoss(2, 3, depth=1, width=16, num_sampling_steps="5")
    for p in dl.net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    zc, zu = torch.randn(4, 3), torch.randn(4, 3)
    x = torch.randn(8, 2)
    t = torch.full((8,), 3)
    out = dl.net.forward_with_cfg(x, t, torch.cat([zc, zu]), cfg_scale=1.0)
    torch.testing.assert_close(out[:4, :2], dl.net(x[:4], t[:4], zc)[:, :2])
    torch.testing.assert_close(out[4:, :2], out[:4, :2])
    s = dl.sample(torch.cat([zc, zu]), temperature=1.0, generator=torch.Generator().manual_seed(0), cfg=3.0)
    assert s.shape == (8, 2) and torch.isfinite(s).all()


def test_per_row_generators_make_rows_independent_of_their_batch():
    """Row noise from one generator per sample: a sample's draws are the same alone or in a batch,
    with and without guidance (where only the conditional half draws)."""
    torch.manual_seed(0)
    loss = DiffusionLoss(target_channels=3, z_channels=5, depth=2, width=16, num_sampling_steps="5")
    for p in loss.net.parameters():   # a non-trivial head (the fresh one outputs zeros)
        torch.nn.init.normal_(p, std=0.05)
    z = torch.randn(4, 5)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    for cfg in (1.0, 2.5):
        zz = torch.cat([z, z.flip(0)]) if cfg != 1.0 else z
        def rows(seeds):   # two tokens of each sample
            return [g for g in gens(seeds) for _ in range(2)]

        together = loss.sample(zz, generator=rows([7, 8]), cfg=cfg)
        alone = loss.sample(torch.cat([zz[:2], zz[4:6]]) if cfg != 1.0 else zz[:2], generator=rows([7]), cfg=cfg)
        assert torch.equal(together[:2], alone[:2])
        other = loss.sample(zz, generator=rows([9, 8]), cfg=cfg)
        assert not torch.equal(other[:2], together[:2]) and torch.equal(other[2:4], together[2:4])


def test_clip_x0_bounds_the_draws_of_an_untrained_head():
    """A fresh head predicts eps = 0, so x0 = x_t / sqrt(alpha_bar) explodes at t = 999 (MAR does
    not clamp); with clip_x0 every step's x0 is clamped, and the final draw (the last step's
    posterior mean of a clamped x0) stays within the clamp."""
    loss = DiffusionLoss(target_channels=3, z_channels=5, depth=2, width=16, num_sampling_steps="10")
    z = torch.randn(64, 5)
    free = loss.sample(z, generator=torch.Generator().manual_seed(0))
    loss.clip_x0 = 2.0
    clamped = loss.sample(z, generator=torch.Generator().manual_seed(0))
    assert free.abs().max() > 100
    assert clamped.abs().max() <= 2.0 + 1e-4
