"""EM-DPO's annotators and initial responsibilities γ: annotator index, per-annotator preference directions,
k-means / whitened / Dirichlet / given-label starts, and the alternating record halves used by `holdout`.

Split from `em.py` (the EM loop) because the start matters: from an uninformed start two opposite
types sit at a symmetric fixed point (docs/em_dpo.md). `whitened` is our reconstruction, not the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from prefalign.core.errors import ConfigError, DataError


def annotator_index(records) -> tuple[list[str], torch.Tensor]:
    """(annotator names in first-seen order, index [N] of each record's annotator); every record needs one."""
    names: dict[str, int] = {}
    index = []
    for i, record in enumerate(records):
        if record.annotator is None:
            raise DataError(
                f"record {i}: field 'annotator': EM-DPO needs an annotator id on every record "
                "(columns annotator / annotator_id / user_id)",
                row=i,
                field="annotator",
            )
        index.append(names.setdefault(str(record.annotator), len(names)))
    return list(names), torch.tensor(index, dtype=torch.long)


def _text(value) -> str:
    return value if isinstance(value, str) else " ".join(m["content"] for m in value)


def preference_directions(records, index, n_annotators: int, rankings=None, normalize=True) -> np.ndarray:
    """[U, V] per annotator: Σ over its rankings of Σ_t (φ(y_t) − mean_{s remaining at t} φ(y_s)),
    φ = bag of words; the gradient at 0 of a linear-reward Plackett–Luce log-likelihood.
    `rankings` replaces the records' rankings (the null model of `whitened_directions`)."""
    from sklearn.feature_extraction.text import CountVectorizer  # lazy: scikit-learn only for k-means starts

    texts = [_text(y) for r in records for y in r.responses]
    phi = CountVectorizer(token_pattern=r"[^ ]+").fit_transform(texts).toarray().astype(float)
    rankings = rankings if rankings is not None else [r.ranking for r in records]
    out, start = np.zeros((n_annotators, phi.shape[1])), 0
    for record, ranking, u in zip(records, rankings, index.tolist()):
        rows = phi[start : start + len(record.responses)]
        start += len(record.responses)
        remaining = list(range(len(rows)))
        for best in ranking:
            out[u] += rows[best] - rows[remaining].mean(0)
            remaining.remove(best)
    if not normalize:
        return out
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def whitened_directions(records, index, n_annotators: int, n_components: int, seed: int, draws: int = 8):
    """[U, n_components] preference directions projected on the directions where annotators disagree MORE
    than under random rankings: top generalized eigenvectors of (Cov of the observed directions, Cov of the
    directions of the same records ranked uniformly at random). Plain PCA/k-means on the directions is
    dominated by word-frequency noise (measured: top PC ⟂ the sentiment direction); the null covariance
    whitens that noise away. Reconstructed detail (`em.init: whitened`), not from the paper."""
    import scipy.linalg  # lazy: only the whitened start needs it

    rng = np.random.default_rng(seed)
    observed = preference_directions(records, index, n_annotators, normalize=False)
    null = np.concatenate(
        [
            preference_directions(
                records,
                index,
                n_annotators,
                [list(rng.permutation(len(r.responses))[: len(r.ranking)]) for r in records],
                normalize=False,
            )
            for _ in range(draws)
        ]
    )
    c_observed, c_null = np.cov(observed, rowvar=False), np.cov(null, rowvar=False)
    c_null += 1e-3 * np.trace(c_null) / len(c_null) * np.eye(len(c_null))  # ridge: words never ranked
    _, vectors = scipy.linalg.eigh(c_observed, c_null)
    return (observed - observed.mean(0)) @ vectors[:, ::-1][:, :n_components]


def initial_gamma(em, records, index, names, seed: int, labels: dict | None = None) -> np.ndarray:
    """[U, K] starting responsibilities: random Dirichlet, k-means on (whitened) preference directions, or labels."""
    K, U = em.n_types, len(names)
    rng = np.random.default_rng(seed)
    if em.init == "dirichlet":
        return rng.dirichlet(np.full(K, em.dirichlet_alpha), size=U)
    if em.init in ("kmeans", "whitened"):
        from sklearn.cluster import KMeans

        if em.init == "kmeans":
            features = preference_directions(records, index, U)
        else:
            features = whitened_directions(records, index, U, max(K - 1, 1), seed)
        hard = KMeans(n_clusters=K, n_init=10, random_state=seed).fit_predict(features)
    else:
        labels = labels if labels is not None else json.loads(Path(em.init_labels).read_text())
        missing = [u for u in names if u not in labels]
        if missing:
            raise ConfigError(
                f"em.init_labels: no label for annotator(s) {missing[:5]} ({len(missing)} missing)"
            )
        hard = np.array([int(labels[u]) for u in names])
        if ((hard < 0) | (hard >= K)).any():
            raise ConfigError(
                f"em.init_labels: labels must be type indices in [0, {K}), got {sorted(set(hard))}"
            )
    return (1 - em.init_smoothing) * np.eye(K)[hard] + em.init_smoothing / K


def record_halves(index) -> torch.Tensor:
    """[N] 0/1: alternating halves of each annotator's records; −1 for annotators with one record (both)."""
    position = torch.zeros_like(index)
    counts: dict[int, int] = {}
    for i, u in enumerate(index.tolist()):
        position[i] = counts.get(u, 0)
        counts[u] = counts.get(u, 0) + 1
    single = torch.tensor([counts[u] == 1 for u in index.tolist()])
    return torch.where(single, -1, position % 2)
