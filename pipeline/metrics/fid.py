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
