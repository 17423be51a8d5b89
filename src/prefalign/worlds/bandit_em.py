"""EM-DPO and min-max-regret aggregation on the bandit world, through the library's own code.

A type policy here is a `LinearPolicy` (anything that gives log-probs of candidates would do): the M-step
minimizes the γ-weighted listwise DPO loss (`losses.lm.plackett_luce_loss`) of its log-probs to convergence
(L-BFGS; the loss is convex in θ), the E-step is `methods.em_dpo.em.e_step` on `record_logliks` of the
implicit rewards β·(log π_k − log π_ref), EM stops at a log-likelihood plateau (`em.plateaued`) and keeps the
best of several random restarts; aggregation is `methods.em_dpo.aggregate.min_max_regret` on an exact
cross-evaluation. Nothing is sampled after the data: every expectation is an exact sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prefalign.losses.lm import plackett_luce_loss
from prefalign.methods.em_dpo.aggregate import min_max_regret, regret_matrix
from prefalign.methods.em_dpo.recovery import adjusted_rand_index, mixture_recovery
from prefalign.methods.em_dpo.steps import e_step, plateaued, record_logliks
from prefalign.worlds.bandit import (
    DTYPE,
    BanditWorld,
    LinearPolicy,
    Preferences,
    expected_reward,
    implicit_rewards,
    mixture_logps,
    optimal_logps,
)


def fit_policy(policy, prefs: Preferences, ref_logps, beta: float, weights=None, max_iter: int = 200,
               normalizer: int | None = None):  # fmt: skip
    """Minimize Σ_j w_j·L_PL(π; j) / N (listwise DPO, weights default 1) over the policy's parameters by
    L-BFGS; for a `LinearPolicy` the loss is convex, so this is the exact weighted M-step. A policy holding K
    policies (log-probs [K, X, Y]) takes weights [K, N]: the sum of K separate problems, solved jointly."""
    normalizer = normalizer or len(prefs)
    weights = (
        torch.ones(len(prefs), dtype=DTYPE) if weights is None else torch.as_tensor(weights, dtype=DTYPE)
    )
    ref = prefs.gather(ref_logps)
    opt = torch.optim.LBFGS(
        list(policy.parameters()),
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logps = prefs.gather(policy.log_probs())  # [N, n] or [K, N, n]
        n = logps.shape[-1]
        ranking = prefs.ranking.expand(logps.shape)
        losses, _ = plackett_luce_loss(
            logps.reshape(-1, n), ref.expand(logps.shape).reshape(-1, n), ranking.reshape(-1, n), beta
        )
        loss = (weights.reshape(-1) * losses).sum() / normalizer
        loss.backward()
        return loss

    opt.step(closure)
    return policy


def observed_loglik(prefs: Preferences, rewards, eta, distinct=None) -> tuple[torch.Tensor, float]:
    """(γ [U, K], Σ_u log Σ_k η_k Π_j P_PL(j | r_k)) for per-type reward tables rewards [K, X, Y].
    `distinct` = `prefs.unique()`: score each distinct record once."""
    scored, inverse = distinct if distinct is not None else (prefs, None)
    per_record = record_logliks(scored.gather(rewards).permute(1, 2, 0), scored.ranking, None)
    if inverse is not None:
        per_record = per_record[inverse]
    gamma, _, total = e_step(
        per_record, prefs.annotator, prefs.n_annotators, torch.as_tensor(eta, dtype=DTYPE)
    )
    return gamma, total


@dataclass
class EMFit:
    theta: np.ndarray  # [K, d] recovered type reward weights (implicit reward θ_k·φ)
    eta: np.ndarray  # [K]
    gamma: np.ndarray  # [U, K]
    log_likelihood: float
    iterations: int
    converged: bool  # stopped at the plateau (not at max_iterations)
    history: list[float] = field(default_factory=list)  # log-likelihood per iteration of the kept restart
    restarts: list[float] = field(default_factory=list)  # final log-likelihood of every restart


def linear_em(
    world: BanditWorld,
    prefs: Preferences,
    n_types: int,
    *,
    beta: float = 1.0,
    tolerance: float = 1e-5,
    max_iterations: int = 300,
    restarts: int = 4,
    seed: int = 0,
    init: str = "dirichlet",
    init_scale: float = 1.0,
) -> EMFit:
    """EM-DPO with K linear-logit type policies from `restarts` random starts, each run until the
    log-likelihood gains less than `tolerance` per annotator (`em.plateaued`); returns the restart with the
    highest log-likelihood. init "dirichlet" (as the library's `em.init: dirichlet`): γ_u ~ Dirichlet(1), then
    an M-step; with many annotators every type then starts near the pooled fit, and only what the likelihood
    supports moves them apart. "random": θ_k ~ N(0, I), η uniform, then an E-step."""
    if init not in ("dirichlet", "random"):
        raise ValueError(f"init must be 'dirichlet' or 'random', got {init!r}")
    ref = world.reference_logps()
    U, best, finals = prefs.n_annotators, None, []
    distinct, inverse = prefs.unique()

    def m_step(policy, gamma):  # exact, all K types at once; identical records share one weighted term
        weights = torch.zeros(n_types, len(distinct), dtype=DTYPE)
        weights.index_add_(1, inverse, gamma[prefs.annotator].T)
        fit_policy(policy, distinct, ref, beta, weights, normalizer=len(prefs))

    for r in range(restarts):
        if init == "random":
            g = torch.Generator().manual_seed(seed * 1000 + r)
            theta = init_scale * torch.randn(n_types, world.dim, generator=g, dtype=DTYPE)
            policy = LinearPolicy(world, beta, theta)
            eta = torch.full((n_types,), 1.0 / n_types, dtype=DTYPE)
        else:
            gamma = np.random.default_rng([seed, r]).dirichlet(np.ones(n_types), size=U)
            gamma = torch.as_tensor(gamma, dtype=DTYPE)
            policy, eta = (
                LinearPolicy(world, beta, torch.zeros(n_types, world.dim, dtype=DTYPE)),
                gamma.mean(0),
            )
            m_step(policy, gamma)
        history, converged = [], False
        for _ in range(max_iterations):
            with torch.no_grad():
                rewards = implicit_rewards(policy.log_probs(), ref, beta)  # [K, X, Y]
            gamma, total = observed_loglik(prefs, rewards, eta, (distinct, inverse))  # E-step
            eta = gamma.mean(0)
            converged = plateaued(history[-1] if history else None, total, U, tolerance)
            history.append(total)
            if converged:
                break
            m_step(policy, gamma)
        finals.append(history[-1])
        if best is None or history[-1] > best.log_likelihood:
            theta = policy.theta.detach().numpy().copy()
            best = EMFit(theta, eta.numpy(), gamma.numpy(), history[-1], len(history), converged, history)
    best.restarts = finals
    return best


def type_logps(world: BanditWorld, thetas, beta: float) -> torch.Tensor:
    """[K, X, Y] log-probs of the linear-logit policies θ_k."""
    with torch.no_grad():
        return LinearPolicy(world, beta, torch.as_tensor(np.asarray(thetas), dtype=DTYPE)).log_probs()


def recovery_metrics(world: BanditWorld, prefs: Preferences, fit: EMFit, temperature: float) -> dict:
    """The mixture metrics of `methods.em_dpo.recovery` against the annotators' true utilities w_k / T, the
    log-likelihood per annotator of the EM fit, of the truth and of an indifferent population (every
    ranking uniform), and EM's ARI beside the oracle's (Bayes posterior under the truth)."""
    U = prefs.n_annotators
    truth = world.type_weights.numpy() / temperature
    out = mixture_recovery(fit.theta, truth, fit.eta, world.population.numpy())
    oracle_gamma, ll_truth = observed_loglik(prefs, world.rewards() / temperature, world.population)
    _, ll_flat = observed_loglik(
        prefs, torch.zeros(1, world.n_contexts, world.n_candidates, dtype=DTYPE), [1.0]
    )
    labels = prefs.types.numpy()
    return {
        **out,
        "loglik_em": fit.log_likelihood / U,
        "loglik_truth": ll_truth / U,
        "loglik_indifferent": ll_flat / U,
        "loglik_truth_minus_indifferent": (ll_truth - ll_flat) / U,
        "ari": adjusted_rand_index(labels, fit.gamma),
        "oracle_ari": adjusted_rand_index(labels, oracle_gamma.numpy()),
        "iterations": fit.iterations,
        "converged": fit.converged,
        "eta": fit.eta.tolist(),
    }


def fairness(world: BanditWorld, prefs: Preferences, fit: EMFit, beta: float, temperature: float) -> dict:
    """Pooled listwise DPO vs EM-DPO + MMRA, judged by the TRUE rewards r_t = w_t·φ (exact expectations).

    MMRA: weights from `min_max_regret` on L[i, j] = E_{π_j}[r̂_i] (EM's implicit rewards: what the library
    does without ground truth); deployed as the mixture Σ_j w_j π_j. Regret of type t for a policy π:
    J_t(best available policy for t) − J_t(π), the best taken over every policy of the experiment: the
    oracle per-type policies π*_t ∝ π_ref·exp(r_t / (T·β)) (what DPO on type t alone converges to), EM's type
    policies and pooled DPO (`regret_matrix`, so ≥ 0 by construction)."""
    ref, rho = world.reference_logps(), world.context_probs
    em_logps = type_logps(world, fit.theta, beta)
    pooled = fit_policy(LinearPolicy(world, beta), prefs, ref, beta)
    with torch.no_grad():
        pooled_logps = pooled.log_probs()
    oracle_logps = optimal_logps(ref, world.rewards() / temperature, beta)
    L = expected_reward(em_logps, implicit_rewards(em_logps, ref, beta), rho).numpy()
    mmra = min_max_regret(L)
    mixture = mixture_logps(em_logps, mmra["weights"])
    columns = {"oracle": oracle_logps, "em": em_logps, "pooled": pooled_logps[None], "mmra": mixture[None]}
    J = expected_reward(torch.cat(list(columns.values())), world.rewards(), rho).numpy()  # [K, P]
    R = regret_matrix(J[:, :-1])  # the benchmark set excludes the mixture (inside the EM policies' hull)
    mmra_regret = J[:, :-1].max(1) - J[:, -1]
    pooled_regret = R[:, -1]
    return {
        "pooled_dpo": {
            "max_regret": float(pooled_regret.max()),
            "regret": pooled_regret.tolist(),
            "true_reward": J[:, -2].tolist(),
        },
        "mmra": {
            "max_regret": float(mmra_regret.max()),
            "regret": mmra_regret.tolist(),
            "true_reward": J[:, -1].tolist(),
            "weights": mmra["weights"],
            "game_max_regret": mmra["max_regret"],
        },
        "true_reward": J[:, :-1].tolist(),  # [type, policy]: the oracles, EM's policies, pooled DPO
        "oracle_true_reward": np.diag(J[:, : world.n_types]).tolist(),
        "em_true_reward": J[:, world.n_types : 2 * world.n_types].tolist(),
    }
