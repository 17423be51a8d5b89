"""The EM-DPO demo's claims, each checked on the measured numbers and said in one sentence, and its report."""

from __future__ import annotations

import numpy as np

from prefalign.core.report import markdown_table, pm

BAR = 0.15  # a mixture error below this counts as "recovered"; above 0.8 as "not recovered"
NOT_RECOVERED = 0.8


def _per_count(ident: dict, design: str, key: str = "mixture_error") -> str:
    by = ident[design]
    return ", ".join(f"{pm(by[c][key], by[c][key + '_std'])} at {c}" for c in by)


def claims(summary: dict) -> list[dict]:
    """[{claim, holds, sentence}] from the summary's numbers (the sentence carries them)."""
    out: list[dict] = []

    def claim(key: str, holds, sentence: str) -> None:
        out.append({"claim": key, "holds": bool(holds), "sentence": sentence})

    ident = summary["bandit"]["identifiability"]
    counts = list(ident["binary"])
    binary = [r for c in counts for r in ident["binary"][c]["per_seed"]]
    gap = max(abs(r["loglik_truth_minus_indifferent"]) for r in binary)
    claim(
        "bandit_binary_not_identified",
        gap < 1e-9 and all(ident["binary"][c]["mixture_error"] > NOT_RECOVERED for c in counts),
        "Bandit, one pair per annotator: the log-likelihood of the true mixture equals that of an indifferent "
        f"population (largest gap {gap:.1e} nats per annotator), and EM's mixture error is "
        f"{_per_count(ident, 'binary')} annotators (per seed {min(r['mixture_error'] for r in binary):.3f}–"
        f"{max(r['mixture_error'] for r in binary):.3f}; norm ratio "
        f"{np.mean([r['norm_ratio'] for r in binary]):.2f}).",
    )
    for design, what in (
        ("ternary", "one full ranking of 3 per annotator"),
        ("top1_of_3", "only the top choice of 3 per annotator"),
        ("binary_8_per_annotator", "8 pairs per annotator"),
    ):
        by = ident[design]
        claim(
            f"bandit_{design}_identified",
            by[counts[-1]]["mixture_error"] < BAR,
            f"Bandit, {what}: EM recovers the mixture (error < {BAR} at the largest count): mixture error "
            f"{_per_count(ident, design)} annotators, weight error {by[counts[-1]]['weight_error']:.3f}, ARI "
            f"{by[counts[-1]]['ari']:.2f} beside the oracle's {by[counts[-1]]['oracle_ari']:.2f}.",
        )
    same = [c for c in counts if ident["ternary"][c]["mixture_error"] < BAR < NOT_RECOVERED
            < ident["binary"][c]["mixture_error"]]  # fmt: skip
    claim(
        "bandit_ternary_beats_binary_at_equal_annotators",
        len(same) == len(counts),
        f"Bandit, at equal annotator counts ternary mixture error < {BAR} and binary > {NOT_RECOVERED} at "
        f"{same or 'no'} annotators (of {counts}).",
    )
    fair = summary["bandit"]["fairness"]
    claim(
        "bandit_mmra_below_pooled_every_seed",
        fair["mmra_below_pooled_every_seed"],
        f"Bandit, types 60/30/10, {fair['annotators']} annotators x 8 ternary rankings: EM-DPO + MMRA's max "
        f"regret {_seeds(fair['mmra']['max_regret_per_seed'])} vs pooled DPO's "
        f"{_seeds(fair['pooled_dpo']['max_regret_per_seed'])} per seed (EM mixture error "
        f"{_seeds([r['em']['mixture_error'] for r in fair['per_seed']])}).",
    )
    memo = summary["reviews"]["memorisation"]
    first = memo["per_seed"][0]["history"]
    U = summary["reviews"]["settings"]["annotators"]
    heldout = [h["em/log_likelihood"] / U for h in first]
    in_sample = [h.get("em/log_likelihood_in_sample", np.nan) / U for h in first]
    claim(
        "reviews_memorisation_visible",
        len(first) > 1 and in_sample[-1] - in_sample[0] > heldout[-1] - heldout[0],
        f"Reviews, {U} annotators x 1 ternary ranking, cross-fitted EM (seed {summary['reviews']['seeds'][0]}): "
        f"the in-sample log-likelihood per annotator goes {_arrow(in_sample)} while the held-out one goes "
        f"{_arrow(heldout)} (truth {memo['loglik_truth']:.3f}, indifferent {memo['loglik_indifferent']:.3f}); "
        f"EM stopped after {len(first)} iterations ({'plateau' if first[-1].get('em/plateau') else 'max'}).",
    )
    claim(
        "reviews_mixture_recovered",
        memo["mixture_error"] < BAR,
        f"Reviews, one ternary ranking per annotator: the language-model EM's mixture error is "
        f"{pm(memo['mixture_error'], memo['mixture_error_std'])} (norm ratio {memo['norm_ratio']:.2f}, "
        f"weight error {memo['weight_error']:.3f}), ARI {memo['ari']:.3f} beside the oracle's "
        f"{memo['oracle_ari']:.3f}.",
    )
    rf = summary["reviews"]["fairness"]
    per_seed = rf["per_seed"]
    claim(
        "reviews_mmra_below_pooled_every_seed",
        all(r["mmra"]["max_regret"] < r["pooled_dpo"]["max_regret"] for r in per_seed),
        f"Reviews, types 60/30/10: EM-DPO + MMRA's max regret {_seeds(rf['mmra']['max_regret_per_seed'])} "
        f"(implicit-reward weights {_seeds(rf['mmra_implicit']['max_regret_per_seed'])}) vs pooled DPO's "
        f"{_seeds(rf['pooled_dpo']['max_regret_per_seed'])} per seed (EM ARI "
        f"{_seeds([r['em']['ari'] for r in per_seed])}, oracle {_seeds([r['em']['oracle_ari'] for r in per_seed])}).",
    )
    return out


