"""MAR's masked generator (pipeline.models.mar): distributions, schedules, model, sampling, loading."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from pipeline.models.mar import (
    MAR,
    MARConfig,
    cfg_scale_at,
    infer_mar_config,
    latents_to_tokens,
    load_mar,
    mar_sample,
    mask_by_order,
    masked_after_steps,
    num_masked_tokens,
    random_orders,
    sample_mask_ratios,
    tokens_to_latents,
    tokens_per_step,
)

@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two fighting other work for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = dict(grid=(3, 3), token_dim=4, num_classes=5, encoder_width=32, encoder_depth=2, encoder_heads=2,
             decoder_width=16, decoder_depth=1, decoder_heads=1, head_width=24, head_depth=2, buffer_size=2,
             num_sampling_steps="8")


def _randomised(model: MAR, seed: int = 0, std: float = 0.1) -> MAR:
    """Perturb every weight (a fresh head outputs zeros and would hide the condition)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _small(seed: int = 0, **overrides) -> MAR:
    torch.manual_seed(seed)
    return _randomised(MAR(MARConfig(**{**SMALL, **overrides})), seed).eval()


# --------------------------------------------------------------------------------------------
# config


def test_config_round_trip_and_validation():
    cfg = MARConfig.preset("tiny", grid=(7, 7), token_dim=16, num_classes=10)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["grid"] == [7, 7] and MARConfig.from_dict(d) == cfg
    assert MARConfig(**d) == cfg                      # lists are turned back into tuples
    with pytest.raises(ValueError, match="unknown MARConfig keys: colour"):
        MARConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="encoder_width 100 is not a multiple of encoder_heads 3"):
        MARConfig(encoder_width=100, encoder_heads=3)
    with pytest.raises(ValueError, match="unknown MAR preset 'giant'"):
        MARConfig.preset("giant")


@pytest.mark.parametrize("name, heads, head, millions", [
    ("base", 12, (1024, 6), 208), ("large", 16, (1280, 8), 479), ("huge", 16, (1536, 12), 943)])
def test_presets_match_mar(name, heads, head, millions):
    cfg = MARConfig.preset(name)
    assert (cfg.encoder_heads, cfg.decoder_heads, cfg.buffer_size) == (heads, heads, 64)
    assert (cfg.head_width, cfg.head_depth) == head
    with torch.device("meta"):
        model = MAR(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - millions) < 1.5, n           # the published sizes (README.md)
    # the sizes, heads included, come back from the shapes alone
    assert infer_mar_config(model.state_dict()) == cfg


# --------------------------------------------------------------------------------------------
# masks and schedules


def _truncnorm_cdf(r: float, lo: float, mean=1.0, std=0.25, hi=1.0) -> float:
    phi = lambda v: 0.5 * (1 + math.erf((v - mean) / std / math.sqrt(2)))  # noqa: E731
    return (phi(min(max(r, lo), hi)) - phi(lo)) / (phi(hi) - phi(lo))


@pytest.mark.parametrize("min_ratio", [0.7, 0.5])
def test_mask_ratio_distribution(min_ratio):
    n = 20000
    r = sample_mask_ratios(n, min_ratio, generator=torch.Generator().manual_seed(0))
    assert r.dtype == torch.float64 and r.shape == (n,)
    assert r.min() >= min_ratio and r.max() <= 1.0
    xs = torch.sort(r).values
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    expected = torch.tensor([_truncnorm_cdf(v, min_ratio) for v in xs.tolist()], dtype=torch.float64)
    ks = (empirical - expected).abs().max().item()
    assert ks < 0.015, ks                              # 1.36 / sqrt(n) ~ 0.0096 at the 5% level
    # the statistic tells a different distribution apart: a uniform on the same interval
    uniform = (xs - min_ratio) / (1 - min_ratio)
    assert (empirical - uniform).abs().max().item() > 0.05
    # the global RNG is used when no generator is given
    torch.manual_seed(3)
    a = sample_mask_ratios(4, min_ratio)
    torch.manual_seed(3)
    assert torch.equal(a, sample_mask_ratios(4, min_ratio))


