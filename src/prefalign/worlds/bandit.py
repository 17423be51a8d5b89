"""bandit: a linear-logit contextual bandit with K annotator types, where every quantity is exact.

    world = make_world(n_contexts=200, n_candidates=5, type_weights=[[2, 0], [-2, 0]], population=[.5, .5])
    prefs = sample_preferences(world, n_annotators=1000, n_shown=3)          # one ternary ranking each
    policy = TabularPolicy.from_reference(world)                             # or LinearPolicy(world, beta)
    logps = policy.log_probs()                                               # [X, Y], exact
    kl(logps, world.reference_logps(), world.context_probs)                  # exact KL(π‖π_ref)
    expected_reward(logps, world.rewards(), world.context_probs)             # [K] exact E_π[r_k]

* contexts x = 0..X−1 (uniform ρ(x)), each with the same number Y of candidates y; features φ(x, y) ∈ R^d
  drawn once from N(0, I).
* K annotator types; type k's reward r_k(x, y) = w_k·φ(x, y); `population` η gives the type proportions.
* policies are softmax distributions over a context's candidates, so log-probs, KL(π‖π_ref), expected
  rewards and implicit rewards β·log(π/π_ref) are exact sums, not samples: `TabularPolicy` (one logit per
  context-candidate: the DPO-family losses' exact tabular setting) and `LinearPolicy` (π_θ ∝ π_ref·exp(θ·φ/β),
  whose implicit reward is θ·φ up to a per-context constant: the paper's linear-logit setting, used by EM).
* preferences: annotators of hidden types shown n of a context's candidates give a pair (n = 2), a full
  ranking or a top-m of n, by Plackett–Luce on r_k / temperature, or deterministically (highest reward first).
  `Preferences` holds index tensors that the library's losses and EM-DPO's E-step take directly
  (`gather` turns any [X, Y] table, e.g. a policy's log-probs, into the [N, n] values of the shown candidates).

A pairwise loss trains a tabular policy on exact log-probs (what an MPO/DPO frontier needs):

    ctx, chosen, rejected, _ = every_pair(world).pairs()                # deterministic, noise-free
    logp, ref = policy.log_probs(), world.reference_logps()
    losses, _, _ = dpo_loss(logp[ctx, chosen], logp[ctx, rejected], ref[ctx, chosen], ref[ctx, rejected], beta)

Everything is float64 torch; a world of 1000 contexts and 16k annotators fits in memory many times over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DTYPE = torch.float64


@dataclass
class BanditWorld:
    features: torch.Tensor  # [X, Y, d] φ(x, y)
    type_weights: torch.Tensor  # [K, d] w_k: type k's reward is w_k·φ
    population: torch.Tensor  # [K] η, sums to 1
    reference_logits: torch.Tensor  # [X, Y] π_ref = softmax over each context's candidates

    @property
    def n_contexts(self) -> int:
        return self.features.shape[0]

    @property
    def n_candidates(self) -> int:
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    @property
    def n_types(self) -> int:
        return self.type_weights.shape[0]

    @property
    def context_probs(self) -> torch.Tensor:
        """[X] ρ(x): contexts are drawn uniformly."""
        return torch.full((self.n_contexts,), 1.0 / self.n_contexts, dtype=DTYPE)

    def rewards(self, weights=None) -> torch.Tensor:
        """[K, X, Y] true rewards r_k(x, y) = w_k·φ(x, y); `weights` [M, d] (or [d]) for other directions."""
        w = self.type_weights if weights is None else torch.as_tensor(weights, dtype=DTYPE)
        return torch.einsum("xyd,...d->...xy", self.features, w)

    def reference_logps(self) -> torch.Tensor:
        """[X, Y] log π_ref(y|x)."""
        return torch.log_softmax(self.reference_logits, -1)


def make_world(
    n_contexts: int = 200,
    n_candidates: int = 5,
    type_weights: Sequence[Sequence[float]] = ((2.0, 0.0), (-2.0, 0.0)),
    population: Sequence[float] | None = None,
    reference_scale: float = 0.0,
    seed: int = 0,
) -> BanditWorld:
    """A world with features φ ~ N(0, I_d) (d = len(type_weights[0])), the given type rewards and proportions
    (default: equal), and reference logits ~ N(0, reference_scale²) (0: the uniform reference)."""
    w = torch.as_tensor(type_weights, dtype=DTYPE)
    if w.ndim != 2 or n_contexts < 1 or n_candidates < 2:
        raise ValueError(
            f"need type_weights [K, d], n_contexts >= 1, n_candidates >= 2; got shape {tuple(w.shape)}, "
            f"{n_contexts}, {n_candidates}"
        )
    eta = (
        torch.full((len(w),), 1.0 / len(w), dtype=DTYPE)
        if population is None
        else torch.as_tensor(population, dtype=DTYPE)
    )
    if eta.shape != (len(w),) or (eta < 0).any() or not eta.sum() > 0:
        raise ValueError(f"population must be {len(w)} non-negative proportions, got {population}")
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_contexts, n_candidates, w.shape[1], generator=g, dtype=DTYPE)
    ref = reference_scale * torch.randn(n_contexts, n_candidates, generator=g, dtype=DTYPE)
    return BanditWorld(features, w, eta / eta.sum(), ref)


# ---------------------------------------------------------------- policies and exact functionals


class TabularPolicy(torch.nn.Module):
    """π(y|x) = softmax(logits[x])_y: one free logit per context-candidate."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=DTYPE).clone())

    @classmethod
    def from_reference(cls, world: BanditWorld) -> TabularPolicy:
        return cls(world.reference_logits)

    def log_probs(self) -> torch.Tensor:
        """[X, Y] exact log π(y|x)."""
        return torch.log_softmax(self.logits, -1)


