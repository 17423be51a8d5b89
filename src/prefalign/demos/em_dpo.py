"""`prefalign demo em-dpo`: the two experiments of Chidambaram et al. (arXiv 2405.15065) in the reviews world.

identifiability  two exactly opposite types (enthusiast / critic) 50/50, ONE ranking per annotator, binary
                 vs ternary rankings at equal annotator count. Measured: |correlation| between each recovered
                 type's implicit reward and the best-matching true reward on held-out reference samples,
                 whether the two recovered types point in opposite directions, and the mixture-weight error.
fairness         three types of unequal sizes, ternary rankings, several per annotator: pooled listwise DPO
                 (one policy for everyone) vs EM-DPO + min-max-regret aggregation. Regret of true type t for a
                 policy π = max_j J_t(π_j) − J_t(π) over the EM type policies π_j (J_t = mean true reward).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.logprobs import generate_responses
from prefalign.core.report import markdown_table, mean_std, plot_bars, plot_lines, write_report, write_summary
from prefalign.losses.lm import ranking_log_likelihood
from prefalign.methods import dpo
from prefalign.methods.em_dpo import em as em_dpo
from prefalign.methods.em_dpo.aggregate import cross_evaluation, implicit_rewards, min_max_regret
from prefalign.worlds.reviews import TYPES, ReviewsWorld, true_reward

OPPOSITE = {"enthusiast": 0.5, "critic": 0.5}
UNEQUAL = {"enthusiast": 0.6, "concise": 0.3, "critic": 0.1}
METHODS = (
    "pooled_dpo",
    "mmra",
    "mmra_implicit",
)  # mmra: true-reward cross-evaluation; _implicit: β·log-ratio
BETA = 0.1
# Plackett-Luce temperature of the simulated annotators. At the world's default 1.0 (rewards in [-1, 1]) even
# the oracle that knows both true rewards classifies ternary annotators at ARI 0.15 (1 record) / 0.68 (8);
# at 0.25 it reaches 0.68 / 1.0 (see `oracle_ceiling` and docs/em_dpo.md).
TEMPERATURE = 0.25
LEARNING_RATE = 3e-3  # full fine-tuning of each type copy (and of the pooled DPO baseline)
INIT = "whitened"  # k-means on noise-whitened preference directions (docs/em_dpo.md, round 4)


def settings(quick: bool) -> dict:
    if quick:
        return dict(quick=True, annotators=320, iterations=2, fair_annotators=200, per_annotator=8, samples=4)
    return dict(quick=False, annotators=1600, iterations=4, fair_annotators=240, per_annotator=8, samples=8)


def em_config(out_dir, K, iterations, seed, init=INIT, quick=False) -> em_dpo.Config:
    # the saved config names the reference the run started from, so `prefalign aggregate` rebuilds the same one
    model = "world:reviews-quick" if quick else "world:reviews"
    return build(
        em_dpo.Config,
        {
            "model": {"name_or_path": model, "lora": {"enabled": True, "r": 8, "alpha": 16}},
            "data": {"max_length": 64, "max_prompt_length": 16},
            # full copies: on this 117K-parameter model LoRA DPO learns a much weaker reward (docs/em_dpo.md)
            "em": {
                "n_types": K,
                "max_iterations": iterations,
                "m_step": "stochastic",
                "init": init,
                "adapter": "full",
                # score each annotator on the records not just fitted (full copies overfit their own annotators)
                "holdout": True,
            },
            "loss": {"beta": BETA},
            "train": {
                "output_dir": str(out_dir),
                "seed": seed,
                "epochs": 1.0,
                "batch_size": 16,
                "learning_rate": LEARNING_RATE,
                "warmup_steps": 5,
                "log_every": 10,
                "progress": True,
            },
        },
    )


def oracle_ceiling(records, types: dict, population: dict, temperature: float) -> dict:
    """Bayes classification of each annotator's type with the TRUE rewards (prior = population): the ceiling
    any EM can reach on this data. -> {accuracy, ari}."""
    names, index = em_dpo.annotator_index(records)
    n = max(len(r.responses) for r in records)
    pad = lambda row, fill: list(row) + [fill] * (n - len(row))  # noqa: E731
    ranking = torch.tensor([pad(r.ranking, -1) for r in records])
    present = torch.tensor([pad([True] * len(r.responses), False) for r in records])
    loglik = torch.stack(
        [
            ranking_log_likelihood(
                torch.tensor([pad(true_reward(t, r.responses) / temperature, 0.0) for r in records]),
                ranking,
                present,
            )
            for t in population
        ],
        -1,
    ).double()
    gamma, _, _ = em_dpo.e_step(loglik, index, len(names), torch.tensor(list(population.values())))
    truth = [list(population).index(types[u]) for u in names]
    guess = gamma.argmax(1).tolist()
    return {
        "accuracy": float(np.mean(np.array(guess) == np.array(truth))),
        "ari": float(adjusted_rand_score(truth, guess)),
    }


def heldout_reward_match(result, tokenizer, world, true_types: list[str], seed: int) -> dict:
    """Correlation of each recovered type's implicit reward with each true reward on held-out reference samples."""
    reference = result.model
    with reference.disable_adapter():
        samples = generate_responses(
            reference, tokenizer, world.eval_prompts * 4, n_per_prompt=4, seed=seed + 7
        )
    prompts = world.eval_prompts * 4
    rewards = implicit_rewards(result.model, tokenizer, prompts, samples, result.adapters, BETA)
    flat = [y for ys in samples for y in ys]
    truth = np.stack([true_reward(t, flat) for t in true_types])
    corr = np.array([[np.corrcoef(r.reshape(-1).numpy(), tr)[0, 1] for tr in truth] for r in rewards])
    corr = np.nan_to_num(corr)
    rows, cols = linear_sum_assignment(-np.abs(corr))  # match recovered types to true types
    return {"corr": corr, "match": dict(zip(rows.tolist(), cols.tolist()))}


