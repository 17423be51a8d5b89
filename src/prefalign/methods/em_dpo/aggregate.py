"""Min-max-regret aggregation (MMRA) of a mixture of type policies into one deployable policy.

Chidambaram et al. (arXiv 2405.15065): given K type policies π_j (one LoRA adapter each, from EM-DPO),
find mixture weights w over them that minimize the worst type's regret:

    L[i, j]  = E_{x, y ~ π_j}[ r_i(x, y) ]        cross-evaluation: type i's reward of policy j's samples
    R[i, j]  = c_i · (max_j' L[i, j'] − L[i, j])  regret of type i if served by π_j (c_i: optional weight)
    w*       = argmin_{w ∈ Δ} max_i (R w)_i       a zero-sum game: w plays columns, the types play rows

A type's regret is measured against its BEST AVAILABLE policy (the row maximum), never against the policy
that happens to sit at the same position: EM returns its type policies in no particular order, and even a
correctly ordered "own" policy need not be a type's best under raw expected reward (a greedier policy can
score higher). An explicit type-to-policy `matching` is accepted instead; a policy that then beats a type's
matched policy gives a negative regret, which is an error. Either way the weights and the max regret do not
depend on the order of the policies (tests/test_aggregate.py checks every permutation).

r_i is type i's DPO implicit reward β·(log π_i − log π_ref) (its per-prompt constant cancels in R), or a
ground-truth reward when a world knows it. The game is solved by optimistic multiplicative weights
(optimistic Hedge, averaged iterates; what the research code does) and checked by an exact LP (scipy).
Deploying w: `MixturePolicy` answers each request with adapter j with probability w_j.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoTokenizer

from prefalign.core.config import build
from prefalign.core.encode import encode_records
from prefalign.core.logprobs import generate_responses
from prefalign.core.models import ModelConfig, load_base_model, pad_token_id
from prefalign.core.reference import precompute_reference_logps
from prefalign.methods.em_dpo import em
from prefalign.methods.em_dpo.types import load_adapters

# ---------------------------------------------------------------- the game


def regret_matrix(L, type_weights: Sequence[float] | None = None, matching: Sequence[int] | None = None,
                  tolerance: float = 1e-9) -> np.ndarray:  # fmt: skip
    """R[i, j] = c_i·(b_i − L[i, j]) for a cross-evaluation matrix L [types, policies] (rows: rewards, columns:
    policies, any number of each): b_i = max_j L[i, j] (type i's best available policy), or L[i, matching[i]]
    when a type-to-policy matching is given. A regret below −tolerance·max|L| (a policy better for type i
    than its matched one) raises ValueError: a regret cannot be negative, the matching is wrong."""
    L = np.asarray(L, dtype=float)
    if L.ndim != 2 or 0 in L.shape or not np.isfinite(L).all():
        raise ValueError(
            f"the cross-evaluation matrix must be a finite 2-D [types, policies] array, got {L.shape}"
        )
    c = np.ones(len(L)) if type_weights is None else np.asarray(type_weights, dtype=float)
    if c.shape != (len(L),) or (c < 0).any():
        raise ValueError(f"type_weights must be {len(L)} non-negative numbers, got {type_weights}")
    if matching is None:
        best = L.max(1)
    else:
        m = np.asarray(matching)
        if (
            m.shape != (len(L),)
            or not np.issubdtype(m.dtype, np.integer)
            or (m < 0).any()
            or (m >= L.shape[1]).any()
        ):
            raise ValueError(
                f"matching must give each of the {len(L)} types a policy index in [0, {L.shape[1]}), got {matching}"
            )
        best = L[np.arange(len(L)), m]
    R = c[:, None] * (best[:, None] - L)
    scale = max(np.abs(L).max(), 1e-12)
    if (R < -tolerance * scale).any():
        i, j = np.unravel_index(np.argmin(R), R.shape)
        raise ValueError(
            f"negative regret {R[i, j]:.6g}: policy {j} serves type {i} better than its matched policy "
            f"{matching[i]} (a regret is measured against the type's best policy; fix the matching)"
        )
    return np.maximum(R, 0.0)


def solve_omw(R, iterations: int = 20_000, step_size: float | None = None) -> np.ndarray:
    """min_w max_i (R w)_i by optimistic Hedge for both players; returns the average of w's iterates.

    Both players run follow-the-regularized-leader with entropy, adding the last payoff once more as a
    prediction of the next (optimism), which makes the averaged iterates converge at rate O(1/T).
    """
    R = np.asarray(R, dtype=float)
    scale = max(np.abs(R).max(), 1e-12)
    eta = (0.1 if step_size is None else step_size) / scale
    n_rows, n_cols = R.shape
    w, p = np.full(n_cols, 1 / n_cols), np.full(n_rows, 1 / n_rows)
    col_loss, row_gain = np.zeros(n_cols), np.zeros(n_rows)  # cumulative payoffs
    last_loss, last_gain = np.zeros(n_cols), np.zeros(n_rows)
    w_sum = np.zeros(n_cols)
    for _ in range(iterations):
        w_sum += w
        loss, gain = R.T @ p, R @ w  # the column player pays, the row player receives
        col_loss += loss
        row_gain += gain
        last_loss, last_gain = loss, gain
        logits_w, logits_p = -eta * (col_loss + last_loss), eta * (row_gain + last_gain)
        w = np.exp(logits_w - logits_w.max())
        w /= w.sum()
        p = np.exp(logits_p - logits_p.max())
        p /= p.sum()
    return w_sum / iterations


def solve_lp(R) -> tuple[np.ndarray, float]:
    """Exact min_w max_i (R w)_i as a linear program: minimize t s.t. R w ≤ t, Σ w = 1, w ≥ 0."""
    from scipy.optimize import linprog  # lazy: scipy is needed only for the exact check

    R = np.asarray(R, dtype=float)
    n_rows, n_cols = R.shape
    cost = np.r_[np.zeros(n_cols), 1.0]
    upper = np.c_[R, -np.ones(n_rows)]
    equal = np.r_[np.ones(n_cols), 0.0][None]
    bounds = [(0, None)] * n_cols + [(None, None)]
    out = linprog(
        cost, A_ub=upper, b_ub=np.zeros(n_rows), A_eq=equal, b_eq=[1.0], bounds=bounds, method="highs"
    )
    if not out.success:
        raise RuntimeError(f"the min-max-regret LP failed: {out.message}")
    w = np.clip(out.x[:n_cols], 0, None)
    return w / w.sum(), float(out.x[-1])


def min_max_regret(
    L, type_weights=None, solver: str = "omw", iterations: int = 20_000, matching=None
) -> dict:
    """Solve MMRA for cross-evaluation matrix L [types, policies] -> weights over the policies, each type's
    regret (against its best available policy, or `matching`'s), the max, and the exact LP's value."""
    R = regret_matrix(L, type_weights, matching)
    lp_weights, lp_value = solve_lp(R)
    if solver == "omw":
        weights = solve_omw(R, iterations)
    elif solver == "lp":
        weights = lp_weights
    else:
        raise ValueError(f"solver must be 'omw' or 'lp', got {solver!r}")
    regrets = R @ weights
    return {
        "weights": weights.tolist(),
        "regrets": regrets.tolist(),
        "max_regret": float(regrets.max()),
        "lp_weights": lp_weights.tolist(),
        "lp_max_regret": lp_value,
        "regret_matrix": R.tolist(),
        "cross_evaluation": np.asarray(L, dtype=float).tolist(),
    }


# ---------------------------------------------------------------- cross-evaluation


def _logps(model, tokenizer, prompts, responses, batch_size) -> torch.Tensor:
    """[P, S] summed log-probs of responses[p][s] given prompts[p] under `model` as it is now."""
    records = [
        SimpleNamespace(prompt=p, responses=r, ranking=[], annotator=None, weight=1.0)
        for p, r in zip(prompts, responses)
    ]
    encoded = encode_records(tokenizer, records)
    pad = pad_token_id(tokenizer)
    values = precompute_reference_logps(
        model, encoded, batch_size=batch_size, pad_token_id=pad, desc="log-probs"
    )
    return torch.tensor(values, dtype=torch.float32)


def implicit_rewards(model, tokenizer, prompts, responses, adapters, beta, batch_size=32) -> torch.Tensor:
    """[K, P, S] implicit rewards β·(log π_k(y|x) − log π_ref(y|x)); π_ref = the base with adapters disabled."""
    with model.disable_adapter():
        reference = _logps(model, tokenizer, prompts, responses, batch_size)
    out = []
    for name in adapters:
        model.set_adapter(name)
        out.append(beta * (_logps(model, tokenizer, prompts, responses, batch_size) - reference))
    return torch.stack(out)


def cross_evaluation(
    model,
    tokenizer,
    prompts,
    adapters,
    *,
    beta=0.1,
    reward_fns: Sequence[Callable] | None = None,
    n_samples=4,
    max_new_tokens=48,
    temperature=1.0,
    seed=0,
    batch_size=64,
):
    """-> (L [K or len(reward_fns), K], samples): L[i, j] = mean reward i over samples of adapter j on `prompts`.

    reward_fns[i](prompt, response) -> float gives ground-truth rewards; None uses the implicit rewards.
    samples[j] = responses [P][n_samples] drawn from adapter j.
    """
    samples = []
    for j, name in enumerate(adapters):
        model.set_adapter(name)
        samples.append(
            generate_responses(
                model,
                tokenizer,
                prompts,
                n_per_prompt=n_samples,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                batch_size=batch_size,
                seed=seed + j,
            )
        )
    K = len(adapters)
    L = np.zeros((K if reward_fns is None else len(reward_fns), K))
    for j in range(K):
        if reward_fns is None:
            L[:, j] = (
                implicit_rewards(model, tokenizer, prompts, samples[j], adapters, beta).mean((1, 2)).numpy()
            )
        else:
            for i, reward in enumerate(reward_fns):
                L[i, j] = np.mean([reward(x, y) for x, ys in zip(prompts, samples[j]) for y in ys])
    return L, samples


# ---------------------------------------------------------------- the deployable mixture


class MixturePolicy:
    """One base model + K LoRA adapters; each response comes from adapter j with probability w_j."""

    def __init__(
        self,
        model,
        tokenizer,
        adapters: Sequence[str],
        weights: Sequence[float],
        base_model: dict | None = None,
    ):
        weights = np.asarray(weights, dtype=float)
        if (
            len(weights) != len(adapters)
            or (weights < 0).any()
            or not np.isclose(weights.sum(), 1.0, atol=1e-6)
        ):
            raise ValueError(
                f"weights must be a probability vector over {len(adapters)} adapters, got {weights}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.adapters, self.weights = list(adapters), weights / weights.sum()
        self.base_model = base_model  # ModelConfig fields, to rebuild the base when loading

    def generate(self, prompts, n_per_prompt=1, seed=0, **kwargs) -> list[list[str]]:
        """Like `generate_responses`: one list of `n_per_prompt` strings per prompt, each from a drawn adapter."""
        rng = np.random.default_rng(seed)
        choice = rng.choice(len(self.adapters), size=(len(prompts), n_per_prompt), p=self.weights)
        out = [[""] * n_per_prompt for _ in prompts]
        for j, name in enumerate(self.adapters):
            jobs = np.argwhere(choice == j)
            if len(jobs) == 0:
                continue
            self.model.set_adapter(name)
            texts = generate_responses(
                self.model, self.tokenizer, [prompts[p] for p, _ in jobs], seed=seed + 1 + j, **kwargs
            )
            for (p, s), (text,) in zip(jobs, texts):
                out[p][s] = text
        return out

    def save(self, path) -> Path:
        path = Path(path)
        self.model.save_pretrained(
            path / "adapters", selected_adapters=self.adapters, safe_serialization=True
        )
        self.tokenizer.save_pretrained(path / "tokenizer")
        meta = {"adapters": self.adapters, "weights": self.weights.tolist(), "base_model": self.base_model}
        (path / "mixture.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path, base_model=None) -> MixturePolicy:
        """Rebuild from `save`'s directory; the base comes from `base_model` or the saved ModelConfig fields."""
        path = Path(path)
        if not (path / "mixture.json").is_file():
            raise FileNotFoundError(f"{path} is not a saved MixturePolicy (no mixture.json)")
        meta = json.loads((path / "mixture.json").read_text())
        if base_model is None:
            if not meta.get("base_model"):
                raise ValueError(f"{path}/mixture.json names no base model; pass base_model=")
            base_model = load_base_model(build(ModelConfig, {**meta["base_model"], "lora": {}}))
        model = load_adapters(base_model, path / "adapters", meta["adapters"])
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        return cls(model.eval(), tokenizer, meta["adapters"], meta["weights"], meta.get("base_model"))


# ---------------------------------------------------------------- `prefalign aggregate RUN_DIR`


def aggregate_run(
    run_dir,
    n_prompts: int = 64,
    n_samples: int = 4,
    max_new_tokens: int = 48,
    type_weights=None,
    solver: str = "omw",
    seed: int = 0,
) -> dict:
    """Aggregate an EM-DPO run: cross-evaluate its adapters with implicit rewards on the run's training
    prompts, solve MMRA, save the MixturePolicy to RUN_DIR/mixture and the numbers to RUN_DIR/aggregate.json."""
    run_dir = Path(run_dir)
    cfg, model, tokenizer, adapters = em.load_run(run_dir)
    prompts = json.loads((run_dir / "final" / "prompts.json").read_text())
    rng = np.random.default_rng(seed)
    prompts = [
        prompts[i] for i in sorted(rng.choice(len(prompts), size=min(n_prompts, len(prompts)), replace=False))
    ]
    L, _ = cross_evaluation(
        model,
        tokenizer,
        prompts,
        adapters,
        beta=cfg.loss.beta,
        n_samples=n_samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    result = min_max_regret(L, type_weights, solver)
    base = {k: v for k, v in dataclasses.asdict(cfg)["model"].items() if k not in ("lora", "reference")}
    MixturePolicy(model, tokenizer, adapters, result["weights"], base).save(run_dir / "mixture")
    result = {"adapters": adapters, "n_prompts": len(prompts), "n_samples": n_samples, **result}
    (run_dir / "aggregate.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
