"""The bandit world: exact functionals against naive loops, preference sampling against Plackett–Luce,
index bookkeeping (gather, pairs, unique) by hand."""

import itertools
import math

import numpy as np
import pytest
import torch

from prefalign.losses.lm import ranking_log_likelihood
from prefalign.worlds.bandit import (
    LinearPolicy,
    Preferences,
    TabularPolicy,
    assign_types,
    every_pair,
    expected_reward,
    implicit_rewards,
    kl,
    make_world,
    mixture_logps,
    optimal_logps,
    sample_preferences,
)

torch.set_num_threads(1)


def _world(**kw):
    args = dict(n_contexts=7, n_candidates=4, type_weights=[[1.5, -0.5, 0.2], [-1.0, 0.3, 2.0]], seed=3)
    args.update(kw)
    return make_world(**args)


def _random_policy(world, seed):
    g = torch.Generator().manual_seed(seed)
    return TabularPolicy(torch.randn(world.n_contexts, world.n_candidates, generator=g, dtype=torch.float64))


def test_kl_and_expected_reward_equal_naive_sums():
    """KL(π‖π_ref) = Σ_x ρ(x) Σ_y π log(π/π_ref) and E_π[r] = Σ_x ρ(x) Σ_y π r, recomputed with Python loops
    over numpy probabilities; KL of the reference to itself is 0; the [K, P] form equals the single form."""
    world = _world(reference_scale=1.0)
    ref = world.reference_logps()
    policies = [_random_policy(world, s).log_probs().detach() for s in range(3)]
    rewards = world.rewards()
    rho = world.context_probs.numpy()
    for logp in policies:
        p, q = logp.exp().numpy(), ref.exp().numpy()
        naive_kl = sum(
            rho[x] * sum(p[x, y] * math.log(p[x, y] / q[x, y]) for y in range(4)) for x in range(7)
        )
        assert float(kl(logp, ref, world.context_probs)) == pytest.approx(naive_kl, rel=1e-12)
        for k in range(2):
            r = rewards[k].numpy()
            naive = sum(rho[x] * sum(p[x, y] * r[x, y] for y in range(4)) for x in range(7))
            assert float(expected_reward(logp, rewards[k], world.context_probs)) == pytest.approx(
                naive, rel=1e-12
            )
    assert float(kl(ref, ref, world.context_probs)) == 0.0
    L = expected_reward(torch.stack(policies), rewards, world.context_probs)
    assert L.shape == (2, 3)
    for k, j in itertools.product(range(2), range(3)):
        assert float(L[k, j]) == pytest.approx(
            float(expected_reward(policies[j], rewards[k], world.context_probs))
        )


def test_rewards_are_linear_in_the_features():
    world = _world()
    r = world.rewards()
    x, y = 5, 2
    assert float(r[1, x, y]) == pytest.approx(float(world.features[x, y] @ world.type_weights[1]))


def test_optimal_policy_regret_is_beta_times_kl():
    """V(π) = E_π[r] − β·KL(π‖π_ref) is maximized by π* ∝ π_ref·exp(r/β), and per context
    V(π*) − V(π) = β·KL(π‖π*) (expand log π* = log π_ref + r/β − log Z: E_π[r] − β KL(π‖π_ref) = β log Z −
    β KL(π‖π*), and V(π*) = β log Z). So every other policy's value is lower by exactly β·KL(π‖π*)."""
    world, beta = _world(reference_scale=0.7), 0.3
    ref, rho, r = world.reference_logps(), world.context_probs, world.rewards()[0]
    star = optimal_logps(ref, r, beta)

    def value(logp):
        return float(expected_reward(logp, r, rho) - beta * kl(logp, ref, rho))

    for s in range(5):
        logp = _random_policy(world, s).log_probs().detach()
        assert value(star) - value(logp) == pytest.approx(beta * float(kl(logp, star, rho)), rel=1e-10)
        assert value(logp) < value(star)


