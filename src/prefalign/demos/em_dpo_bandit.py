"""The bandit half of `prefalign demo em-dpo`: the paper's own setting, where every quantity is exact.

identifiability  two exactly opposite types +w / −w at 50/50 in a linear-logit contextual bandit; four data
                 designs (one pair, one full ternary ranking, the top choice of 3, or 8 pairs per annotator)
                 at several annotator counts; EM-DPO (the library's E-step and listwise loss, exact M-step)
                 run to its log-likelihood plateau with restarts; the recovered MIXTURE is compared with the
                 truth (`methods.em_dpo.recovery`).
fairness         three types 60/30/10 (w: +e1, +e2, −e1), 8 ternary rankings per annotator: pooled listwise
                 DPO vs EM-DPO + min-max-regret aggregation, regret measured with the true rewards against
                 each type's best available policy (oracle per-type policies included).
"""

from __future__ import annotations

import time

import numpy as np

from prefalign.core.report import mean_std
from prefalign.worlds.bandit import make_world, sample_preferences
from prefalign.worlds.bandit_em import fairness, linear_em, recovery_metrics

OPPOSITE = {"weights": [[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0]], "population": [0.5, 0.5]}
UNEQUAL = {
    "names": ["enthusiast", "concise", "critic"],
    "weights": [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-2.0, 0.0, 0.0]],
    "population": [0.6, 0.3, 0.1],
}
DESIGNS = {
    "binary": {"n_shown": 2},
    "ternary": {"n_shown": 3},
    "top1_of_3": {"n_shown": 3, "n_ranked": 1},
    "binary_8_per_annotator": {"n_shown": 2, "per_annotator": 8},
}
WORLD = {"n_contexts": 20, "n_candidates": 5}
BETA, TEMPERATURE = 1.0, 1.0
# EM from a small random start (θ_k ~ N(0, 0.1² I)): off the symmetric point, but with no reward scale of
# its own, so the types move only as far as the likelihood pulls them (docs/em_dpo.md, "bandit")
EM = {"init": "random", "init_scale": 0.1, "tolerance": 1e-6}


def settings(quick: bool) -> dict:
    # three types have more local optima than two (measured: a 2-type solution that misses the 10% type,
    # found from 4 of 6 small starts on one seed), so the fairness EM gets more restarts
    if quick:
        return {"annotators": [1000, 4000], "restarts": 3, "max_iterations": 200, "fair_annotators": 500,
                "fair_restarts": 6}  # fmt: skip
    return {"annotators": [1000, 4000, 16000], "restarts": 4, "max_iterations": 500, "fair_annotators": 1000,
            "fair_restarts": 8}  # fmt: skip


def identifiability(s: dict, seeds: list[int]) -> dict:
    """{design: {annotators: {metric: mean, metric_std, per_seed: [...]}}}"""
    world = make_world(**WORLD, type_weights=OPPOSITE["weights"], population=OPPOSITE["population"], seed=0)
    out: dict = {}
    for design, kwargs in DESIGNS.items():
        out[design] = {}
        for U in s["annotators"]:
            rows = []
            for seed in seeds:
                prefs = sample_preferences(world, U, temperature=TEMPERATURE, seed=seed, **kwargs)
                fit = linear_em(world, prefs, 2, beta=BETA, restarts=s["restarts"],
                                max_iterations=s["max_iterations"], seed=seed, **EM)  # fmt: skip
                rows.append(recovery_metrics(world, prefs, fit, TEMPERATURE))
            out[design][str(U)] = summarize(rows)
    return out


def summarize(rows: list[dict]) -> dict:
    """Mean and std over seeds of every number; the rows themselves under per_seed."""
    out: dict = {}
    for key, value in rows[0].items():
        if isinstance(value, (bool, int, float)) and not isinstance(value, bool):
            out[key], out[f"{key}_std"] = mean_std([r[key] for r in rows])
    if "converged" in rows[0]:
        out["converged"] = sum(r["converged"] for r in rows) / len(rows)
    out["per_seed"] = rows
    return out


def fairness_experiment(s: dict, seeds: list[int]) -> dict:
    world = make_world(**WORLD, type_weights=UNEQUAL["weights"], population=UNEQUAL["population"], seed=0)
    rows = []
    for seed in seeds:
        prefs = sample_preferences(world, s["fair_annotators"], per_annotator=8, n_shown=3, seed=seed)
        fit = linear_em(world, prefs, 3, beta=BETA, restarts=s["fair_restarts"], max_iterations=s["max_iterations"],
                        seed=seed, **EM)  # fmt: skip
        recovery = recovery_metrics(world, prefs, fit, TEMPERATURE)
        row = fairness(world, prefs, fit, BETA, TEMPERATURE)
        # MMRA's weights on the EM policies, listed by the true type each policy was matched to
        row["mmra"]["weights_by_type"] = [row["mmra"]["weights"][m] for m in recovery["matching"]]
        row["em"] = {
            k: recovery[k] for k in ("mixture_error", "weight_error", "ari", "oracle_ari", "iterations")
        }
        rows.append(row)
    out = {"types": UNEQUAL["names"], "population": UNEQUAL["population"], "annotators": s["fair_annotators"],
           "per_seed": rows}  # fmt: skip
    for method in ("pooled_dpo", "mmra"):
        values = [r[method]["max_regret"] for r in rows]
        out[method] = {"max_regret": mean_std(values)[0], "max_regret_std": mean_std(values)[1],
                       "max_regret_per_seed": values,
                       "regret": np.mean([r[method]["regret"] for r in rows], 0).tolist()}  # fmt: skip
    out["mmra_below_pooled_every_seed"] = all(
        r["mmra"]["max_regret"] < r["pooled_dpo"]["max_regret"] for r in rows
    )
    return out


def run(quick: bool, seeds: list[int], overrides: dict | None = None) -> dict:
    """Both bandit experiments -> the `bandit` section of the demo's summary (`overrides`: sizes, for tests)."""
    started, s = time.time(), {**settings(quick), **(overrides or {})}
    out = {"settings": {**s, **WORLD, "beta": BETA, "temperature": TEMPERATURE, "em": EM}, "seeds": seeds}
    out["identifiability"] = identifiability(s, seeds)
    out["fairness"] = fairness_experiment(s, seeds)
    out["seconds"] = round(time.time() - started, 1)
    return out