def test_orders_and_masks():
    orders = random_orders(6, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(10).expand(6, 10))
    assert len({tuple(o) for o in orders.tolist()}) == 6
    mask = mask_by_order(orders, 4)
    assert mask.dtype == torch.bool and (mask.sum(1) == 4).all()
    for o, m in zip(orders, mask):
        assert set(o[:4].tolist()) == set(m.nonzero().flatten().tolist())
    assert num_masked_tokens(256, 0.7) == 180 and num_masked_tokens(10, 0.71) == 8 and num_masked_tokens(5, 1.0) == 5


def test_sampling_schedule():
    # by hand: floor(16 cos(pi/8)) = 14, floor(16 cos(pi/4)) = 11, floor(16 cos(3 pi/8)) = 6, then all
    assert masked_after_steps(16, 4) == [14, 11, 6, 1]
    assert tokens_per_step(16, 4) == [2, 3, 5, 6]
    # early steps clamp to "at least one token": floor(256 cos(pi/128)) = 255, then 254 ...
    assert tokens_per_step(256, 64)[:3] == [1, 1, 1]
    for L in (1, 2, 5, 9, 49, 256):
        for num_iter in (1, 2, 3, 8, 64, 256, 300):
            counts = tokens_per_step(L, num_iter)
            assert sum(counts) == L and min(counts) >= 1, (L, num_iter)
            assert len(counts) == min(L, num_iter), (L, num_iter)
    assert tokens_per_step(4, 10) == [1, 1, 1, 1]      # more steps than tokens: the empty ones are skipped
    assert tokens_per_step(49, 1) == [49]
    with pytest.raises(ValueError):
        tokens_per_step(4, 0)


def test_cfg_ramp():
    assert cfg_scale_at(3.0, "linear", 0, 256) == 1.0
    assert cfg_scale_at(3.0, "linear", 128, 256) == 2.0
    assert cfg_scale_at(3.0, "linear", 256, 256) == 3.0
    assert cfg_scale_at(2.9, "linear", 255, 256) == pytest.approx(1 + 1.9 * 255 / 256)
    assert cfg_scale_at(3.0, "constant", 0, 256) == 3.0 == cfg_scale_at(3.0, "constant", 200, 256)
    with pytest.raises(ValueError, match="unknown cfg schedule 'cosine'"):
        cfg_scale_at(3.0, "cosine", 1, 2)


def test_latent_token_layout():
    lat = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)   # (n, C, h, w)
    tok = latents_to_tokens(lat)
    assert tok.shape == (2, 8, 3)
    assert torch.equal(tok[1, 1 * 4 + 2], lat[1, :, 1, 2])                      # raster order
    assert torch.equal(tokens_to_latents(tok, (2, 4)), lat)


# --------------------------------------------------------------------------------------------
# the model


def test_condition_sees_only_the_kept_tokens():
    model = _small()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 4])
    mask = mask_by_order(random_orders(4, 9, generator=g), 5)
    with torch.no_grad():
        z = model.condition(x, mask, labels)
        assert z.shape == (4, 9, 16)
        changed = torch.where(mask[..., None], torch.randn(4, 9, 4, generator=g), x)
        torch.testing.assert_close(model.condition(changed, mask, labels), z, rtol=0, atol=1e-6)
        # ... but a kept token, and the label, do matter
        kept = x.clone()
        kept[~mask] += 1.0
        assert (model.condition(kept, mask, labels) - z).abs().max() > 1e-3
        assert (model.condition(x, mask, labels.flip(0)) - z).abs().max() > 1e-3
        assert (model.condition(x, mask, None) - z).abs().max() > 1e-3
        # rows are independent of their batch
        torch.testing.assert_close(model.condition(x[2:3], mask[2:3], labels[2:3]), z[2:3], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="same number of tokens"):
        bad = mask.clone()
        bad[0] = True
        model.condition(x, bad, labels)
    assert model.head(torch.randn(7, 4), torch.randint(0, 1000, (7,)), torch.randn(7, 16)).shape == (7, 8)