def test_linear_policy_implicit_reward_is_theta_dot_phi_up_to_a_context_constant():
    world, beta = _world(reference_scale=1.0), 0.25
    theta = torch.tensor([0.4, -1.2, 0.7], dtype=torch.float64)
    logp = LinearPolicy(world, beta, theta).log_probs().detach()
    gap = implicit_rewards(logp, world.reference_logps(), beta) - world.rewards(theta)
    assert torch.allclose(
        gap, gap[:, :1].expand_as(gap), atol=1e-12
    )  # constant over each context's candidates
    assert torch.allclose(logp.exp().sum(-1), torch.ones(world.n_contexts, dtype=torch.float64))
    # the linear-logit policy at θ is the KL-optimal policy of the reward θ·φ
    assert torch.allclose(
        logp, optimal_logps(world.reference_logps(), world.rewards(theta), beta), atol=1e-12
    )


def test_mixture_is_the_weighted_average_of_probabilities():
    world = _world()
    logps = torch.stack([_random_policy(world, s).log_probs().detach() for s in range(3)])
    w = [0.2, 0.0, 0.8]
    got = mixture_logps(logps, w).exp()
    want = sum(wj * logps[j].exp() for j, wj in enumerate(w))
    assert torch.allclose(got, want, atol=1e-14)
    assert torch.allclose(mixture_logps(logps, [0, 1.0, 0]), logps[1], atol=1e-12)
    with pytest.raises(ValueError, match="probability vector"):
        mixture_logps(logps, [0.5, 0.6, 0.0])


def test_assign_types_gives_exact_proportions():
    rng = np.random.default_rng(0)
    types = assign_types([0.6, 0.3, 0.1], 101, rng)
    assert np.bincount(types).tolist() == [61, 30, 10]  # 60.6, 30.3, 10.1: the largest remainder gets the +1


def test_sampled_rankings_follow_plackett_luce():
    """One context, 3 candidates, one type, T = 0.5: the frequency of each full ranking over 30k records matches
    its Plackett–Luce probability computed by `ranking_log_likelihood` (within 4 standard errors)."""
    world = make_world(n_contexts=1, n_candidates=3, type_weights=[[1.0, 0.5]], seed=1)
    prefs = sample_preferences(world, 30_000, n_shown=3, temperature=0.5, seed=0)
    r = world.rewards()[0, 0] / 0.5
    order = torch.gather(prefs.items, 1, prefs.ranking)  # candidate ids, best first
    for perm in itertools.permutations(range(3)):
        freq = float((order == torch.tensor(perm)).all(1).double().mean())
        p = float(ranking_log_likelihood(r[None], torch.tensor([perm])).exp())
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / 30_000), (perm, freq, p)


def test_sample_preferences_shapes_partial_rankings_and_deterministic_order():
    world = _world(population=[0.25, 0.75])
    prefs = sample_preferences(world, 40, per_annotator=3, n_shown=3, n_ranked=1, seed=2)
    assert prefs.items.shape == prefs.ranking.shape == (120, 3) and len(prefs) == 120
    assert (prefs.ranking[:, 1:] == -1).all() and (prefs.ranking[:, 0] >= 0).all()
    assert all(len(set(row.tolist())) == 3 for row in prefs.items)  # distinct candidates shown
    assert prefs.annotator.tolist() == [u for u in range(40) for _ in range(3)]
    assert np.bincount(prefs.types.numpy()).tolist() == [10, 30]
    det = sample_preferences(world, 30, n_shown=4, deterministic=True, seed=5)
    values = world.rewards()[det.types[det.annotator][:, None], det.context[:, None], det.items]
    ordered = torch.gather(values, 1, det.ranking)
    assert (ordered[:, :-1] >= ordered[:, 1:]).all()
    with pytest.raises(ValueError, match="n_shown"):
        sample_preferences(world, 5, n_shown=5)


