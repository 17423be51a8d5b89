"""MPO losses (Jiang et al., arXiv 2312.16430) — RECONSTRUCTION from the abstract (docs/mpo.md).

Preference as reward, importance-sampled and reference-free: the winner's self-normalized importance weight
w = π(y_w) / (π(y_w) + π(y_l)) = σ(log π(y_w) − log π(y_l)) is maximized, and an NLL on samples of the
reference drawn once before training (off-policy KL regularization) keeps π near π_ref.
"""

import torch


def mpo_loss(policy_chosen_logps, policy_rejected_logps, beta=1.0):
    """MPO preference term per pair (reconstruction):  L = −σ(β·(log π(y_w|x) − log π(y_l|x))).

    −L = w_θ is the self-normalized importance weight of the winner (β = 1) — the policy's win probability
    within the pair. Bounded in [−1, 0]; dL/dh = −β·σ(βh)(1 − σ(βh)) ≤ β/4 vanishes as the pair separates
    either way (DPO's −log σ keeps a gradient ≥ β/2 for every h ≤ 0). Pass mean log-probs for the
    length-normalized form. Returns (losses [B], chosen_weights [B] detached).
    """
    weights = torch.sigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    return -weights, weights.detach()


def mpo_listwise_loss(policy_logps, ranking, beta=1.0, candidate_mask=None):
    """Listwise MPO (reconstruction): minus the self-normalized weight of the top response among n candidates,

        L = −softmax_j(β·log π(y_j|x))[top] = −π(y_top)^β / Σ_j π(y_j)^β

    policy_logps [B, n]; ranking [B, n] best first, −1 padded (only ranking[:, 0] matters); candidate_mask
    [B, n] marks existing candidates (None: all). With two candidates this is `mpo_loss` exactly.
    Returns (losses [B], weights [B, n] detached, 0 where no candidate).
    """
    if candidate_mask is None:
        candidate_mask = torch.ones_like(policy_logps, dtype=torch.bool)
    weights = torch.where(candidate_mask, beta * policy_logps, -torch.inf).softmax(-1)
    top = weights.gather(1, ranking[:, :1].clamp(min=0)).squeeze(1)
    return -top, weights.detach()


def regularization_nll(logps, n_tokens, per_token=True):
    """Off-policy KL regularizer per sample y ~ π_ref: −log π(y|x)/|y| (per_token) or −log π(y|x).

    E over reference samples of −log π(y|x) is KL(π_ref ‖ π) up to the constant entropy of π_ref.
    Dividing by the length |y| (tokens incl. EOS) is the note's reconstruction; `per_token=False` is the
    exact sequence-level estimator.
    """
    return -logps / n_tokens.clamp(min=1) if per_token else -logps
