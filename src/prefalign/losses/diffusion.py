"""Diffusion preference losses on per-sample noise-prediction errors e(θ, x) = mean ‖target − f_θ(x_t, c, t)‖².

Every error of one example (winner and loser, or winner and reference sample) must come from ONE shared
timestep t and noise ε (`core/diffusion.paired_errors`); these functions only combine the errors.
"""

import torch
import torch.nn.functional as F


def diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float = 5000.0):
    """Per-example Diffusion-DPO loss, official convention:

        loss = −log σ( −0.5·β·[(model_err_w − ref_err_w) − (model_err_l − ref_err_l)] )

    Returns `(losses, chosen_rewards, rejected_rewards)`; rewards = −0.5·β·(model_err − ref_err), detached,
    so `chosen − rejected` is the sigmoid's argument and implicit accuracy is `mean(chosen > rejected)`.
    """
    chosen_rewards = -0.5 * beta * (model_err_w - ref_err_w)
    rejected_rewards = -0.5 * beta * (model_err_l - ref_err_l)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ssr_sign(delta_w):
    """SSR's sign rule on Δ_w (or an estimate of it): s = +1 where Δ_w ≤ 0 (a tie counts as +1), else −1."""
    return torch.where(delta_w <= 0, 1.0, -1.0)


def sspo_loss(
    model_err_w, model_err_ref, ckpt_err_w, ckpt_err_ref, beta: float = 5000.0, ssr: str = "sign",
    sign_delta_w=None,
):  # fmt: skip
    """Per-example SSPO loss  −log σ(−0.5·β·(Δ_w − c·Δ_r)),  Δ = e(θ, ·) − e(ckpt, ·).

    `ssr`: `sign` c = s = +1 if Δ_w ≤ 0 else −1; `indicator` c = 1[s = +1] (drop x_ref instead of flipping);
    `none` c = s = +1 (Diffusion-DPO with x_ref as loser). s is computed from detached errors: from
    `sign_delta_w` [B] when given (an estimate of Δ_w, e.g. its mean over several (t, ε) draws), else from
    this draw's Δ_w. Returns `(losses, sign, inside)`; `inside` (detached) is the sigmoid's argument.
    """
    if ssr not in ("sign", "indicator", "none"):
        raise ValueError(f"ssr must be sign, indicator or none, got {ssr!r}")
    delta_w = model_err_w - ckpt_err_w
    # written as Diffusion-DPO's rewards so that s = +1 gives bit-identical numbers
    winner_reward = -0.5 * beta * delta_w
    reference_reward = -0.5 * beta * (model_err_ref - ckpt_err_ref)
    statistic = delta_w if sign_delta_w is None else sign_delta_w
    sign = ssr_sign(statistic.detach()) if ssr != "none" else torch.ones_like(delta_w)
    coef = (sign > 0).to(delta_w.dtype) if ssr == "indicator" else sign
    inside = winner_reward - coef * reference_reward
    return -F.logsigmoid(inside), sign.detach(), inside.detach()


def diffusion_sft_loss(model_err_w):
    """SFT on winners: the plain denoising loss e(θ, x_w)."""
    return model_err_w