def test_pairs_of_a_top_m_ranking_by_hand():
    """Items (10, 11, 12), ranking [2, 0, -1] (12 best, then 10; 11 unranked): 12 ≻ 10, 12 ≻ 11, 10 ≻ 11.
    A pair record [1, 0] over (3, 4) gives 4 ≻ 3."""
    prefs = Preferences(
        context=torch.tensor([0]),
        items=torch.tensor([[10, 11, 12]]),
        ranking=torch.tensor([[2, 0, -1]]),
        annotator=torch.tensor([0]),
        types=torch.tensor([0]),
    )
    context, chosen, rejected, record = prefs.pairs()
    got = sorted(zip(chosen.tolist(), rejected.tolist()))
    assert got == sorted([(12, 10), (12, 11), (10, 11)]) and (context == 0).all() and (record == 0).all()
    pair = Preferences(torch.tensor([5]), torch.tensor([[3, 4]]), torch.tensor([[1, 0]]), torch.tensor([0]),
                       torch.tensor([0]))  # fmt: skip
    assert [t.tolist() for t in pair.pairs()] == [[5], [4], [3], [0]]


def test_unique_records_map_back():
    """Distinct records up to the order the candidates were shown in: 2 contexts x 3 unordered pairs x 2
    rankings at most; every record's likelihood under any reward table is its distinct record's."""
    world = make_world(n_contexts=2, n_candidates=3, type_weights=[[1.0]], seed=0)
    for n_shown, n_ranked, most in ((2, 2, 2 * 3 * 2), (3, 1, 2 * 3), (3, 3, 2 * 6)):
        prefs = sample_preferences(world, 300, n_shown=n_shown, n_ranked=n_ranked, seed=0)
        distinct, inverse = prefs.unique()
        assert len(distinct) <= most
        table = torch.randn(2, 3, dtype=torch.float64)
        want = ranking_log_likelihood(prefs.gather(table), prefs.ranking)
        got = ranking_log_likelihood(distinct.gather(table), distinct.ranking)[inverse]
        assert torch.allclose(got, want, atol=1e-12)
        winners = torch.gather(prefs.items, 1, prefs.ranking[:, :1])
        assert torch.equal(torch.gather(distinct.items, 1, distinct.ranking[:, :1])[inverse], winners)


def test_every_pair_is_exhaustive_and_noise_free():
    world = _world()
    prefs = every_pair(world, type_index=1)
    assert len(prefs) == world.n_contexts * 6
    context, chosen, rejected, _ = prefs.pairs()
    r = world.rewards()[1]
    assert (r[context, chosen] >= r[context, rejected]).all()


def test_dpo_on_every_pair_trains_a_tabular_policy_towards_the_reward():
    """The world's intended use by pairwise losses: DPO (losses.lm.dpo_loss) on the exhaustive deterministic
    pairs of one type, Adam on the tabular logits. The exact expected reward rises from the reference's, the
    exact KL leaves 0, and the learned policy ranks every context's best candidate first."""
    from prefalign.losses.lm import dpo_loss

    world = make_world(n_contexts=6, n_candidates=4, type_weights=[[1.0, -0.5]], seed=2)
    ctx, chosen, rejected, _ = every_pair(world).pairs()
    ref, rho, r = world.reference_logps(), world.context_probs, world.rewards()[0]
    policy = TabularPolicy.from_reference(world)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    for _ in range(300):
        logp = policy.log_probs()
        losses, _, _ = dpo_loss(
            logp[ctx, chosen], logp[ctx, rejected], ref[ctx, chosen], ref[ctx, rejected], 0.5
        )
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    logp = policy.log_probs().detach()
    assert float(expected_reward(logp, r, rho)) > float(expected_reward(ref, r, rho)) + 0.3
    assert float(kl(logp, ref, rho)) > 0.1
    assert torch.equal(logp.argmax(-1), r.argmax(-1))
