"""EM-DPO's steps: the E-step (log-space responsibilities from per-record Plackett–Luce log-likelihoods of
every type's implicit rewards), the M-step's items, collate and step for `core.train.fit` (γ-weighted listwise
DPO over the type policies), and the stopping rule. `em.py` runs them in a loop; `worlds/bandit_em.py` runs
the same E-step and stopping rule on exact tabular policies."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from prefalign.core.errors import ConfigError
from prefalign.core.logprobs import collate, sequence_logps
from prefalign.core.metrics import preference_metrics
from prefalign.core.reference import precompute_reference_logps
from prefalign.losses.lm import plackett_luce_loss, ranking_log_likelihood
from prefalign.methods.em_dpo.types import activate

# ---------------------------------------------------------------- the E-step (pure tensor math)


def e_step(record_loglik, annotator_index, n_annotators: int, eta, record_mask=None):
    """-> (γ [U, K], new η [K], observed log-likelihood) from per-record log P_k(j) [N, K], in log space.

    record_mask [N] bool keeps only the records scored this iteration (held-out half)."""
    if record_mask is not None:
        record_loglik = torch.where(record_mask[:, None], record_loglik, 0.0)
    per_annotator = torch.zeros(n_annotators, record_loglik.shape[1], dtype=record_loglik.dtype)
    per_annotator.index_add_(0, annotator_index, record_loglik)
    joint = torch.as_tensor(eta, dtype=record_loglik.dtype).log() + per_annotator
    total = joint.logsumexp(-1)
    gamma = (joint - total[:, None]).exp()
    return gamma, gamma.mean(0), float(total.sum())


def plateaued(previous: float | None, current: float, n_annotators: int, tolerance: float) -> bool:
    """EM has reached its log-likelihood plateau: the last iteration raised the log-likelihood by less than
    `tolerance` per annotator. A decrease (held-out scoring, inexact M-steps) also counts as a plateau."""
    return previous is not None and current - previous < tolerance * n_annotators


def gamma_entropy(gamma) -> float:
    """Mean over annotators of −Σ_k γ log γ (0: certain assignments, log K: uninformed)."""
    gamma = torch.as_tensor(gamma)
    return float(-(gamma * gamma.clamp(min=1e-30).log()).sum(-1).mean())


def record_logliks(rewards, ranking, candidate_mask) -> torch.Tensor:
    """[N, K] Plackett–Luce log-likelihood of each record under each type's rewards [N, n, K]."""
    return torch.stack(
        [ranking_log_likelihood(rewards[..., k], ranking, candidate_mask) for k in range(rewards.shape[-1])],
        -1,
    )


def type_rewards(model, encoded, adapters, beta, pad_token_id, batch_size, record_mask=None) -> torch.Tensor:
    """[N, n, K] implicit rewards β·(log π_k − log π_ref) of every candidate (reference already in `encoded`).

    record_mask [N] bool: score only these records (the E-step's held-out half; the rest stay 0), which
    halves the E-step's K no-grad passes under `em.holdout`."""
    n = max(len(e.response_ids) for e in encoded)
    keep = list(range(len(encoded))) if record_mask is None else torch.nonzero(record_mask).flatten().tolist()
    out = torch.zeros(len(encoded), n, len(adapters))
    if not keep:
        return out
    reference = _padded([encoded[i].reference_logps for i in keep], n)
    for k, name in enumerate(adapters):
        activate(model, name)
        copies = [dataclasses.replace(encoded[i], reference_logps=None) for i in keep]
        logps = precompute_reference_logps(
            model, copies, batch_size=batch_size, pad_token_id=pad_token_id, desc=f"E-step {name}"
        )
        out[keep, :, k] = beta * (_padded(logps, n) - reference)
    return out


def _padded(rows, n) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (n - len(r)) for r in rows], dtype=torch.float32)


# ---------------------------------------------------------------- the M-step


