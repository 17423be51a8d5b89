"""`prefalign demo em-dpo`: the claims of Chidambaram et al. (arXiv 2405.15065), where they can be shown.

bandit   (`em_dpo_bandit.py`) the paper's own linear-logit setting, exact: identifiability (binary vs ternary
         vs top-1-of-3 vs 8 pairs per annotator, several annotator counts, at least 3 seeds) and fairness
         (pooled DPO vs EM-DPO + min-max-regret aggregation, 60/30/10 types). It runs in a second process
         while the reviews part trains (it is numpy/torch arithmetic; the two fit on 2 cores).
reviews  (`em_dpo_reviews.py`) the same EM-DPO on tiny language models: one ternary ranking per annotator with
         cross-fitting (held-out vs in-sample log-likelihood, i.e. the memorisation) and fairness with oracle
         per-type policies.

summary.json: `bandit.identifiability.<design>.<annotators>.<metric>` (mean; `<metric>_std`; per_seed),
`bandit.fairness.{pooled_dpo,mmra}.max_regret`, `reviews.memorisation.<metric>`,
`reviews.fairness.{pooled_dpo,mmra,mmra_implicit}.max_regret`, and `claims` (one entry per claim: `holds`,
`sentence`); report.md repeats each claim as one sentence with its numbers, then the tables and plots.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from prefalign.core.report import mean_std, plot_lines, pyplot, save_figure, write_report, write_summary
from prefalign.demos import em_dpo_bandit as bandit
from prefalign.demos import em_dpo_reviews as reviews
from prefalign.demos.em_dpo_claims import claims, report_sections
from prefalign.demos.em_dpo_reviews import em_config  # noqa: F401  (re-exported: the demo's EM config)
from prefalign.worlds.reviews import ReviewsWorld


def run(
    out_dir: Path, quick: bool = False, seeds: list[int] | None = None, sizes: dict | None = None
) -> dict:
    """`sizes` = {"bandit": {...}, "reviews": {...}} overrides the settings (tests run a miniature demo)."""
    seeds, out_dir, started, sizes = seeds or [0], Path(out_dir), time.time(), sizes or {}
    bandit_seeds = sorted(set(seeds) | {0, 1, 2})  # exact and cheap: always at least 3 seeds
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        bandit_part = pool.submit(bandit.run, quick, bandit_seeds, sizes.get("bandit"))
        reviews_part = run_reviews(out_dir, quick, seeds, sizes.get("reviews"))
        bandit_part = bandit_part.result()
    summary = {"quick": quick, "seeds": seeds, "seconds": round(time.time() - started, 1),
               "bandit": bandit_part, "reviews": reviews_part}  # fmt: skip
    summary["claims"] = claims(summary)
    plot(out_dir, summary)
    write_summary(out_dir, summary)
    write_report(out_dir, "EM-DPO and min-max-regret aggregation", report_sections(summary))
    return summary


def run_reviews(out_dir: Path, quick: bool, seeds: list[int], overrides: dict | None = None) -> dict:
    s, started = {**reviews.settings(quick), **(overrides or {})}, time.time()
    world = ReviewsWorld(seed=0, quick=quick)
    base, tokenizer = world.reference()
    memo, fair = [], []
    for seed in seeds:
        memo.append(reviews.memorisation(world, base, tokenizer, seed, s, out_dir / f"memorisation-{seed}"))
        fair.append(reviews.fairness(world, base, tokenizer, seed, s, out_dir / f"fairness-{seed}"))
    out = {"settings": s, "seeds": seeds, "memorisation": bandit.summarize(memo), "fairness": {}}
    for method in ("pooled_dpo", "mmra", "mmra_implicit"):
        values = [r[method]["max_regret"] for r in fair]
        out["fairness"][method] = {
            "max_regret": mean_std(values)[0],
            "max_regret_std": mean_std(values)[1],
            "max_regret_per_seed": values,
            "true_reward": {
                t: float(np.mean([r[method]["true_reward"][t] for r in fair])) for t in reviews.UNEQUAL
            },
            "regret": {t: float(np.mean([r[method]["regret"][t] for r in fair])) for t in reviews.UNEQUAL},
        }
    out["fairness"]["per_seed"] = fair
    out["seconds"] = round(time.time() - started, 1)
    return out


def plot(out_dir: Path, summary: dict) -> None:
    ident = summary["bandit"]["identifiability"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for design, by_count in ident.items():
        x = [int(c) for c in by_count]
        y = np.array([by_count[str(c)]["mixture_error"] for c in x])
        b = np.array([by_count[str(c)]["mixture_error_std"] for c in x])
        ax.plot(x, y, marker="o", ms=3, label=design)
        ax.fill_between(x, y - b, y + b, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("annotators (one record each; binary_8_per_annotator: eight)")
    ax.set_ylabel("mixture error (0 = recovered, 1 = nothing)")
    ax.set_title("bandit, +w / -w at 50/50 (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out_dir / "bandit_mixture_error.png")
    first = summary["reviews"]["memorisation"]["per_seed"][0]
    iterations = [h["iteration"] for h in first["history"]]
    U = summary["reviews"]["settings"]["annotators"]
    curves = {
        "held-out (cross-fitted E-step)": (
            iterations,
            [h["em/log_likelihood"] / U for h in first["history"]],
        ),
        "in-sample": (
            iterations,
            [h.get("em/log_likelihood_in_sample", np.nan) / U for h in first["history"]],
        ),
        "truth": (iterations, [first["loglik_truth"]] * len(iterations)),
        "indifferent population": (iterations, [first["loglik_indifferent"]] * len(iterations)),
    }
    plot_lines(out_dir / "reviews_loglik.png", curves, "EM iteration", "log-likelihood per annotator",
               "reviews, one ternary ranking per annotator", markers=True)  # fmt: skip