def test_forward_loss_and_training_lowers_it():
    cfg = dict(grid=(3, 3), token_dim=4, num_classes=3, encoder_width=32, encoder_depth=1, encoder_heads=2,
               decoder_width=32, decoder_depth=1, decoder_heads=2, head_width=48, head_depth=2, buffer_size=2,
               attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0)
    torch.manual_seed(0)
    model = MAR(MARConfig(**cfg))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 9, 4, generator=g) * 0.5 + torch.linspace(-1, 1, 9)[None, :, None]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def mean_loss():
        total = 0.0
        with torch.no_grad():
            for s in range(6):
                torch.manual_seed(100 + s)
                total += model(x, labels).item()
        return total / 6

    model.train()
    before = mean_loss()
    assert math.isfinite(before)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        torch.manual_seed(step)
        loss = model(x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_loss()
    assert after < 0.8 * before, (before, after)
    # the same global seed gives the same loss (all randomness from the global RNG)
    torch.manual_seed(5)
    a = model(x, labels)
    torch.manual_seed(5)
    assert a.item() == model(x, labels).item()


def test_label_drop_only_in_training():
    model = _small(label_drop_prob=1.0)
    x, mask = torch.randn(2, 9, 4), mask_by_order(random_orders(2, 9), 4)
    with torch.no_grad():
        null = model.condition(x, mask, None)
        assert (model.condition(x, mask, torch.tensor([1, 2])) - null).abs().max() > 1e-3
        model.train()
        for m in model.modules():   # dropout off: compare the condition only
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        torch.testing.assert_close(model.condition(x, mask, torch.tensor([1, 2])), null)


# --------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_samples_are_seeded_per_sample(cfg_scale):
    # float64: an untrained head turns noise into huge values (x0 = x_t / sqrt(alpha_bar) at the first
    # step, MAR's clip_denoised=False), which would blow float32 batch-size rounding up to ~1e-5
    model = _small().double()
    labels = torch.tensor([0, 3, 1, 4, 2])
    kw = dict(labels=labels, num_iter=3, cfg_scale=cfg_scale, seeds=[10, 11, 12, 13, 14])
    close = dict(rtol=1e-10, atol=1e-8)
    full = mar_sample(model, 5, batch_size=5, **kw)
    assert full.shape == (5, 9, 4) and full.dtype == torch.float64 and torch.isfinite(full).all()
    for bs in (1, 3):
        torch.testing.assert_close(mar_sample(model, 5, batch_size=bs, **kw), full, **close)
    alone = mar_sample(model, 1, labels=labels[3:4], num_iter=3, cfg_scale=cfg_scale, seeds=[13])
    torch.testing.assert_close(alone, full[3:4], **close)
    other = mar_sample(model, 5, batch_size=5, **{**kw, "seeds": [10, 11, 99, 13, 14]})
    rel = ((other[2] - full[2]).abs() / full[2].abs().clamp(min=1.0))
    assert rel.min() > 1e-3                                # every token of sample 2 differs ...
    torch.testing.assert_close(other[[0, 1, 3, 4]], full[[0, 1, 3, 4]], **close)   # ... the rest do not
    assert model.training is False


def test_sampling_settings_matter():
    model = _small()
    base = dict(labels=[1, 1, 1], seeds=[0, 1, 2], num_iter=3)
    a = mar_sample(model, 3, **base)
    assert (mar_sample(model, 3, **{**base, "labels": [2, 2, 2]}) - a).abs().max() > 1e-3
    assert (mar_sample(model, 3, **base, cfg_scale=3.0) - a).abs().max() > 1e-3
    assert (mar_sample(model, 3, **base, temperature=0.5) - a).abs().max() > 1e-3
    torch.testing.assert_close(mar_sample(model, 3, **{**base, "labels": 1}), a)    # one label for all
    assert mar_sample(model, 0).shape == (0, 9, 4)
    assert mar_sample(model, 2, num_iter=20, seeds=[4, 5]).shape == (2, 9, 4)      # more steps than tokens
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        mar_sample(model, 3, labels=[1, 2])
    with pytest.raises(ValueError, match="unknown cfg schedule"):
        mar_sample(model, 1, cfg_schedule="cosine")


def test_unconditional_model():
    model = _small(num_classes=0)
    assert model.class_emb.weight.shape == (0, 32)
    s = mar_sample(model, 2, num_iter=2)
    assert s.shape == (2, 9, 4)
    with pytest.raises(ValueError, match="takes no labels"):
        mar_sample(model, 2, labels=[0, 0])
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        mar_sample(model, 2, cfg_scale=2.0)
    model.train()
    assert torch.isfinite(model(torch.randn(3, 9, 4), None))


# --------------------------------------------------------------------------------------------
# loading


def _same_outputs(a: MAR, b: MAR) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 9, 4, generator=g)
    mask = mask_by_order(random_orders(3, 9, generator=g), 6)
    labels = torch.tensor([0, 2, 4])
    with torch.no_grad():
        za, zb = a.condition(x, mask, labels), b.condition(x, mask, labels)
        assert torch.equal(za, zb)
        xt, t = torch.randn(27, 4, generator=g), torch.randint(0, 1000, (27,), generator=g)
        assert torch.equal(a.head(xt, t, za.reshape(27, -1)), b.head(xt, t, zb.reshape(27, -1)))


