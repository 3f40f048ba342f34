"""The discriminative tokenizer's quantizer: each feature vector -> the index of its nearest centroid.

Pure torch, shared by the tokens stage and the stability metric, so both assign tokens the same way.
"""
from __future__ import annotations

import torch


def nearest_centroid(feats: torch.Tensor, centroids: torch.Tensor, c_sqnorm: torch.Tensor) -> torch.Tensor:
    """argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k), in fp32. feats (..., D) -> (...)."""
    flat = feats.reshape(-1, feats.shape[-1])
    scores = c_sqnorm[None, :] - 2.0 * (flat @ centroids.T)
    return scores.argmin(dim=1).reshape(feats.shape[:-1])