def _seeds(values) -> str:
    return "/".join(f"{v:.3f}" for v in values)


def _arrow(values) -> str:
    return " -> ".join(f"{v:.3f}" for v in values)


def report_sections(summary: dict) -> list[str]:
    b, r = summary["bandit"], summary["reviews"]
    lines = [
        f"- **{'holds' if c['holds'] else 'does not hold here'}** — {c['sentence']}"
        for c in summary["claims"]
    ]
    sections = [
        f"Seeds: bandit {b['seeds']}, reviews {summary['seeds']}; quick: {summary['quick']}; "
        f"{summary['seconds']} s (bandit {b['seconds']} s in a second process, reviews {r['seconds']} s).",
        "## Claims\n\n" + "\n".join(lines),
    ]
    rows = []
    for design, by in b["identifiability"].items():
        for count, m in by.items():
            rows.append({
                "design": design, "annotators": count,
                "mixture error": (m["mixture_error"], m["mixture_error_std"]),
                "weight error": m["weight_error"], "norm ratio": m["norm_ratio"],
                "ll truth − indifferent": m["loglik_truth_minus_indifferent"],
                "ARI": m["ari"], "oracle ARI": m["oracle_ari"], "EM iterations": m["iterations"],
                "at plateau": m["converged"],
            })  # fmt: skip
    s = b["settings"]
    sections.append(
        f"## Bandit: identifiability (+w / −w at 50/50, |w| = 2, d = 3, {s['n_contexts']} contexts x "
        f"{s['n_candidates']} candidates, T = {s['temperature']})\n\n"
        "Mixture error = min over type matchings of ‖Θ̂ − Θ‖_F / ‖Θ‖_F (Θ = the types' utility weights w / T); "
        "weight error = total variation between recovered and true η; norm ratio = mean ‖θ̂‖ / ‖θ‖; "
        "log-likelihoods per annotator; oracle ARI = the Bayes classifier that knows the truth (the ceiling "
        f"of any clustering). EM: {s['em']}, restarts {s['restarts']}, at most {s['max_iterations']} "
        "iterations.\n\n"
        + markdown_table(rows, list(rows[0]))
        + "\n\n![mixture error](bandit_mixture_error.png)"
    )
    fair = b["fairness"]
    rows = [{"policy": m, "max regret": (fair[m]["max_regret"], fair[m]["max_regret_std"]),
             **{f"regret {t}": v for t, v in zip(fair["types"], fair[m]["regret"])}}
            for m in ("pooled_dpo", "mmra")]  # fmt: skip
    weights = [np.round(x["mmra"]["weights_by_type"], 3).tolist() for x in fair["per_seed"]]
    sections.append(
        f"## Bandit: fairness ({dict(zip(fair['types'], fair['population']))}, {fair['annotators']} annotators "
        "x 8 ternary rankings)\n\nRegret of type t = J_t(best available policy) − J_t(π), exact true rewards, the "
        "best over the oracle per-type policies, EM's type policies and pooled DPO. MMRA's weights come from "
        "EM's implicit rewards (what the library does without ground truth).\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\nMMRA weights per seed, by the true type each EM policy was matched to: {weights}"
    )
    memo = r["memorisation"]
    hist = memo["per_seed"][0]["history"]
    U = r["settings"]["annotators"]
    rows = [{"iteration": h["iteration"], "held-out ll": h["em/log_likelihood"] / U,
             "in-sample ll": h.get("em/log_likelihood_in_sample", float("nan")) / U, "ARI": h.get("em/ari"),
             "η": " / ".join(f"{x:.3f}" for x in h["em/type_weights"])} for h in hist]  # fmt: skip
    sections.append(
        f"## Reviews: one ternary ranking per annotator ({U} annotators, enthusiast vs critic, cross-fitted EM, "
        "2 folds)\n\nPer annotator; the held-out log-likelihood scores each annotator with the fold policies "
        "that never trained on it, the in-sample one with those that did.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\nMixture error {memo['mixture_error']:.3f}, weight error {memo['weight_error']:.3f}, norm ratio "
        f"{memo['norm_ratio']:.3f}, ARI {memo['ari']:.3f} (oracle {memo['oracle_ari']:.3f}); log-likelihood of "
        f"the truth {memo['loglik_truth']:.3f}, of an indifferent population {memo['loglik_indifferent']:.3f}."
        "\n\n![log-likelihood](reviews_loglik.png)"
    )
    rf = r["fairness"]
    types = list(rf["pooled_dpo"]["true_reward"])
    rows = [{"policy": m, "max regret": (rf[m]["max_regret"], rf[m]["max_regret_std"]),
             **{f"reward {t}": rf[m]["true_reward"][t] for t in types}}
            for m in ("pooled_dpo", "mmra", "mmra_implicit")]  # fmt: skip
    best = [x["best_policy"] for x in rf["per_seed"]]
    sections.append(
        f"## Reviews: fairness ({r['settings']['fair_annotators']} annotators x {r['settings']['per_annotator']} "
        "ternary rankings, 60/30/10 enthusiast/concise/critic)\n\nTrue rewards on held-out prompts; regret "
        "against each type's best policy among EM's, pooled DPO and the oracle per-type DPO policies. mmra: "
        "weights from a true-reward cross-evaluation; mmra_implicit: from implicit rewards.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\nBest available policy per type and seed: {best}"
    )
    return sections