def test_official_checkpoint_loads_ema_by_default(tmp_path):
    model, ema = _small(seed=0), _small(seed=1)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 799,
                "args": argparse.Namespace(model="mar_tiny", diffloss_d=2)}, path)
    loaded = load_mar(path, encoder_heads=2, decoder_heads=1, num_sampling_steps="8")
    expected = MARConfig(**SMALL)
    assert loaded.config == expected and not loaded.training
    _same_outputs(loaded, ema)
    _same_outputs(load_mar(path, ema=False, encoder_heads=2, decoder_heads=1), model)
    # without the head counts they come from width // 64 (at least 1): the shapes are the same
    inferred = load_mar(path).config
    assert (inferred.encoder_heads, inferred.decoder_heads) == (1, 1)
    fixed = {**inferred.to_dict(), "encoder_heads": 2, "decoder_heads": 1, "num_sampling_steps": "8"}
    assert fixed == expected.to_dict()


def test_official_checkpoint_with_wrong_keys_fails(tmp_path):
    sd = _small().state_dict()
    sd["decoder_norm.gamma"] = sd.pop("decoder_norm.weight")
    sd["mask_token"] = torch.zeros(1, 1, 17)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": sd, "model_ema": sd}, path)
    with pytest.raises(ValueError) as e:
        load_mar(path)
    assert str(e.value) == (
        f"{path}: 'model_ema' does not match MAR (grid=3x3, token_dim=4, classes=5, encoder=32x2, decoder=16x1, "
        "head=24x2, buffer=2): missing keys: decoder_norm.weight | unexpected keys: decoder_norm.gamma | "
        "wrong shapes: mask_token (1, 1, 17) (expected (1, 1, 16))")
    del sd["z_proj.weight"]
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"'model': not a MAR state dict: missing keys: z_proj.weight"):
        load_mar(path)
    torch.save({"weights": sd}, path)
    with pytest.raises(ValueError, match="neither a MAR checkpoint nor ours"):
        load_mar(path)


