"""Uncertainty maths for small-N evaluation: KID (pipeline.metrics.kid), FID against a fixed
reference with the N x N trace route, its bootstrap / half-sample intervals and ``separable``
(pipeline.metrics.fid). Pure maths on small random arrays."""
import numpy as np
import pytest
import scipy.linalg

from pipeline.metrics import fid as M
from pipeline.metrics import kid as K


# ---------------------------------------------------------------- KID

def _k(a, b):
    return (float(a @ b) / len(a) + 1.0) ** 3


def _mmd2_direct(x, y):
    """Unbiased MMD^2, cubic polynomial kernel, written out as the O(m^2) double sums."""
    m = len(x)
    xx = sum(_k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(_k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(_k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_one_full_subset_is_the_direct_mmd():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(20, 5)), rng.normal(0.4, 1.2, size=(20, 5))
    res = K.kid(real, fake, subsets=1, subset_size=1000)
    assert res["subset_size"] == 20 and res["subsets"] == 1 and res["kid_std"] == 0.0
    direct = _mmd2_direct(real, fake)
    assert direct > 0.05
    assert res["kid"] == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("full_kernels", [True, False])
def test_kid_subsets_follow_the_seeded_draws(monkeypatch, full_kernels):
    """m = min(n_real, n_fake, subset_size); per subset m distinct fake then m distinct real rows
    from RandomState(seed); mean and ddof=0 std of the subset estimates. Both the whole-kernel and
    the per-subset code paths."""
    monkeypatch.setattr(K, "FULL_KERNEL_MAX_ENTRIES", 10 ** 9 if full_kernels else 0)
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 4)), rng.normal(0.3, 1.0, size=(40, 4))
    res = K.kid(real, fake, subsets=6, subset_size=12, seed=7)
    draws = np.random.RandomState(7)
    vals = []
    for _ in range(6):
        fi = draws.choice(40, 12, replace=False)
        ri = draws.choice(30, 12, replace=False)
        vals.append(_mmd2_direct(fake[fi], real[ri]))
    assert res["subset_size"] == 12 and res["subsets"] == 6
    assert res["kid"] == pytest.approx(np.mean(vals), rel=1e-10)
    assert res["kid_std"] == pytest.approx(np.std(vals), rel=1e-8) and res["kid_std"] > 0
    assert K.kid(real, fake, subsets=6, subset_size=12, seed=7) == res
    assert K.kid(real, fake, subsets=6, subset_size=12, seed=8)["kid"] != res["kid"]
    assert K.kid(real, fake, subsets=2, subset_size=100)["subset_size"] == 30


def test_kid_errors():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        K.kid(a, a[:1])
    with pytest.raises(ValueError, match="dimensions differ"):
        K.kid(a, rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        K.kid(a, a[0])


def test_kid_is_unbiased_and_positive_for_a_shift():
    """Same distribution: the mean over independent repetitions is 0 within 3 standard errors
    (the biased estimate, diagonals included, is not); shifted: clearly positive."""
    rng = np.random.default_rng(3)
    reps, m, d = 400, 8, 3
    same, biased, shifted = [], [], []
    for _ in range(reps):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        same.append(K.kid(x, y, subsets=1)["kid"])
        kxx, kyy, kxy = K.polynomial_kernel(x, x), K.polynomial_kernel(y, y), K.polynomial_kernel(x, y)
        biased.append((kxx.sum() + kyy.sum() - 2 * kxy.sum()) / m ** 2)
        shifted.append(K.kid(x, rng.normal(1.0, 1.0, size=(m, d)), subsets=1)["kid"])
    se = np.std(same, ddof=1) / np.sqrt(reps)
    assert abs(np.mean(same)) < 3 * se
    assert np.mean(biased) > 10 * np.std(biased, ddof=1) / np.sqrt(reps)   # the test has power
    assert np.mean(shifted) > 10 * np.std(shifted, ddof=1) / np.sqrt(reps)
    assert min(same) < 0 < max(same)


# ---------------------------------------------------------------- FID against a fixed reference

def _sqrtm_trace(s1, s2):
    return float(np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2))))


@pytest.fixture(scope="module")
def ref40():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(40, 40)) / 6
    return a, M.activation_statistics(rng.normal(size=(400, 40)) @ a)


@pytest.mark.parametrize("n", [15, 39, 40, 120])
def test_trace_term_matches_sqrtm(ref40, n):
    a, (mu, s) = ref40
    f = np.random.default_rng(n).normal(0.2, 1.1, size=(n, 40)) @ a
    mu_g, s_g = M.activation_statistics(f)
    ref = _sqrtm_trace(s, s_g)
    assert M.trace_sqrt_product_to_reference(f, s) == pytest.approx(ref, rel=1e-6)
    fac = M.reference_factor(s)
    assert np.allclose(fac @ fac.T, s, atol=1e-12)
    assert M.trace_sqrt_product_to_reference(f, s, ref_factor=fac) == pytest.approx(ref, rel=1e-6)
    expect = float((mu - mu_g) @ (mu - mu_g) + np.trace(s) + np.trace(s_g) - 2 * ref)
    assert M.frechet_distance_to_reference(f, mu, s) == pytest.approx(expect, rel=1e-6)
    assert M.frechet_distance_to_reference(f, mu, s) == pytest.approx(
        M.frechet_distance(mu, s, mu_g, s_g), rel=1e-7)
    with pytest.raises(ValueError, match="do not match"):
        M.frechet_distance_to_reference(f[:, :5], mu, s)


