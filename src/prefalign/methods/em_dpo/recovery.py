"""How well EM recovered the MIXTURE (type rewards and mixing weights), not only the clustering of annotators.

With one comparison per annotator even the Bayes classifier that knows the true rewards clusters annotators
poorly (its ARI, the "oracle ARI", is the ceiling), so the identifiability claim is about the mixture:

    mixture error  = min over type matchings m of  sqrt(Σ_k ‖r̂_{m(k)} − r_k‖²) / sqrt(Σ_k ‖r_k‖²)
    weight error   = ½ Σ_k |η̂_{m(k)} − η_k|                      (total variation, same matching)
    norm ratio     = mean_k ‖r̂_{m(k)}‖ / ‖r_k‖                      (1: full scale recovered; 0: collapsed)

r_k is a type's reward as a vector: the weights w_k of a linear reward (the bandit world), or the type's
utilities on a fixed set of held-out candidates, centred per prompt (a language-model world). Recovering
nothing (r̂ = 0) gives error 1; the matching is the assignment minimizing the summed squared distances.
"""

from __future__ import annotations

import numpy as np


def match_types(recovered, truth) -> list[int]:
    """m[k] = the recovered type matched to true type k (minimum total squared distance; K_hat >= K)."""
    from scipy.optimize import linear_sum_assignment  # lazy: scipy only for this matching

    recovered, truth = np.asarray(recovered, dtype=float), np.asarray(truth, dtype=float)
    cost = ((truth[:, None, :] - recovered[None, :, :]) ** 2).sum(-1)  # [K, K_hat]
    rows, cols = linear_sum_assignment(cost)
    return [int(c) for _, c in sorted(zip(rows, cols))]


def mixture_recovery(recovered, truth, eta_hat, eta_true) -> dict:
    """-> {mixture_error, weight_error, norm_ratio, matching} for type reward vectors [K_hat, D] vs [K, D]."""
    recovered, truth = np.asarray(recovered, dtype=float), np.asarray(truth, dtype=float)
    if recovered.ndim != 2 or truth.ndim != 2 or recovered.shape[1] != truth.shape[1]:
        raise ValueError(f"need [K_hat, D] and [K, D] arrays, got {recovered.shape} and {truth.shape}")
    m = match_types(recovered, truth)
    matched = recovered[m]
    norms = np.linalg.norm(truth, axis=1)
    return {
        "mixture_error": float(np.linalg.norm(matched - truth) / np.linalg.norm(truth)),
        "weight_error": float(0.5 * np.abs(np.asarray(eta_hat, dtype=float)[m] - np.asarray(eta_true)).sum()),
        "norm_ratio": float(np.mean(np.linalg.norm(matched, axis=1) / np.maximum(norms, 1e-300))),
        "matching": m,
    }


def adjusted_rand_index(true_labels, gamma) -> float:
    """ARI between the true labels [U] and argmax γ [U, K] (1: the same partition; ≈ 0: chance)."""
    from sklearn.metrics import adjusted_rand_score  # scikit-learn: only for this diagnostic

    return float(adjusted_rand_score(np.asarray(true_labels), np.asarray(gamma).argmax(1)))
