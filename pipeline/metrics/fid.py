"""FID, Inception Score and improved precision/recall: the maths over Inception features.

The features come from :mod:`pipeline.feature_network` (the TF Inception of 2015-12-05); statistics
files, the reference cache and one-call helpers live in :mod:`pipeline.fid_stats`. Everything here
takes arrays.

FID uses float64 statistics and no scipy: tr sqrt(S1 S2) is the sum of the square roots of the
eigenvalues of the symmetric PSD matrix F1^T S2 F1 for any factor S1 = F1 F1^T (the same non-zero
spectrum as S1 S2), with round-off negatives clipped to 0. F1 is the Cholesky factor when S1 is
positive definite (N > 2048 samples), else it comes from an eigen-decomposition truncated at
numerical rank, or, with fewer samples than dimensions, straight from the centred features
(``frechet_distance_features``, what ``fid_stats.fid_between`` uses for images). Exact in exact
arithmetic, no eps offset needed, never complex, unlike ``scipy.linalg.sqrtm(S1 @ S2)`` (which
agrees to ~1e-12 relative on well-conditioned statistics).

Against fixed reference statistics (``frechet_distance_to_reference``) with N < D generated
samples, the trace term is an N x N eigenproblem: the nonzero eigenvalues of
S_ref^{1/2} S_gen S_ref^{1/2} are those of X S_ref X^T / (N-1), X the centred generated features.
``fid_bootstrap`` (percentile bootstrap, as specified) and ``fid_half_sample`` (half-sampling,
recommended for N < D, see its docstring) reuse G = X S_ref X^T for cheap intervals;
``separable`` says whether two intervals are disjoint.

IS follows the original (Salimans et al. 2016) TF code: softmax over the 1008 *unbiased* logits
(pool features @ fc.weight.T, no bias), ``splits`` equal chunks, exp(mean KL(p(y|x) || p(y))),
mean and std over chunks.

Precision/recall: Kynkaenniemi et al. 2019 (k-NN radii, k=3, self excluded), squared pairwise
distances in float32 batches with torch (matmul form); each radius gets a 1e-5 * |x|^2 slack so
that a sample identical to a manifold point always counts as inside despite float32 round-off.
"""
from __future__ import annotations

import numpy as np
import torch


# ================================================================ statistics and distances

def activation_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D,D) (unbiased, N-1) of (N,D) features, float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N>=2, D) features for statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_factor(sigma: np.ndarray) -> np.ndarray:
    """F with F @ F.T == sigma (D x r): Cholesky when positive definite, else from eigh with the
    eigenvalues below numerical rank (D * eps * max) dropped."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma)
        keep = w > max(w.max(), 0.0) * len(w) * np.finfo(np.float64).eps
        return v[:, keep] * np.sqrt(w[keep])


def _trace_sqrt_product(sigma2: np.ndarray, factor1: np.ndarray) -> float:
    """tr sqrt(S1 S2) for S1 = F1 F1^T: S1 S2 has the eigenvalues of the symmetric PSD F1^T S2 F1."""
    m = factor1.T @ sigma2 @ factor1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def _check_stats(mu1, sigma1, mu2, sigma2):
    """float64 copies of two statistics (shapes and finiteness checked, covariances symmetrised)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
    return mu1, (s1 + s1.T) / 2, mu2, (s2 + s2.T) / 2


def _fid(mu1, s1, mu2, s2, tr_covmean: float) -> float:
    """The distance once tr sqrt(S1 S2) is known, clipped at 0 (round-off)."""
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), float64 (see the module docstring)."""
    mu1, s1, mu2, s2 = _check_stats(mu1, sigma1, mu2, sigma2)
    return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s2, _sqrt_factor(s1)))


def centred_factor(feats: np.ndarray) -> np.ndarray | None:
    """(D, N) factor of the covariance of N <= D features (A^T with A = centred / sqrt(N-1))."""
    n, d = feats.shape
    if n > d:
        return None
    return ((feats - feats.mean(0)) / np.sqrt(n - 1)).T


def frechet_distance_features(feats1, feats2) -> float:
    """FID of two feature sets; identical to frechet_distance on their statistics, but with fewer
    samples than dimensions the covariance factor comes from the features (no D x D decomposition)."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    (mu1, s1), (mu2, s2) = activation_statistics(f1), activation_statistics(f2)
    return frechet_distance_stats({"mu": mu1, "sigma": s1, "factor": centred_factor(f1)},
                                  {"mu": mu2, "sigma": s2, "factor": centred_factor(f2)})