def train_em(cfg, records, base, tokenizer, types):
    """EM-DPO through the runner -> an EMResult-like view (model, adapters, eta, history)."""
    res = runner.run(cfg, records=records, model=copy.deepcopy(base), tokenizer=tokenizer, true_types=types)
    adapters = [f"type{k}" for k in range(cfg.em.n_types)]
    return SimpleNamespace(model=res.model, adapters=adapters, eta=np.array(res.summary["type_weights"]),
                           history=[h for h in res.history if "iteration" in h])  # fmt: skip


def identifiability(world, base, tokenizer, n_responses: int, seed: int, s: dict, out_dir: Path) -> dict:
    records, types = world.preference_data(
        world.train_prompts * (s["annotators"] // len(world.train_prompts) + 1),
        OPPOSITE,
        n_responses=n_responses,
        records_per_annotator=1,
        temperature=TEMPERATURE,
        seed=seed,
    )
    records = records[: s["annotators"]]
    types = {r.annotator: types[r.annotator] for r in records}
    oracle = oracle_ceiling(records, types, OPPOSITE, TEMPERATURE)
    cfg = em_config(out_dir, 2, s["iterations"], seed, quick=s["quick"])
    result = train_em(cfg, records, base, tokenizer, types)
    match = heldout_reward_match(result, tokenizer, world, list(OPPOSITE), seed)
    corr = match["corr"]
    eta = result.eta
    # policy-level recovery: true enthusiast reward of samples from each type policy (opposite types -> a gap)
    G, _ = cross_evaluation(
        result.model,
        tokenizer,
        world.eval_prompts * 2,
        result.adapters,
        reward_fns=[lambda x, y: true_reward("enthusiast", [y])[0]],
        n_samples=s["samples"],
        seed=seed + 1,
    )
    return {
        "reward_corr": float(np.abs(corr).max(1).mean()),
        "policy_enthusiast_reward": G[0].tolist(),
        "policy_gap": float(G[0].max() - G[0].min()),
        "opposite_directions": bool(
            np.sign(corr[0, 0]) != np.sign(corr[1, 0]) and min(abs(corr[:, 0])) > 0.2
        ),
        "weight_error": float(
            0.5 * sum(abs(eta[k] - OPPOSITE[list(OPPOSITE)[t]]) for k, t in match["match"].items())
        ),
        "ari": result.history[-1].get("em/ari"),
        "oracle_ari": oracle["ari"],
        "oracle_accuracy": oracle["accuracy"],
        "corr_matrix": corr.tolist(),
        "eta": eta.tolist(),
        "history": result.history,
    }


def fairness(world, base, tokenizer, seed: int, s: dict, out_dir: Path) -> dict:
    n = s["fair_annotators"]
    prompts = world.train_prompts * (n * s["per_annotator"] // len(world.train_prompts) + 1)
    records, types = world.preference_data(
        prompts[: n * s["per_annotator"]],
        UNEQUAL,
        n_responses=3,
        records_per_annotator=s["per_annotator"],
        temperature=TEMPERATURE,
        seed=seed,
    )
    oracle = oracle_ceiling(records, types, UNEQUAL, TEMPERATURE)
    cfg = em_config(out_dir / "em", 3, s["iterations"], seed, quick=s["quick"])
    result = train_em(
        cfg, records, base, tokenizer, types
    )  # its run directory is one `prefalign aggregate` takes
    model, adapters = result.model, result.adapters
    names = list(UNEQUAL)
    reward_fns = [lambda x, y, f=TYPES[t]: f(y) for t in names]
    # MMRA on the training prompts, cross-evaluated by the TRUE type rewards (this world knows them; deployed)
    # and by the implicit rewards (what `prefalign aggregate` can do without ground truth; reported alongside)
    L_true, _ = cross_evaluation(
        model,
        tokenizer,
        world.train_prompts,
        adapters,
        reward_fns=reward_fns,
        n_samples=s["samples"],
        seed=seed,
    )
    L_implicit, _ = cross_evaluation(
        model, tokenizer, world.train_prompts, adapters, beta=BETA, n_samples=s["samples"], seed=seed
    )
    mmra, mmra_implicit = min_max_regret(L_true), min_max_regret(L_implicit)
    G, _ = cross_evaluation(
        model,
        tokenizer,
        world.eval_prompts * 2,
        adapters,
        reward_fns=reward_fns,
        n_samples=s["samples"],
        seed=seed + 1,
    )  # G[t, j]: true type t's reward of adapter j
    # pooled listwise DPO on the same data, full fine-tuning and the same number of passes over the data
    pooled_cfg = build(
        dpo.Config,
        {
            "model": {"name_or_path": cfg.model.name_or_path},
            "data": {"max_length": 64, "max_prompt_length": 16},
            "loss": {"name": "plackett_luce", "beta": BETA},
            "train": {
                "output_dir": str(out_dir / "pooled"),
                "seed": seed,
                "epochs": float(s["iterations"]),
                "batch_size": 16,
                "learning_rate": LEARNING_RATE,
                "warmup_steps": 5,
                "log_every": 10,
                "resume": False,
            },
        },
    )
    # full fine-tuning, like the EM type copies
    pooled = runner.run(
        pooled_cfg, records=records, eval_records=[], model=copy.deepcopy(base), tokenizer=tokenizer
    ).model
    pooled = em_dpo.TypeCopies(pooled, ["type0"])  # adapter interface for cross_evaluation
    P, _ = cross_evaluation(
        pooled,
        tokenizer,
        world.eval_prompts * 2,
        ["type0"],
        reward_fns=reward_fns,
        n_samples=s["samples"],
        seed=seed + 1,
    )
    best = G.max(1)  # regret on held-out prompts: J_t(best EM type policy for t) − J_t(π)
    mixture_reward = G @ np.asarray(mmra["weights"])
    implicit_reward = G @ np.asarray(mmra_implicit["weights"])
    return {
        "pooled_dpo": {
            "max_regret": float((best - P[:, 0]).max()),
            "true_reward": dict(zip(names, P[:, 0].tolist())),
            "regret": dict(zip(names, (best - P[:, 0]).tolist())),
        },
        "mmra": {
            "max_regret": float((best - mixture_reward).max()),
            "true_reward": dict(zip(names, mixture_reward.tolist())),
            "regret": dict(zip(names, (best - mixture_reward).tolist())),
            "weights": mmra["weights"],
            "train_max_regret": mmra["max_regret"],
            "lp_max_regret": mmra["lp_max_regret"],
        },
        "mmra_implicit": {
            "max_regret": float((best - implicit_reward).max()),
            "true_reward": dict(zip(names, implicit_reward.tolist())),
            "regret": dict(zip(names, (best - implicit_reward).tolist())),
            "weights": mmra_implicit["weights"],
            "train_max_regret": mmra_implicit["max_regret"],
        },
        "em": {
            "ari": result.history[-1].get("em/ari"),
            "oracle_ari": oracle["ari"],
            "eta": result.eta.tolist(),
            "true_reward_by_adapter": G.tolist(),
        },
    }


def run(out_dir: Path, quick: bool = False, seeds: list[int] | None = None) -> dict:
    seeds, s, out_dir = seeds or [0], settings(quick), Path(out_dir)
    world = ReviewsWorld(seed=0, quick=quick)
    base, tokenizer = world.reference()
    started = time.time()
    runs = {"binary": [], "ternary": [], "fairness": []}
    for seed in seeds:
        for name, n_responses in (("binary", 2), ("ternary", 3)):
            runs[name].append(
                identifiability(world, base, tokenizer, n_responses, seed, s, out_dir / f"{name}-{seed}")
            )
        runs["fairness"].append(fairness(world, base, tokenizer, seed, s, out_dir / f"fairness-{seed}"))

    def agg(rows, *keys):
        values = [r for r in rows]
        for k in keys:
            values = [v[k] for v in values]
        return mean_std(values)

    summary = {
        "quick": quick,
        "seeds": seeds,
        "settings": s,
        "seconds": round(time.time() - started, 1),
        "identifiability": {},
        "fairness": {},
    }
    for name in ("binary", "ternary"):
        rows = runs[name]
        summary["identifiability"][name] = {
            "reward_corr": agg(rows, "reward_corr")[0],
            "reward_corr_std": agg(rows, "reward_corr")[1],
            "policy_gap": agg(rows, "policy_gap")[0],
            "policy_gap_std": agg(rows, "policy_gap")[1],
            "weight_error": agg(rows, "weight_error")[0],
            "opposite_directions": sum(r["opposite_directions"] for r in rows) / len(rows),
            "ari": agg(rows, "ari")[0],
            "oracle_ari": agg(rows, "oracle_ari")[0],
            "oracle_accuracy": agg(rows, "oracle_accuracy")[0],
            "per_seed": rows,
        }
    for method in METHODS:
        rows = runs["fairness"]
        summary["fairness"][method] = {
            "max_regret": agg(rows, method, "max_regret")[0],
            "max_regret_std": agg(rows, method, "max_regret")[1],
            "true_reward": {t: agg(rows, method, "true_reward", t)[0] for t in UNEQUAL},
            "regret": {t: agg(rows, method, "regret", t)[0] for t in UNEQUAL},
        }
    for method in ("mmra", "mmra_implicit"):
        summary["fairness"][method]["weights"] = [r[method]["weights"] for r in runs["fairness"]]
    summary["fairness"]["em"] = [r["em"] for r in runs["fairness"]]
    write_summary(out_dir, summary)
    write_report(
        out_dir,
        "EM-DPO and min-max-regret aggregation (reviews world)",
        report_sections(summary, runs, out_dir),
    )
    return summary


def report_sections(summary, runs, out_dir: Path) -> list[str]:
    ident, fair = summary["identifiability"], summary["fairness"]
    rows = [
        {
            "data": name,
            "reward_corr": (ident[name]["reward_corr"], ident[name]["reward_corr_std"]),
            "policy gap": (ident[name]["policy_gap"], ident[name]["policy_gap_std"]),
            "opposite types found": ident[name]["opposite_directions"],
            "weight error": ident[name]["weight_error"],
            "ARI": ident[name]["ari"],
            "oracle ARI (ceiling)": ident[name]["oracle_ari"],
        }
        for name in ("binary", "ternary")
    ]
    curves = {}
    for name in ("binary", "ternary"):
        hist = runs[name][0]["history"]
        curves[name] = (
            [h["iteration"] for h in hist],
            [h["em/log_likelihood"] / max(1, summary["settings"]["annotators"]) for h in hist],
        )
    plot_lines(
        out_dir / "identifiability_loglik.png",
        curves,
        "EM iteration",
        "log-likelihood per annotator",
        markers=True,
    )
    plot_bars(
        out_dir / "fairness_max_regret.png",
        {m: (fair[m]["max_regret"], fair[m]["max_regret_std"]) for m in METHODS},
        "max true-type regret",
    )
    fair_rows = [
        {
            "policy": m,
            "max regret": (fair[m]["max_regret"], fair[m]["max_regret_std"]),
            **{f"reward {t}": fair[m]["true_reward"][t] for t in UNEQUAL},
        }
        for m in METHODS
    ]
    return [
        f"Seeds: {summary['seeds']}; quick: {summary['quick']}; {summary['seconds']} s.",
        "## Identifiability: enthusiast vs critic 50/50, one ranking per annotator\n\n"
        "reward_corr = mean over recovered types of |corr| between its implicit reward and the best-matching true "
        "reward on held-out reference samples; policy gap = max − min over the type policies of the true enthusiast reward of their samples (opposite types recovered: large); weight error = total variation between recovered and true η.\n\n"
        + markdown_table(rows, list(rows[0]))
        + "\n\n![log-likelihood](identifiability_loglik.png)",
        f"## Fairness: population {UNEQUAL}, ternary rankings\n\n"
        "Regret of type t = best true reward of t among the EM type policies − t's true reward under the policy "
        "(held-out prompts). mmra: MMRA weights from true-reward cross-evaluation on the training prompts; "
        "mmra_implicit: from implicit-reward cross-evaluation (what `prefalign aggregate` does).\n\n"
        + markdown_table(fair_rows, list(fair_rows[0]))
        + "\n\n![max regret](fairness_max_regret.png)\n\n"
        f"MMRA weights per seed: {[np.round(w, 3).tolist() for w in fair['mmra']['weights']]}; implicit: "
        f"{[np.round(w, 3).tolist() for w in fair['mmra_implicit']['weights']]}",
    ]