def m_step_items(encoded, index, gamma, mode: str, rng, record_mask=None) -> list:
    """(record, per-type weights [K]) items: γ_u (weighted) or a one-hot draw z_u ~ γ_u (stochastic)."""
    gamma = np.asarray(gamma, dtype=float)
    if mode == "stochastic":
        draws = np.array([rng.choice(len(g), p=g / g.sum()) for g in gamma])
        gamma = np.eye(gamma.shape[1])[draws]
    elif mode != "weighted":
        raise ConfigError(f"config key 'em.m_step' must be 'stochastic' or 'weighted', got {mode!r}")
    keep = range(len(encoded)) if record_mask is None else torch.nonzero(record_mask).flatten().tolist()
    return [(encoded[i], gamma[index[i]] * encoded[i].weight) for i in keep]


def make_collate(pad_token_id: int):
    def collate_by_type(items):
        """One sub-batch per type with a positive weight (a forward per adapter present)."""
        weights = np.stack([w for _, w in items])
        groups = []
        for k in np.flatnonzero(weights.sum(0) > 0):
            rows = np.flatnonzero(weights[:, k] > 0)
            group = collate([items[i][0] for i in rows], pad_token_id)
            group["type_weight"] = torch.tensor(weights[rows, k], dtype=torch.float32)
            groups.append({"adapter": int(k), "batch": group})
        return {"groups": groups}

    return collate_by_type


def make_step(adapters, beta: float):
    """step_fn for `core.train.fit`: γ-weighted listwise DPO, summed over the types present in the batch."""

    def step(model, batch):
        parts = []
        for group in batch["groups"]:
            g = group["batch"]
            activate(model, adapters[group["adapter"]])
            logps, _ = sequence_logps(model, g)
            present = g["candidate_index"] >= 0
            losses, rewards = plackett_luce_loss(logps, g["reference_logps"], g["ranking"], beta, present)
            parts.append((losses, g["type_weight"], rewards, logps, g["ranking"], present))
        losses, weight, rewards, logps, ranking, present = (_cat_padded(column) for column in zip(*parts))
        return preference_metrics(losses, weight, rewards, logps, ranking, present)

    return step


def _cat_padded(tensors) -> torch.Tensor:
    """Concatenate per-type sub-batches along records; [B_k, n_k] parts are padded to the largest n."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    n = max(t.shape[1] for t in tensors)
    fill = {torch.bool: False, torch.long: -1}.get(tensors[0].dtype, 0.0)
    return torch.cat([torch.nn.functional.pad(t, (0, n - t.shape[1]), value=fill) for t in tensors])


# ---------------------------------------------------------------- diagnostics


def adjusted_rand(true_types: dict, names, gamma) -> float | None:
    from sklearn.metrics import adjusted_rand_score  # scikit-learn: only for this diagnostic

    known = [i for i, u in enumerate(names) if u in true_types]
    if not known:
        return None
    return float(adjusted_rand_score([str(true_types[names[i]]) for i in known], np.argmax(gamma[known], 1)))


# ---------------------------------------------------------------- cross-fitting by annotator folds


def annotator_folds(n_annotators: int, n_folds: int, seed: int) -> torch.Tensor:
    """[U] fold of each annotator: a seeded random split into `n_folds` folds of (nearly) equal size."""
    order = np.random.default_rng([seed, n_folds]).permutation(n_annotators)
    folds = np.empty(n_annotators, dtype=np.int64)
    folds[order] = np.arange(n_annotators) % n_folds
    return torch.from_numpy(folds)


def cross_fit_items(items, record_fold, n_folds: int) -> list:
    """Spread M-step items (record, type weights [K]) over the F·K fold policies: a record of an annotator in
    fold g trains the K policies of every fold f ≠ g (weights [F·K], zero on fold g's block), so fold g's
    policies never see fold g's annotators, whose E-step they then score."""
    out = []
    for (record, weights), g in zip(items, record_fold.tolist()):
        spread = np.tile(weights, n_folds)
        spread[g * len(weights) : (g + 1) * len(weights)] = 0.0
        out.append((record, spread))
    return out