def frechet_distance_stats(a: dict, b: dict) -> float:
    """FID of two statistics dicts ({mu, sigma, optional factor}), using the covariance factor one
    of them carries (the one with fewest columns)."""
    mu1, s1, mu2, s2 = _check_stats(a["mu"], a["sigma"], b["mu"], b["sigma"])
    fa, fb = a.get("factor"), b.get("factor")
    if fa is None and fb is None:
        return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s2, _sqrt_factor(s1)))
    if fb is None or (fa is not None and fa.shape[1] <= fb.shape[1]):
        return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s2, fa))
    return _fid(mu1, s1, mu2, s2, _trace_sqrt_product(s1, fb))


# ================================================================ distance to a fixed reference, bootstrap

def _reference_trace_gram(centred: np.ndarray, ref_sigma: np.ndarray, ref_factor=None) -> np.ndarray:
    """G = X S_ref X^T (N x N, symmetrised) for centred features X; from the factor when given."""
    if ref_factor is not None:
        z = centred @ ref_factor
        g = z @ z.T
    else:
        g = (centred @ ref_sigma) @ centred.T
    return (g + g.T) / 2


def reference_factor(ref_sigma) -> np.ndarray:
    """F with F F^T = ref_sigma (Cholesky, or eigh truncated at numerical rank): compute once per
    reference and pass as ``ref_factor`` to the functions below."""
    s = np.asarray(ref_sigma, np.float64)
    return _sqrt_factor((s + s.T) / 2)


