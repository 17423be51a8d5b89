"""Language-model preference losses: DPO family, listwise Plackett–Luce, SFT. Pure functions of sequence
log-probs, per example (unreduced).

Conventions shared by every function here:
- `*_logps` are summed response log-probs log π(y|x) (pass mean log-probs for a length-normalized form).
- Reference log-probs are constants: they are detached inside, so no gradient ever reaches them.
- Returned rewards are the DPO implicit rewards β·(log π − log π_ref), detached (for logging).
- h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) is the log-ratio margin.
"""

import torch
import torch.nn.functional as F


def _margin_and_rewards(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
):
    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_logratios - rejected_logratios
    return h, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    label_smoothing=0.0,
):
    """DPO (Rafailov et al. 2023), with conservative DPO (cDPO) label smoothing ε:

        L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    ε is the assumed probability that a label is flipped; ε = 0 is plain DPO. Returns
    (losses, chosen_rewards, rejected_rewards).
    """
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


def robust_dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    label_smoothing=0.0,
):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), labels flipped with probability ε < 1/2:

        L = [(1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)

    Unbiased: its expectation over label flips equals the clean DPO loss. Unlike cDPO it can be negative.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo_loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """IPO (Azar et al. 2023): L = (h − 1/(2β))², minimized at h = 1/(2β).

    h is built from whatever log-probs are passed: summed by default. The IPO paper's and TRL's form
    length-normalizes the log-ratios; get it by passing mean log-probs (`sequence_logps(average=True)`).
    """
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """Hinge / SLiC (Zhao et al. 2023) on the DPO margin: L = max(0, 1 − β·h); zero past the margin β·h ≥ 1."""
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return torch.relu(1 - beta * h), chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta=2.0, gamma=0.5):
    """SimPO (Meng et al. 2024), reference-free: L = −log σ(β·(c − r) − γ).

    c, r are the caller's LENGTH-NORMALIZED log-probs (mean per token, `sequence_logps(average=True)`);
    γ is the target reward margin on the β-scaled scale (TRL's `simpo_gamma` = γ/β). Rewards are β·logps.
    """
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def sft_loss(policy_chosen_logps, n_tokens):
    """Per-example mean token negative log-likelihood of the chosen response: L = −log π(y_w|x) / |y_w|."""
    return -policy_chosen_logps / n_tokens.clamp(min=1)


def ranking_log_likelihood(rewards, ranking, candidate_mask=None):
    """Plackett–Luce log-likelihood of (possibly partial) rankings, per record -> [B].

        log P = Σ_{t<m} [ r_{σ(t)} − log Σ_{s remaining at step t} exp(r_s) ]

    rewards [B, n]; ranking [B, n] candidate indices best first, −1 padded (m ≤ n ranked). The remaining
    candidates at step t are all present ones not ranked before t, including the unranked ones (a top-m
    ranking says they are all below the ranked ones). candidate_mask [B, n] bool marks the candidates that
    exist (pass `batch["candidate_index"] >= 0`); None means every column is a candidate.
    For m = n = 2 this is DPO's Bradley–Terry log σ(r_w − r_l). Reused by EM-DPO's E-step.
    """
    B, n = rewards.shape
    if candidate_mask is None:
        candidate_mask = torch.ones_like(rewards, dtype=torch.bool)
    steps = torch.arange(n, device=rewards.device).expand(B, n)
    ranked = ranking >= 0  # [B, n] which steps t exist
    index = ranking.clamp(min=0)
    # position of each candidate in the ranking; unranked ones come after every step (position n)
    position = torch.full_like(ranking, n).scatter_reduce(
        1, index, torch.where(ranked, steps, n), reduce="amin"
    )
    remaining = candidate_mask[:, None, :] & (position[:, None, :] >= steps[:, :, None])  # [B, t, s]
    scores = torch.where(remaining, rewards[:, None, :], -torch.inf)
    scores = torch.where(ranked[:, :, None], scores, 0.0)  # keeps logsumexp (and its grad) finite on padding
    step_terms = rewards.gather(1, index) - scores.logsumexp(-1)
    return torch.where(ranked, step_terms, 0.0).sum(-1)


def plackett_luce_loss(policy_logps, ref_logps, ranking, beta=0.1, candidate_mask=None):
    """Listwise DPO over rankings: L = −log P_PL(ranking | r), r = β·(log π − log π_ref).

    Shapes [B, n]; see `ranking_log_likelihood` for partial (top-m) rankings and `candidate_mask` (records
    with fewer candidates). With 2 candidates ranked [0, 1] this equals `dpo_loss` exactly.
    Returns (losses [B], rewards [B, n] detached, 0 where no candidate).
    """
    rewards = beta * (policy_logps - ref_logps.detach())
    losses = -ranking_log_likelihood(rewards, ranking, candidate_mask)
    if candidate_mask is not None:
        rewards = torch.where(candidate_mask, rewards, 0.0)
    return losses, rewards.detach()