class LinearPolicy(torch.nn.Module):
    """π_θ(y|x) ∝ π_ref(y|x)·exp(θ·φ(x, y)/β): its implicit reward β·log(π_θ/π_ref) is θ·φ minus a per-context
    constant (which every preference likelihood cancels), so θ is directly comparable with the types' w_k.
    θ [K, d] holds K policies at once (log-probs [K, X, Y])."""

    def __init__(self, world: BanditWorld, beta: float, theta=None):
        super().__init__()
        self.world, self.beta = world, float(beta)
        theta = torch.zeros(world.dim, dtype=DTYPE) if theta is None else torch.as_tensor(theta, dtype=DTYPE)
        self.theta = torch.nn.Parameter(theta.clone())

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.world.reference_logits + self.world.rewards(self.theta) / self.beta, -1)


def kl(logps, ref_logps, context_probs) -> torch.Tensor:
    """Exact KL(π‖π_ref) = Σ_x ρ(x) Σ_y π(y|x)·(log π − log π_ref); logps [..., X, Y] -> [...]."""
    return ((logps.exp() * (logps - ref_logps)).sum(-1) * context_probs).sum(-1)


def expected_reward(logps, rewards, context_probs) -> torch.Tensor:
    """Exact E_{x~ρ, y~π}[r(x, y)]; logps [X, Y] or [P, X, Y], rewards [X, Y] or [K, X, Y] -> [] / [K] / [K, P]."""
    probs = logps.exp()
    if rewards.ndim == 3 and probs.ndim == 3:  # every reward against every policy: L[k, p]
        return torch.einsum("kxy,pxy,x->kp", rewards, probs, context_probs)
    return ((probs * rewards).sum(-1) * context_probs).sum(-1)


def implicit_rewards(logps, ref_logps, beta: float) -> torch.Tensor:
    """β·(log π − log π_ref): the DPO implicit reward of every candidate (exact)."""
    return beta * (logps - ref_logps)


def optimal_logps(ref_logps, rewards, beta: float) -> torch.Tensor:
    """log π* of the KL-regularized optimum argmax_π E_π[r] − β·KL(π‖π_ref): π* ∝ π_ref·exp(r/β)."""
    return torch.log_softmax(ref_logps + rewards / beta, -1)


def mixture_logps(logps, weights) -> torch.Tensor:
    """[X, Y] log Σ_j w_j π_j(y|x): the policy that answers each request with π_j with probability w_j."""
    w = torch.as_tensor(weights, dtype=logps.dtype)
    if w.shape != logps.shape[:1] or (w < 0).any() or abs(float(w.sum()) - 1) > 1e-6:
        raise ValueError(
            f"weights must be a probability vector over {logps.shape[0]} policies, got {weights}"
        )
    return torch.logsumexp(logps + w.clamp(min=1e-300).log()[:, None, None], 0)


# ---------------------------------------------------------------- preference data