def _sum_sqrt_eigvals(m: np.ndarray) -> float:
    """sum sqrt(max(eig, 0)) of a symmetric PSD matrix (round-off negatives clipped)."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum())


def _check_reference(fake_feats, ref_mu, ref_sigma):
    f = np.asarray(fake_feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N>=2, D) generated features, got shape {f.shape}")
    mu = np.atleast_1d(np.asarray(ref_mu, np.float64))
    s = np.atleast_2d(np.asarray(ref_sigma, np.float64))
    if mu.shape != (f.shape[1],) or s.shape != (f.shape[1], f.shape[1]):
        raise ValueError(f"reference statistics do not match {f.shape[1]}-d features: "
                         f"mu {mu.shape}, sigma {s.shape}")
    for name, a in (("generated features", f), ("ref_mu", mu), ("ref_sigma", s)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
    return f, mu, (s + s.T) / 2


def trace_sqrt_product_to_reference(fake_feats, ref_sigma, *, ref_factor=None) -> float:
    """tr sqrt(S_ref S_gen), S_gen the (N-1)-normalised covariance of the (N, D) ``fake_feats``.

    N < D: the nonzero eigenvalues of S_ref^{1/2} S_gen S_ref^{1/2} are those of the N x N matrix
    X S_ref X^T / (N-1) (X the centred features), so only an N x N eigenproblem is solved (from
    ``ref_sigma``, or from ``ref_factor`` F with F F^T = S_ref when given). N >= D: the D x D route
    of :func:`frechet_distance` with ``ref_factor`` (computed by Cholesky/eigh when not given)."""
    f = np.asarray(fake_feats, np.float64)
    s = np.asarray(ref_sigma, np.float64)
    s = (s + s.T) / 2
    n, d = f.shape
    x = f - f.mean(0)
    if n < d:
        return _sum_sqrt_eigvals(_reference_trace_gram(x, s, ref_factor) / (n - 1))
    factor = _sqrt_factor(s) if ref_factor is None else np.asarray(ref_factor, np.float64)
    return _trace_sqrt_product(x.T @ x / (n - 1), factor)


def frechet_distance_to_reference(fake_feats, ref_mu, ref_sigma, *, ref_factor=None) -> float:
    """FID of (N, D) generated features against fixed reference statistics (mu, sigma); equals
    ``frechet_distance(ref_mu, ref_sigma, *activation_statistics(fake_feats))``, but with N < D
    the trace term is an N x N eigenproblem and no D x D decomposition is made (see
    :func:`trace_sqrt_product_to_reference`). ``ref_factor`` (F F^T = ref_sigma, e.g.
    ``reference_factor(ref_sigma)``) saves the D x D factorisation on repeated calls with N >= D."""
    f, mu, s = _check_reference(fake_feats, ref_mu, ref_sigma)
    x = f - f.mean(0)
    tr_gen = float((x * x).sum()) / (len(f) - 1)
    tr_covmean = trace_sqrt_product_to_reference(f, s, ref_factor=ref_factor)
    diff = f.mean(0) - mu
    return max(float(diff @ diff + np.trace(s) + tr_gen - 2.0 * tr_covmean), 0.0)


BOOTSTRAP_METHOD = "percentile bootstrap over generated samples; reference statistics fixed"
HALF_SAMPLE_METHOD = ("half-sampling (N/2 generated samples without replacement), spread centred on "
                      "the full-sample FID; reference statistics fixed")


class _ResampledFID:
    """FID against a fixed reference of re-weighted generated sets (integer counts per row), each
    computed from quantities precomputed once.

    For a set with u distinct rows X_u (counts c, total N_b = sum c), the covariance numerator is
    X_u^T (D - c c^T / N_b) X_u = (P D^{1/2} X_u)^T (P D^{1/2} X_u) with D = diag(c), r = sqrt(c),
    P = I - r r^T / N_b (a projection, |r|^2 = N_b). So tr sqrt(S_ref S_b) is the sum of sqrt of
    the eigenvalues of P D^{1/2} G_u D^{1/2} P / (N_b - 1), a u x u matrix, with G = X S_ref X^T
    computed once (N x N; "gram" route), or of Z_u^T (D - c c^T/N_b) Z_u / (N_b - 1), r x r, with
    Z = X F, F F^T = S_ref ("cov" route, for u well above D). The routes agree up to round-off.
    """

    def __init__(self, f: np.ndarray, mu: np.ndarray, s: np.ndarray, expected_distinct: float,
                 ref_factor=None):
        n, d = f.shape
        mean_all = f.mean(0)
        self.x = f - mean_all              # any fixed centring: each set is re-centred in __call__
        self.sq = (self.x * self.x).sum(1)
        self.offset = mean_all - mu
        self.tr_ref = float(np.trace(s))
        # eigvalsh(u x u) vs one u x r x r product plus eigvalsh(r x r): the Gram route wins up
        # to u ~ 1.5 D; G must also fit (N <= 8000: 512 MB)
        self.gram = expected_distinct <= 1.5 * d and n <= 8000
        if self.gram:
            self.g = _reference_trace_gram(self.x, s, ref_factor)
        else:
            factor = _sqrt_factor(s) if ref_factor is None else np.asarray(ref_factor, np.float64)
            self.z = self.x @ factor

    def __call__(self, counts: np.ndarray) -> float:
        u = np.flatnonzero(counts)
        c = counts[u].astype(np.float64)
        nb = float(c.sum())
        mean_b = (c @ self.x[u]) / nb      # set mean minus mean_all
        tr_gen = (float(c @ self.sq[u]) - nb * float(mean_b @ mean_b)) / (nb - 1)
        if self.gram:
            r = np.sqrt(c)
            m = self.g[np.ix_(u, u)] * r[:, None] * r[None, :]
            mr = m @ r
            m += (np.outer(r, r) * (float(r @ mr) / nb) - np.outer(mr, r) - np.outer(r, mr)) / nb
        else:
            zu = self.z[u]
            zm = (c @ zu) / nb
            m = (zu.T * c) @ zu - nb * np.outer(zm, zm)
        tr_covmean = _sum_sqrt_eigvals((m + m.T) / (2 * (nb - 1)))
        diff = self.offset + mean_b
        return max(float(diff @ diff) + self.tr_ref + tr_gen - 2.0 * tr_covmean, 0.0)


def _check_resampling(resamples, level) -> tuple[int, float]:
    if int(resamples) < 2:
        raise ValueError(f"need resamples >= 2, got {resamples}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return int(resamples), float(level)


def fid_bootstrap(fake_feats, ref_mu, ref_sigma, *, resamples: int = 200, seed: int = 0,
                  level: float = 0.95, ref_factor=None) -> dict:
    """Percentile bootstrap interval of FID over the generated samples, the reference fixed.

    Each of ``resamples`` rounds draws N generated rows with replacement
    (``np.random.default_rng(seed)``) and computes the FID of that resample against
    (``ref_mu``, ``ref_sigma``); ``low``/``high`` are the (1-level)/2 and (1+level)/2 quantiles of
    those values (``np.quantile``, linear), ``std`` their standard deviation (ddof=1),
    ``resample_mean`` their mean, ``fid`` the point estimate on all N samples
    (:func:`frechet_distance_to_reference`).

    Cost: G = X S_ref X^T once (N x N), then per resample one u x u eigenproblem, u ~ 0.63 N the
    number of distinct rows (see :class:`_ResampledFID`); with u above ~1.5 D, one D x D
    eigenproblem per resample instead. ``ref_factor`` (F F^T = ref_sigma) saves the reference
    factorisation on that route and on the point estimate's for N >= D.

    Caveat, measured on 2048-d features: a resample holds only ~0.63 N distinct samples and FID is
    biased upwards at small N, so when N < D the resampled values sit well above the point
    estimate (the interval can exclude it: N=1000, d=2048: point 574, interval [766, 793]) and
    their spread is inflated by the varying number of distinct samples (bootstrap std 7.2 vs 1.0
    over fresh draws of N=1000; 9.7 vs 6.7 at N=100). It behaves as expected for N >> D. For
    N < D prefer :func:`fid_half_sample`.
    """
    f, mu, s = _check_reference(fake_feats, ref_mu, ref_sigma)
    resamples, level = _check_resampling(resamples, level)
    n = len(f)
    point = frechet_distance_to_reference(f, mu, s, ref_factor=ref_factor)
    fid_of = _ResampledFID(f, mu, s, (1 - np.exp(-1)) * n, ref_factor)
    rng = np.random.default_rng(seed)
    fids = np.array([fid_of(np.bincount(rng.integers(0, n, size=n), minlength=n))
                     for _ in range(resamples)])
    alpha = (1.0 - level) / 2
    low, high = np.quantile(fids, [alpha, 1.0 - alpha])
    return {"fid": point, "low": float(low), "high": float(high), "std": float(fids.std(ddof=1)),
            "resample_mean": float(fids.mean()), "resamples": resamples, "level": level,
            "method": BOOTSTRAP_METHOD}


def fid_half_sample(fake_feats, ref_mu, ref_sigma, *, resamples: int = 200, seed: int = 0,
                    level: float = 0.95, ref_factor=None) -> dict:
    """Sampling-spread interval of FID at this N by half-sampling, the reference fixed.

    Each round takes floor(N/2) distinct generated rows without replacement
    (``np.random.default_rng(seed)``) and computes their FID h_b. For a smooth statistic the
    variance of a half-sample value around the full-sample one is sigma^2 (1/m - 1/N) = sigma^2/N
    at m = N/2 (the finite-population correction), i.e. the sampling variance at N, and every
    half-sample has the same number of distinct rows, so FID's small-N bias shifts all of them
    alike instead of adding spread. The interval is therefore centred on the full-sample FID:
    ``low``/``high`` = fid + the (1-level)/2 and (1+level)/2 quantiles of h_b - mean(h_b),
    ``std`` = std(h_b) (ddof=1), ``resample_mean`` = mean(h_b) (the FID at N/2, above ``fid``).

    Measured on 2048-d synthetic features, std over fresh draws of N vs this std: N=100: 6.7 vs
    5.4..6.7; N=400: 2.2 vs 2.3..2.5; N=1000: 1.2 vs 1.1..1.4. Cost as :func:`fid_bootstrap` with
    u = N/2. Needs N >= 4.
    """
    f, mu, s = _check_reference(fake_feats, ref_mu, ref_sigma)
    resamples, level = _check_resampling(resamples, level)
    n = len(f)
    if n < 4:
        raise ValueError(f"half-sampling needs N >= 4 generated samples, got {n}")
    point = frechet_distance_to_reference(f, mu, s, ref_factor=ref_factor)
    fid_of = _ResampledFID(f, mu, s, n // 2, ref_factor)
    rng = np.random.default_rng(seed)
    fids = np.empty(resamples)
    for b in range(resamples):
        counts = np.zeros(n, np.int64)
        counts[rng.permutation(n)[:n // 2]] = 1
        fids[b] = fid_of(counts)
    alpha = (1.0 - level) / 2
    low, high = point + np.quantile(fids - fids.mean(), [alpha, 1.0 - alpha])
    return {"fid": point, "low": float(low), "high": float(high), "std": float(fids.std(ddof=1)),
            "resample_mean": float(fids.mean()), "resamples": resamples, "level": level,
            "method": HALF_SAMPLE_METHOD}


def _interval(x) -> tuple[float, float]:
    lo, hi = (x["low"], x["high"]) if isinstance(x, dict) else x
    lo, hi = float(lo), float(hi)
    if not lo <= hi:
        raise ValueError(f"interval needs low <= high, got ({lo}, {hi})")
    return lo, hi


def separable(a, b) -> bool:
    """True when the intervals a and b ((low, high) pairs, or dicts with "low"/"high" such as
    :func:`fid_bootstrap` returns) are disjoint. Overlapping (or touching) intervals mean the two
    results are *not separable at this N*: more samples are needed to rank them."""
    (alo, ahi), (blo, bhi) = _interval(a), _interval(b)
    return ahi < blo or bhi < alo


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS (mean, std over ``splits`` chunks) from (N, classes) logits, float64."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if lg.ndim != 2 or len(lg) < splits:
        raise ValueError(f"need (N>={splits}, classes) logits, got shape {tuple(lg.shape)}")
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        p = part.exp()
        log_py = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (p * (part - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) in matmul form, clipped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None]
    return d.clamp_min_(0.0)


def _knn_radii_sq(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest other row (self excluded)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {len(x)}")
    out = []
    for s in range(0, len(x), batch):
        d = _sq_dists(x[s:s + batch], x)
        d[torch.arange(len(d)), torch.arange(s, s + len(d))] = 0.0   # self exactly at distance 0
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _coverage(manifold: torch.Tensor, radii_sq: torch.Tensor, queries: torch.Tensor, batch: int) -> float:
    """Fraction of ``queries`` inside some ball (manifold point, its k-NN radius)."""
    inside = 0
    for s in range(0, len(queries), batch):
        d = _sq_dists(queries[s:s + batch], manifold)
        inside += int((d <= radii_sq[None]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024,
                     device="cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019): precision = share of fake samples
    inside the real k-NN manifold, recall = share of real samples inside the fake one."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    # a query identical to a manifold point must count as inside whatever the round-off
    r_real, r_fake = _knn_radii_sq(real, k, batch_size), _knn_radii_sq(fake, k, batch_size)
    tol_real = r_real + 1e-5 * (real * real).sum(1)
    tol_fake = r_fake + 1e-5 * (fake * fake).sum(1)
    return _coverage(real, tol_real, fake, batch_size), _coverage(fake, tol_fake, real, batch_size)