def _brute_bootstrap(f, mu, s, resamples, seed):
    rng = np.random.default_rng(seed)
    return np.array([M.frechet_distance(mu, s, *M.activation_statistics(f[rng.integers(0, len(f), len(f))]))
                     for _ in range(resamples)])


def _brute_half(f, mu, s, resamples, seed):
    rng = np.random.default_rng(seed)
    return np.array([M.frechet_distance(mu, s, *M.activation_statistics(
        f[np.sort(rng.permutation(len(f))[:len(f) // 2])])) for _ in range(resamples)])


@pytest.mark.parametrize("n,d", [(30, 40), (60, 8)])   # u x u (Gram) route, D x D route
def test_bootstrap_values_are_the_resampled_fids(n, d):
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(300, d))
    mu, s = M.activation_statistics(ref)
    f = rng.normal(0.3, 1.2, size=(n, d))
    res = M.fid_bootstrap(f, mu, s, resamples=20, seed=3, level=0.9)
    assert set(res) == {"fid", "low", "high", "std", "resample_mean", "resamples", "level", "method"}
    assert res["method"] == "percentile bootstrap over generated samples; reference statistics fixed"
    assert res["fid"] == pytest.approx(M.frechet_distance_features(ref, f), rel=1e-7)
    brute = _brute_bootstrap(f, mu, s, 20, 3)
    assert (res["low"], res["high"]) == pytest.approx(tuple(np.quantile(brute, [0.05, 0.95])), rel=1e-7)
    assert res["std"] == pytest.approx(brute.std(ddof=1), rel=1e-6)
    assert res["resample_mean"] == pytest.approx(brute.mean(), rel=1e-7)
    assert M.fid_bootstrap(f, mu, s, resamples=20, seed=3, level=0.9) == res   # deterministic
    assert M.fid_bootstrap(f, mu, s, resamples=20, seed=4, level=0.9)["low"] != res["low"]

    half = M.fid_half_sample(f, mu, s, resamples=20, seed=3, level=0.9)
    hb = _brute_half(f, mu, s, 20, 3)
    assert half["fid"] == res["fid"] and half["resample_mean"] == pytest.approx(hb.mean(), rel=1e-7)
    assert half["std"] == pytest.approx(hb.std(ddof=1), rel=1e-6)
    q = res["fid"] + np.quantile(hb - hb.mean(), [0.05, 0.95])
    assert (half["low"], half["high"]) == pytest.approx(tuple(q), rel=1e-7)
    assert half["low"] < half["fid"] < half["high"]


def test_bootstrap_interval_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(6)
    d = 4
    mu, s = M.activation_statistics(rng.normal(size=(2000, d)))
    big = rng.normal(0.2, 1.0, size=(400, d))   # well-behaved: N >> D
    res = M.fid_bootstrap(big, mu, s, resamples=200)
    assert res["low"] < res["fid"] < res["high"] and res["resamples"] == 200 and res["level"] == 0.95
    small = M.fid_bootstrap(big[:50], mu, s, resamples=200)
    # the spread scales like 1/sqrt(N): ~2.8x wider at N=50 than at N=400
    assert small["high"] - small["low"] > 1.8 * (res["high"] - res["low"])
    assert small["std"] > 1.8 * res["std"]
    with pytest.raises(ValueError, match="level"):
        M.fid_bootstrap(big, mu, s, level=1.0)
    with pytest.raises(ValueError, match="resamples"):
        M.fid_bootstrap(big, mu, s, resamples=1)


def test_small_n_bootstrap_bias_and_half_sample_spread():
    """N < D: bootstrap resamples (~0.63 N distinct rows) sit above the point estimate and spread
    more than FID over fresh draws of N; the half-sample spread matches the fresh-draw one."""
    rng = np.random.default_rng(7)
    d, n = 48, 24
    a = rng.normal(size=(d, d)) / 7
    mu, s = M.activation_statistics(rng.normal(size=(1000, d)) @ a)
    fresh = np.std([M.frechet_distance_to_reference(rng.normal(size=(n, d)) @ a + 0.05, mu, s)
                    for _ in range(150)], ddof=1)
    boot, half = [], []
    for _ in range(4):
        f = rng.normal(size=(n, d)) @ a + 0.05
        b = M.fid_bootstrap(f, mu, s, resamples=100)
        assert b["resample_mean"] > b["fid"]
        boot.append(b["std"])
        half.append(M.fid_half_sample(f, mu, s, resamples=100)["std"])
    # measured over seeds 7..12: fresh 0.98..1.14, bootstrap / fresh 2.6..3.2, half / fresh 1.2..1.6
    assert np.mean(boot) > 2.0 * fresh
    assert abs(np.log(np.mean(half) / fresh)) < abs(np.log(np.mean(boot) / fresh))
    assert 0.6 < np.mean(half) / fresh < 2.0


def test_separable():
    assert M.separable((0.0, 1.0), (2.0, 3.0)) and M.separable((2.0, 3.0), (0.0, 1.0))
    assert not M.separable((0.0, 2.0), (1.0, 3.0))
    assert not M.separable((0.0, 3.0), (1.0, 2.0))      # nested
    assert not M.separable((0.0, 1.0), (1.0, 2.0))      # touching: not separable at this N
    assert M.separable({"low": 10.0, "high": 12.0}, (12.5, 13.0))
    with pytest.raises(ValueError, match="low <= high"):
        M.separable((2.0, 1.0), (0.0, 3.0))