def test_trainer_checkpoint_loads(tmp_path):
    model, ema = _small(seed=0), _small(seed=1)
    ck = {"format": "digit-stage1-v1", "family": "mar", "model_config": model.config.to_dict(),
          "model": model.state_dict(), "ema": ema.state_dict(), "step": 10}
    path = tmp_path / "last.pt"
    torch.save(ck, path)
    loaded = load_mar(path)
    assert loaded.config == model.config
    _same_outputs(loaded, ema)
    _same_outputs(load_mar(path, ema=False), model)
    torch.save({**ck, "ema": None}, path)
    _same_outputs(load_mar(path), model)                  # no EMA saved: the model's weights
    torch.save({**ck, "family": "gpt"}, path)
    with pytest.raises(ValueError, match="a 'gpt' checkpoint, not a MAR one"):
        load_mar(path)


# --------------------------------------------------------------------------------------------
# fidelity to LTH14/mar (golden values)

# Computed once by LTH14/mar's own code (models/mar.py forward_mae_encoder + forward_mae_decoder and
# diffloss.net; commit fe470ac, timm Block, norm eps 1e-6) for SMALL's sizes with `_formula_weights`
# and the inputs of the test below: per-position sums z.sum(-1), weighted sums (z * arange(16)).sum(-1),
# and the head's output.
Z_SUM = [-2.643977, -2.021656, -1.608096, -1.778013, -2.518411, -2.279348, -1.964473, -1.574917, -2.062041,
         -2.347152, -2.211769, -1.686983, -1.777781, -2.21488, -2.280285, -1.964112, -1.575861, -2.061679]
Z_WSUM = [-25.782843, -22.294193, -14.859008, -13.37956, -22.129602, -24.148575, -20.532354, -12.734755,
          -16.28953, -23.287947, -23.730541, -15.418597, -13.374866, -19.288889, -24.154917, -20.528152,
          -12.742465, -16.283207]
HEAD = [[0.641181, -1.907745, 0.797426, 0.689236, -1.853405, 0.858292, 1.238624, -1.570143],
        [-0.188052, -1.074002, 0.858485, -0.200763, -1.094456, 1.049028, 0.303939, -0.899701],
        [1.202757, -1.474771, -0.163073, 1.141225, -1.309348, -0.094967, 1.57286, -0.924835],
        [0.428532, -1.787914, 0.899668, 0.475204, -1.758446, 0.984833, 1.027076, -1.501773],
        [0.004979, -1.248858, 0.826559, 0.003508, -1.250736, 0.988747, 0.51576, -1.034582],
        [1.284526, -2.097554, 0.328963, 1.310667, -1.957502, 0.332771, 1.826914, -1.586647]]


def _formula_weights(model) -> None:
    """Every tensor from a formula over the sorted key names (the same for MAR's code and ours)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.state_dict().items())):
            p.copy_((0.2 * torch.sin(0.7 * torch.arange(p.numel(), dtype=torch.float64) + i)).reshape(p.shape))


def test_matches_lth14_mar_golden_values():
    model = MAR(MARConfig(**SMALL)).eval()
    _formula_weights(model)
    x = torch.cos(0.5 * torch.arange(2 * 9 * 4, dtype=torch.float64)).reshape(2, 9, 4).float()
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        z = model.condition(x, mask, torch.tensor([3, 1]))
        close = dict(rtol=0, atol=2e-5)
        torch.testing.assert_close(z.sum(-1).flatten(), torch.tensor(Z_SUM), **close)
        torch.testing.assert_close((z * torch.arange(16.0)).sum(-1).flatten(), torch.tensor(Z_WSUM), rtol=0, atol=2e-4)
        xt = torch.sin(torch.arange(6 * 4, dtype=torch.float32)).reshape(6, 4)
        out = model.head(xt, torch.tensor([0, 1, 17, 250, 640, 999]), z[0, :6])
        torch.testing.assert_close(out, torch.tensor(HEAD), **close)