@dataclass
class Preferences:
    """N records by U annotators: record j shows candidates items[j] of context[j] and ranks them."""

    context: torch.Tensor  # [N] long
    items: torch.Tensor  # [N, n] long: the shown candidates (indices into the context's Y candidates)
    ranking: torch.Tensor  # [N, n] long: positions into items, best first, −1 padded (top-m of n)
    annotator: torch.Tensor  # [N] long, 0..U−1
    types: torch.Tensor  # [U] long: each annotator's hidden type

    @property
    def n_annotators(self) -> int:
        return len(self.types)

    def __len__(self) -> int:
        return len(self.context)

    def gather(self, table: torch.Tensor) -> torch.Tensor:
        """[..., X, Y] -> [..., N, n]: the values of each record's shown candidates, in `items` order."""
        return table[..., self.context[:, None], self.items]

    def subset(self, keep) -> Preferences:
        """The records `keep` ([N] bool or indices); annotators and their types are unchanged."""
        return Preferences(
            self.context[keep], self.items[keep], self.ranking[keep], self.annotator[keep], self.types
        )

    def unique(self) -> tuple[Preferences, torch.Tensor]:
        """(the distinct records, inverse [N] mapping each record to its distinct one). Two records are the
        same when they rank the same candidates of the same context the same way, whatever order the
        candidates were shown in (each record's items are sorted, its ranking re-indexed): identical records
        have identical likelihoods, so EM computes each once and sums weights."""
        items, order = self.items.sort(1)
        place = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        ranking = torch.where(self.ranking >= 0, place.gather(1, self.ranking.clamp(min=0)), -1)
        key = torch.cat([self.context[:, None], items, ranking], 1)
        distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
        n = self.items.shape[1]
        first = torch.zeros(len(distinct), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(key)), reduce="amax", include_self=False
        )
        return Preferences(distinct[:, 0], distinct[:, 1 : 1 + n], distinct[:, 1 + n :], self.annotator[first],
                           self.types), inverse  # fmt: skip

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every comparison a record implies, as (context, chosen, rejected, record) [P]: each ranked candidate
        beats every candidate ranked after it and every unranked one. A pair record gives its one pair."""
        n = self.items.shape[1]
        position = torch.full_like(self.ranking, n)  # a candidate's place in the ranking; unranked: n
        ranked = self.ranking >= 0
        rows, steps = ranked.nonzero(as_tuple=True)
        position[rows, self.ranking[rows, steps]] = steps
        better = (position[:, :, None] < position[:, None, :]) & (position[:, :, None] < n)  # [N, i, j]
        record, i, j = better.nonzero(as_tuple=True)
        return self.context[record], self.items[record, i], self.items[record, j], record


def assign_types(population, n_annotators: int, rng: np.random.Generator) -> np.ndarray:
    """[U] type indices in the population's exact proportions (largest remainder), in random order."""
    quotas = np.asarray(population, dtype=float) * n_annotators
    counts = np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[: n_annotators - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


def sample_preferences(
    world: BanditWorld,
    n_annotators: int,
    per_annotator: int = 1,
    n_shown: int = 2,
    n_ranked: int | None = None,
    temperature: float = 1.0,
    deterministic: bool = False,
    seed: int = 0,
    types=None,
) -> Preferences:
    """Records of `n_annotators` annotators (types in the world's proportions, or `types` [U]), `per_annotator`
    each: a uniform context, `n_shown` distinct uniform candidates, ranked (top `n_ranked`, default all) by
    Plackett–Luce on r_type / temperature (Gumbel trick: sorting utilities + Gumbel noise samples PL
    exactly), or by true reward with ties broken by position when `deterministic`."""
    n_ranked = n_shown if n_ranked is None else n_ranked
    if not 2 <= n_shown <= world.n_candidates or not 1 <= n_ranked <= n_shown:
        raise ValueError(
            f"need 2 <= n_shown <= {world.n_candidates} candidates and 1 <= n_ranked <= n_shown; got "
            f"n_shown={n_shown}, n_ranked={n_ranked}"
        )
    if n_annotators < 1 or per_annotator < 1 or not temperature > 0:
        raise ValueError("need n_annotators >= 1, per_annotator >= 1 and temperature > 0")
    rng = np.random.default_rng(seed)
    types = assign_types(world.population.numpy(), n_annotators, rng) if types is None else np.asarray(types)
    annotator = np.repeat(np.arange(n_annotators), per_annotator)
    N = len(annotator)
    context = rng.integers(world.n_contexts, size=N)
    items = np.argsort(rng.random((N, world.n_candidates)), 1)[:, :n_shown]  # n distinct, uniform
    context_t, items_t = torch.as_tensor(context), torch.as_tensor(items)
    rewards = world.rewards()[torch.as_tensor(types[annotator])[:, None], context_t[:, None], items_t].numpy()
    utility = rewards if deterministic else rewards / temperature + rng.gumbel(size=rewards.shape)
    order = np.argsort(-utility, axis=1, kind="stable")[:, :n_ranked]
    ranking = np.full((N, n_shown), -1)
    ranking[:, :n_ranked] = order
    return Preferences(
        context_t, items_t, torch.as_tensor(ranking), torch.as_tensor(annotator), torch.as_tensor(types)
    )


def every_pair(world: BanditWorld, type_index: int = 0) -> Preferences:
    """One deterministic pair record per (context, unordered candidate pair), ranked by type `type_index`'s
    reward (ties by position), all from one annotator: the exhaustive, noise-free preference data set."""
    Y = world.n_candidates
    a, b = torch.triu_indices(Y, Y, 1)
    context = torch.arange(world.n_contexts).repeat_interleave(len(a))
    items = torch.stack([a.repeat(world.n_contexts), b.repeat(world.n_contexts)], 1)
    r = world.rewards()[type_index][context[:, None], items]
    first = (r[:, 1] > r[:, 0]).long()  # the better one's position; a tie keeps the first
    ranking = torch.stack([first, 1 - first], 1)
    return Preferences(
        context, items, ranking, torch.zeros(len(context), dtype=torch.long), torch.tensor([type_index])
    )
