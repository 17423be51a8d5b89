"""The SSPO paper's claims, checked on the numbers of `prefalign demo sspo` (one sentence per claim).

A claim compares two rows seed by seed (the same seed gives both rows the same winners, base samples and
evaluation noise). `>`: holds when the difference a − b is positive in every seed; `<`: negative in every
seed; `≈`: holds when |mean difference| ≤ max(0.01, 2 × its seed std). The paper reports no seeds.
"""

from __future__ import annotations

from prefalign.core.report import mean_std, pm

ABOUT_EQUAL = 0.01  # score units: the smallest gap `≈` tolerates

# key -> (a, b, relation, metric, the claim in words, what the paper reports)
CLAIMS = {
    "sft_on_self_winners_lowers_score": (
        "sft_self", "base", "<", "score",
        "SFT on the base's own judge-ordered samples lowers the score (the previous demo's artefact)", "",
    ),
    "sft_on_external_winners_raises_score": (
        "sft", "base", ">", "score", "SFT on the external winners raises the score", "SFT 21.32 (PickScore)",
    ),
    "sspo_beats_sft": (
        "sspo_sign", "sft", ">", "score", "SSPO (SSR sign) beats SFT on the same winners",
        "PickScore 21.57 vs 21.32",
    ),
    "ssr_beats_no_ssr": (
        "sspo_sign", "sspo_none", ">", "score", "SSPO with SSR (sign) beats SSPO without SSR",
        "PickScore 21.57 vs 20.88",
    ),
    "indicator_about_equal_to_sign": (
        "sspo_indicator", "sspo_sign", "≈", "score", "the SSR indicator variant scores about the same as the sign",
        "reported about equal",
    ),
    "sspo_at_least_diffusion_dpo": (
        "sspo_sign", "diffusion_dpo", ">", "score",
        "SSPO (winners only) beats Diffusion-DPO (pairs: the same winners vs base samples)",
        "SSPO above Diffusion-DPO on Pick-a-Pic pairs",
    ),
    "sspo_beats_base": ("sspo_sign", "base", ">", "score", "SSPO (SSR sign) raises the score over the base", ""),
    "random_checkpoint_beats_initial": (
        "sspo_sign", "sspo_initial", ">", "score", "drawing the checkpoint at random beats always the initial model",
        "21.57 vs 21.41",
    ),
    "random_checkpoint_beats_latest": (
        "sspo_sign", "sspo_latest", ">", "score", "drawing the checkpoint at random beats always the latest one",
        "21.57 vs 21.34",
    ),
    "multi_draw_sign_agrees_more": (
        "sspo_sign_multi", "sspo_sign_multi", ">", ("sign_agreement", "sign_agreement_one_draw"),
        "the sign from several (t, ε) draws agrees with the many-draw sign more often than a single draw's", "",
    ),
    "multi_draw_sign_beats_one_draw": (
        "sspo_sign_multi", "sspo_sign", ">", "score", "SSPO with the multi-draw sign beats the single-draw sign",
        "",
    ),
}  # fmt: skip


def is_sspo(row: str) -> bool:
    """SSPO as the paper defines it: with self-sampling regularization (the `sspo_none` row is the ablation)."""
    return row.startswith("sspo") and row != "sspo_none"


def differences(per_seed: list[dict], a: str, b: str, metric) -> list[float] | None:
    metric_a, metric_b = metric if isinstance(metric, tuple) else (metric, metric)
    if any(a not in p or b not in p or metric_a not in p[a] or metric_b not in p[b] for p in per_seed):
        return None
    return [p[a][metric_a] - p[b][metric_b] for p in per_seed]


def holds(values: list[float], relation: str) -> bool:
    mean, std = mean_std(values)
    if relation == ">":
        return all(v > 0 for v in values)
    if relation == "<":
        return all(v < 0 for v in values)
    return abs(mean) <= max(ABOUT_EQUAL, 2 * std)


def check_claims(per_seed: list[dict], rows: dict) -> dict:
    """{claim key: {claim, paper, a, b, relation, metric, difference (mean, std), per_seed, holds}} and
    `best_row`: the best row trained on the external winners by mean score, against the best row of the
    other family (SSPO with SSR vs SFT / Diffusion-DPO / no SSR); it holds when an SSPO-with-SSR variant is
    best and beats the best other method in every seed."""
    out = {}
    for key, (a, b, relation, metric, text, paper) in CLAIMS.items():
        values = differences(per_seed, a, b, metric)
        if values is None:
            continue
        out[key] = {
            "claim": text, "paper": paper, "a": a, "b": b, "relation": relation,
            "metric": " − ".join(metric) if isinstance(metric, tuple) else metric,
            "difference": mean_std(values), "per_seed": values, "holds": holds(values, relation),
        }  # fmt: skip
    # "SSPO is best" (SSPO as the paper defines it: with SSR, so not the `sspo_none` ablation): among the rows
    # trained on the external winners (not the base, not the controls), the top row is an SSPO-with-SSR
    # variant and beats the best of the other rows (SFT, Diffusion-DPO, no SSR) in every seed
    trained = [r for r in rows if r != "base" and not r.endswith("_self")]
    ranked = sorted(trained, key=lambda r: rows[r]["score"][0], reverse=True)
    best = ranked[0]
    rival = next(r for r in ranked if is_sspo(r) != is_sspo(best))
    margin = differences(per_seed, best, rival, "score")
    out["best_row"] = {
        "claim": f"the best method on the external winners is {best}, ahead of {rival} (the best "
                 f"{'other method' if is_sspo(best) else 'SSPO variant with SSR'}) in every seed",
        "paper": "SSPO is best", "a": best, "b": rival, "relation": ">", "metric": "score",
        "difference": mean_std(margin), "per_seed": margin,
        "holds": is_sspo(best) and holds(margin, ">"),
        "score": rows[best]["score"], "ranking": ranked,
    }  # fmt: skip
    return out


def claim_lines(claims: dict) -> list[str]:
    """One sentence per claim: the claim, the paper's figure, holds or not here, with the numbers."""
    lines = []
    for claim in claims.values():
        mean, std = claim["difference"]
        seeds = ", ".join(f"{v:+.3f}" for v in claim["per_seed"])
        verdict = "**holds**" if claim["holds"] else "**does not hold**"
        # one seed: no spread to tell a gap from seed noise
        where = "here" if len(claim["per_seed"]) > 1 else "in this one seed (`--seeds 3` for a spread)"
        paper = f" (paper: {claim['paper']})" if claim["paper"] else ""
        a, b, metric = claim["a"], claim["b"], claim["metric"]
        what = f"{a} − {b} ({metric})" if a != b else f"{a}'s {metric}"
        lines.append(
            f"{claim['claim'][0].upper()}{claim['claim'][1:]}{paper}: {verdict} {where} — "
            f"{what} = {pm(mean, std, signed=True)} over "
            f"{len(claim['per_seed'])} seed(s) (per seed {seeds})."
        )
    return lines
