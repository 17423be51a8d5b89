"""`prefalign demo mpo`: MPO as a reward-vs-KL frontier, against DPO and IPO, on DETERMINISTIC preferences.

Two worlds (the MPO paper's claims, our reconstruction of the method: docs/mpo.md):

tabular   the exact bandit world (`demos/mpo_tabular.py`): frontiers over β (DPO, IPO) and λ (MPO, with the
          sampled regularizer and the exact-KL control), a regularizer-only control, the overfitting regime
          (constant learning rate, many epochs); always at least 3 seeds (it takes seconds).
reviews   the language-model world through the runner: DPO and IPO over β (IPO also length-normalized, as MPO's
          preference term is), MPO over λ, the regularizer alone (`loss.preference_term: false`), constant
          learning rate after warmup; KL and true reward over training.

report.md says, one sentence per claim, whether it holds here with the numbers; summary.json carries them under
`tabular.claims` and `reviews.claims` (rows `reference`, `dpo`, `ipo`, `mpo` keep the default settings' results).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.data import save_jsonl
from prefalign.core.report import (
    mark_time,
    markdown_table,
    mean_std,
    pm,
    pyplot,
    save_figure,
    write_report,
    write_summary,
)
from prefalign.demos import dpo as dpo_demo
from prefalign.demos import mpo_tabular
from prefalign.demos.mpo_tabular import best_reward_at, span, strictly_decreasing, verdict
from prefalign.demos.mpo_tabular_plot import plot as plot_tabular
from prefalign.methods import dpo, mpo
from prefalign.worlds.reviews import ReviewsWorld

TARGET = dpo_demo.TARGET
KEYS = ("true_reward", "kl", "win_rate")
MPO_LOSS = {"name": "mpo", "beta": 1.0, "regularization_weight": 1.0, "average_logps": True}
MPO = {"samples_per_prompt": 16, "max_new_tokens": 48}
DEFAULTS = {"dpo": "dpo/beta=0.1", "ipo": "ipo/beta=0.1", "mpo": "mpo/lambda=1"}  # the summary's old rows


def grid(quick: bool) -> list[dict]:
    """The reviews runs: key, method, loss section and regularization samples per prompt. `ipo_avg` is IPO on
    length-normalized log-probs (the IPO paper's and TRL's form; MPO's preference term is length-normalized
    too), so that a difference from MPO is not just the normalization."""
    if quick:
        dpo_betas, ipo_betas, ipo_avg_betas, lambdas, samples = (0.1,), (0.1,), (1.0, 3.0), (0.1, 1.0), (16,)
    else:
        dpo_betas, ipo_betas, ipo_avg_betas = (0.1, 0.3), (0.1, 0.3, 1.0), (1.0, 3.0, 10.0)
        lambdas, samples = (0.03, 0.1, 0.3, 1.0), (16, 64)
    runs = [dict(key=f"{m}/beta={b:g}", method="dpo", loss={"name": m, "beta": b}, samples=None)
            for m, betas in (("dpo", dpo_betas), ("ipo", ipo_betas)) for b in betas]  # fmt: skip
    runs += [dict(key=f"ipo_avg/beta={b:g}", method="dpo", loss={"name": "ipo", "beta": b, "average_logps": True},
                  samples=None) for b in ipo_avg_betas]  # fmt: skip
    runs += [dict(key=f"mpo/lambda={lam:g}", method="mpo", loss={**MPO_LOSS, "regularization_weight": lam},
                  samples=MPO["samples_per_prompt"]) for lam in lambdas]  # fmt: skip
    runs += [dict(key=f"regularizer_only/samples={n}", method="mpo", loss={**MPO_LOSS, "preference_term": False},
                  samples=n) for n in samples]  # fmt: skip
    return runs


def settings(quick: bool) -> dict:
    # 24 pairs per prompt (768 pairs) in both modes: the full demo's 300 steps are ~6 epochs over them
    return {**dpo_demo.settings(quick), "pairs_per_prompt": 24}


def train_run(
    world, reference, tokenizer, records, spec: dict, out_dir: Path, seed: int, s: dict, data_file: Path
) -> dict:
    """One run of the grid from the reference (constant learning rate after warmup: the overfitting regime);
    final ground-truth metrics and the curve over training."""
    section = {
        "model": {"name_or_path": s["model"]},  # recorded in config.yaml for `prefalign eval`
        "data": dpo_demo.data_settings(data_file),
        "loss": spec["loss"],
        "train": {**dpo_demo.train_settings(out_dir / spec["key"].replace("/", "_"), seed, s),
                  "lr_scheduler": "constant_with_warmup"},
    }  # fmt: skip
    if spec["method"] == "mpo":  # runs of one seed with the same set size share their regularization set
        regularization = out_dir / f"regularization-{spec['samples']}"
        section["mpo"] = {
            **MPO,
            "samples_per_prompt": spec["samples"],
            "regularization_dir": str(regularization),
        }
    cfg = build(dpo.Config if spec["method"] == "dpo" else mpo.Config, section)

    def evaluate_fn(model):
        return dpo_demo.world_metrics(world, model, reference, s["eval_samples"], seed)

    # a passed model is trained in place; the untouched copy samples MPO's regularization set first
    result = runner.run(
        cfg, records=records, eval_records=[], model=copy.deepcopy(reference), tokenizer=tokenizer,
        evaluate_fn=evaluate_fn,
    )  # fmt: skip
    curve = [r for r in result.history if "eval/kl" in r]
    final = dpo_demo.world_metrics(world, result.model, reference, s["final_samples"], seed + 1000)
    return {**final, "curve": curve}


def run(out_dir: Path, quick: bool = False, seeds: list[int] | None = None) -> dict:
    seeds = seeds or [0]
    out_dir = Path(out_dir)
    # the tabular world takes seconds: never fewer than 3 seeds there
    tabular_results = [mpo_tabular.run_seed(seed) for seed in sorted({*seeds, 0, 1, 2})]
    tabular = mpo_tabular.summarize(tabular_results)
    plot_tabular(tabular, tabular_results, out_dir)
    tabular_sections = mpo_tabular.report_sections(tabular)
    s = settings(quick)
    world = ReviewsWorld(seed=0, quick=quick)
    reference, tokenizer = world.reference()
    dpo_demo.write_world(
        out_dir, s["model"], quick, "mpo", f"deterministic: the higher {TARGET} reward always wins"
    )
    specs = grid(quick)
    per_seed: dict[str, list[dict]] = {"reference": [], **{spec["key"]: [] for spec in specs}}
    start_points = []
    for seed in seeds:
        prompts = world.train_prompts * s["pairs_per_prompt"]
        records, _ = world.preference_data(prompts, TARGET, n_responses=2, seed=seed, deterministic=True)
        # the reference sometimes answers with EOS at once; data.py refuses empty responses when the saved
        # file is read back (configs/mpo_reviews.yaml), so all methods train without those few pairs
        records = [r for r in records if all(r.responses)]
        data_file = save_jsonl(records, out_dir / "data" / f"train-seed{seed}.jsonl")
        if seed == seeds[0]:
            save_jsonl(records, out_dir / "data" / "train.jsonl")  # configs/mpo_reviews.yaml reads this
        per_seed["reference"].append(
            dpo_demo.world_metrics(world, reference, reference, s["final_samples"], seed + 1000)
        )
        start_points.append(dpo_demo.world_metrics(world, reference, reference, s["eval_samples"], seed))
        for spec in specs:
            result = train_run(
                world, reference, tokenizer, records, spec, out_dir / f"seed-{seed}", seed, s, data_file
            )
            per_seed[spec["key"]].append(result)
    reviews = summarize_reviews(per_seed, start_points, specs, s)
    return write_outputs(
        out_dir, per_seed, reviews, tabular, tabular_sections, seeds, quick, len(records), world, s
    )


# ---------------------------------------------------------------- reviews: curves, claims


def mean_curves(per_seed: dict, start_points: list[dict], specs: list[dict]) -> dict:
    """key -> {steps, <measure>: (mean, std) per eval point over seeds}; step 0 is the reference."""
    curves = {}
    for spec in specs:
        results = per_seed[spec["key"]]
        curves[spec["key"]] = {"steps": [0] + [r["step"] for r in results[0]["curve"]]}
        for key in KEYS:
            values = np.array(
                [[p[key]] + [r[f"eval/{key}"] for r in res["curve"]] for p, res in zip(start_points, results)]
            )
            std = values.std(0, ddof=1) if len(values) > 1 else 0 * values[0]
            curves[spec["key"]][key] = (values.mean(0), std)
    return curves


def summarize_reviews(per_seed: dict, start_points: list[dict], specs: list[dict], s: dict) -> dict:
    """summary["reviews"]: every run's end point (mean, std, per seed), curves, and the claims."""
    runs = {}
    for key, results in per_seed.items():
        stats = {k: mean_std([r[k] for r in results]) for k in KEYS}
        runs[key] = {k: stats[k][0] for k in KEYS} | {f"{k}_std": stats[k][1] for k in KEYS}
        runs[key]["per_seed"] = [{k: r[k] for k in KEYS} for r in results]
    curves = mean_curves(per_seed, start_points, specs)
    family = lambda name: [sp["key"] for sp in specs if sp["key"].startswith(name + "/")]  # noqa: E731
    dpo_keys, mpo_keys, reg_keys = (family(f) for f in ("dpo", "mpo", "regularizer_only"))
    ipo_keys, summed_keys = family("ipo") + family("ipo_avg"), family("ipo")
    n_seeds = len(per_seed["reference"])

    def growth(key) -> list[float]:
        """Per seed: least-squares slope of KL over the evals of the second half of training, as nats per
        half run (a single sampled KL is heavy-tailed at large KL, so not last minus middle)."""
        out = []
        for res in per_seed[key]:
            steps = np.array([r["step"] for r in res["curve"]], dtype=float)
            kl = np.array([r["eval/kl"] for r in res["curve"]])
            late = steps >= steps[-1] / 2
            out.append(float(np.polyfit(steps[late], kl[late], 1)[0] * steps[-1] / 2))
        return out

    def gaps(
        key, over_training: bool, baselines=None
    ):  # per seed: reward minus the DPO/IPO frontier at KL <=
        out = []
        for i in range(n_seeds):
            points = [(0.0, per_seed["reference"][i]["true_reward"])]
            for k in baselines or dpo_keys + ipo_keys:
                res = per_seed[k][i]
                points.append((res["kl"], res["true_reward"]))
                if over_training:
                    points += [(r["eval/kl"], r["eval/true_reward"]) for r in res["curve"]]
            me = per_seed[key][i]
            out.append(me["true_reward"] - best_reward_at(points, me["kl"]))
        return out

    gap = {k: gaps(k, False) for k in mpo_keys}
    gap_training = {k: gaps(k, True) for k in mpo_keys}
    gap_summed = {k: gaps(k, False, dpo_keys + summed_keys) for k in mpo_keys}
    lambdas = [float(k.split("=")[1]) for k in mpo_keys]
    by_lambda = [k for _, k in sorted(zip(lambdas, mpo_keys))]
    top = by_lambda[-1]
    reg16 = f"regularizer_only/samples={MPO['samples_per_prompt']}"
    per_seed_kl = lambda keys, i: [per_seed[k][i]["kl"] for k in keys]  # noqa: E731
    dpo_kl = [runs[k]["kl"] for k in dpo_keys]
    claims = {
        "dpo_kl_keeps_growing": {
            "kl_growth_second_half": {k: mean_std(growth(k)) for k in dpo_keys + ipo_keys + mpo_keys},
            "holds": all(np.mean(growth(k)) > 0 for k in dpo_keys),
        },
        "dpo_ignores_beta": {
            "kl": {k: runs[k]["kl"] for k in dpo_keys},
            "relative_range": (max(dpo_kl) - min(dpo_kl)) / max(dpo_kl) if len(dpo_kl) > 1 else None,
            "holds": (max(dpo_kl) - min(dpo_kl)) / max(dpo_kl) <= 0.25 if len(dpo_kl) > 1 else None,
        },
        "lambda_orders_kl": {
            "lambdas": sorted(lambdas),
            "kl": [runs[k]["kl"] for k in by_lambda],
            "holds": all(strictly_decreasing(per_seed_kl(by_lambda, i)) for i in range(n_seeds)),
        },
        "mpo_kl_below_dpo": {
            "mpo_kl_max": max(runs[k]["kl"] for k in mpo_keys),
            "dpo_kl_min": min(dpo_kl),
            "holds": all(
                max(per_seed_kl(mpo_keys, i)) < min(per_seed_kl(dpo_keys, i)) for i in range(n_seeds)
            ),
        },
        "mpo_reward_at_least_dpo_ipo": {
            "reward_gap_at_equal_kl": {k: mean_std(gap[k]) for k in by_lambda},
            "reward_gap_over_training": {k: mean_std(gap_training[k]) for k in by_lambda},
            # against DPO and IPO on summed log-probs only (without ipo_avg)
            "reward_gap_summed_logps_only": {k: mean_std(gap_summed[k]) for k in by_lambda},
            "holds_at": {k: all(g >= 0 for g in gap[k]) for k in by_lambda},  # in every seed
            "seeds_above_over_training": {k: sum(g >= 0 for g in gap_training[k]) for k in by_lambda},
            "holds": all(g >= 0 for k in mpo_keys for g in gap[k]),
        },
        "regularizer_alone_moves_kl": {
            "kl": {k: (runs[k]["kl"], runs[k]["kl_std"]) for k in reg_keys},
            "true_reward": {k: (runs[k]["true_reward"], runs[k]["true_reward_std"]) for k in reg_keys},
            "fraction_of_mpo_kl": runs[reg16]["kl"] / runs[top]["kl"],
            "mpo_key": top,
            "holds": all(r["kl"] > 0.05 for r in per_seed[reg16]),
        },
    }
    return {
        "settings": {**s, "lr_scheduler": "constant_with_warmup", "mpo": MPO, "mpo_loss": MPO_LOSS},
        "runs": runs,
        "curves": {
            k: {"steps": c["steps"], **{m: c[m][0].tolist() for m in KEYS}} for k, c in curves.items()
        },
        "curve_std": {k: {m: c[m][1].tolist() for m in KEYS} for k, c in curves.items()},
        "claims": claims,
        "_curves": curves,
    }


def reviews_sentences(reviews: dict) -> list[str]:
    c, n_seeds = reviews["claims"], len(reviews["runs"]["reference"]["per_seed"])
    grow, beta, lam = c["dpo_kl_keeps_growing"], c["dpo_ignores_beta"], c["lambda_orders_kl"]
    below, gap, reg = c["mpo_kl_below_dpo"], c["mpo_reward_at_least_dpo_ipo"], c["regularizer_alone_moves_kl"]
    g = grow["kl_growth_second_half"]
    dpo_growth = ", ".join(
        f"{pm(m, sd, 2, signed=True)} ({k})" for k, (m, sd) in g.items() if k.startswith("dpo/")
    )
    mpo_growth = [m for k, (m, _) in g.items() if k.startswith("mpo/")]
    gaps = ", ".join(
        f"{pm(m, sd, signed=True)} ({k.split('/')[1]})"
        for k, (m, sd) in gap["reward_gap_at_equal_kl"].items()
    )
    above = gap["seeds_above_over_training"]
    gaps_training = ", ".join(
        f"{m:+.3f} (≥ 0 in {above[k]} of {n_seeds} seeds)"
        for k, (m, _) in gap["reward_gap_over_training"].items()
    )
    summed = ", ".join(f"{m:+.3f}" for m, _ in gap["reward_gap_summed_logps_only"].values())
    where = [k.split("/")[1] for k, ok in gap["holds_at"].items() if ok]
    gap_verdict = (
        verdict(gap["holds"]) if gap["holds"] or not where else f"**holds only at {', '.join(where)}**"
    )
    reg_kl = ", ".join(f"{pm(m, sd)} ({k.split('/')[1]})" for k, (m, sd) in reg["kl"].items())
    out = [
        f"- DPO's KL keeps growing: {verdict(grow['holds'])} (criterion: seed-mean slope > 0 at every β) — KL "
        f"growth over the second half of training, from a line fitted to its evaluations: {dpo_growth} nats "
        f"(MPO over λ: {span(mpo_growth, 2)}).",
    ]
    if beta["holds"] is None:
        out.append("- DPO's end point barely depends on β: not measured in the quick demo (one β).")
    else:
        out.append(
            f"- DPO's end point barely depends on β: {verdict(beta['holds'])} — KL "
            f"{', '.join(f'{v:.2f} ({k})' for k, v in beta['kl'].items())}, range {beta['relative_range']:.0%} "
            "of the largest (criterion ≤ 25%)."
        )
    out += [
        f"- λ controls MPO's KL: {verdict(lam['holds'])} — KL {', '.join(f'{v:.3f}' for v in lam['kl'])} for "
        f"λ = {', '.join(f'{x:g}' for x in lam['lambdas'])} (criterion: strictly decreasing in every seed).",
        f"- MPO keeps KL below DPO's: {verdict(below['holds'])} — MPO's largest KL {below['mpo_kl_max']:.3f}, "
        f"DPO's smallest {below['dpo_kl_min']:.3f}.",
        f"- MPO reaches an equal or better true reward than DPO/IPO at the same KL: {gap_verdict} (gap ≥ 0 in "
        f"every seed) — reward gap to the DPO/IPO end-point frontier at MPO's KL {gaps}; against every point DPO "
        f"and IPO passed during training (noisy evaluations, so this frontier is biased upwards): {gaps_training}; "
        f"against summed-log-prob DPO/IPO only (no `ipo_avg`): {summed}.",
        f"- The finite regularization set moves KL by itself: {verdict(reg['holds'])} — with the preference term "
        f"off, KL {reg_kl}, "
        f"{reg['fraction_of_mpo_kl']:.0%} of the KL of {reg['mpo_key']}.",
    ]
    return out


# ---------------------------------------------------------------- outputs


def plot_reviews(out_dir: Path, reviews: dict, reference_reward: float, n_seeds: int) -> None:
    """reward_vs_kl.png (end points with seed std, and each run's path over training), kl_vs_step.png,
    reward_vs_step.png."""
    plt = pyplot()
    curves, runs = reviews["_curves"], reviews["runs"]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ax.plot([0], [reference_reward], "k*", ms=10, label="reference")
    families = {}
    for key in curves:
        families.setdefault(key.split("/")[0], []).append(key)
    for i, (family, keys) in enumerate(families.items()):
        color = f"C{i}"
        for key in keys:
            ax.plot(curves[key]["kl"][0], curves[key]["true_reward"][0], color=color, alpha=0.3, lw=1)
            if len(curves[key]["steps"]) > 1:  # which way each path runs
                mark_time(
                    ax, curves[key]["kl"][0], curves[key]["true_reward"][0], curves[key]["steps"], color
                )
        order = sorted(keys, key=lambda k: runs[k]["kl"])
        ax.errorbar([runs[k]["kl"] for k in order], [runs[k]["true_reward"] for k in order],
                    xerr=[runs[k]["kl_std"] for k in order], yerr=[runs[k]["true_reward_std"] for k in order],
                    fmt="o-", color=color, ms=4, capsize=2, label=family)  # fmt: skip
        for k in order:
            ax.annotate(k.split("/")[1].replace("lambda", "λ").replace("beta", "β").replace("samples", "S"),
                        (runs[k]["kl"], runs[k]["true_reward"]), fontsize=6, xytext=(3, 2), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(π‖π_ref) (nats, sampled)")
    ax.set_ylabel(f"true reward ({TARGET})")
    ax.set_title(
        f"reviews world: end points (mean ± std, {n_seeds} seed(s)); faint: paths over training", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out_dir / "reward_vs_kl.png")
    for measure, ylabel, name in [("kl", "KL(π‖π_ref) (nats)", "kl_vs_step.png"),
                                  ("true_reward", f"true reward ({TARGET})", "reward_vs_step.png")]:  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.5, 4.0))
        for key, c in curves.items():
            mean, std = c[measure]
            ax.plot(c["steps"], mean, marker="o", ms=2, label=key)
            ax.fill_between(c["steps"], mean - std, mean + std, alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} over training (mean ± std over {n_seeds} seed(s))", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        save_figure(fig, out_dir / name)


def write_outputs(
    out_dir, per_seed, reviews, tabular, tabular_sections, seeds, quick, n_records, world, s
) -> dict:
    plot_reviews(out_dir, reviews, mean_std([r["true_reward"] for r in per_seed["reference"]])[0], len(seeds))
    reviews = {k: v for k, v in reviews.items() if k != "_curves"}
    summary: dict = {
        "target_type": TARGET,
        "seeds": seeds,
        "quick": quick,
        "n_train_pairs": n_records,
        "preferences": "deterministic",
        "mpo_settings": {**MPO_LOSS, **MPO},
        "dpo_ipo_beta": 0.1,
        # the default settings' rows, as before: reference, dpo (β 0.1), ipo (β 0.1), mpo (λ 1)
        "reference": reviews["runs"]["reference"],
        **{row: reviews["runs"][key] for row, key in DEFAULTS.items()},
        "reviews": reviews,
        "tabular": tabular,
    }
    one = len(seeds) == 1  # one seed: the value alone, no "± 0.000"
    rows = [
        {"run": key, **{k: r[k] if one else (r[k], r[f"{k}_std"]) for k in KEYS}}
        for key, r in reviews["runs"].items()
    ]
    measures = dpo_demo.measures(world, s)
    s = reviews["settings"]
    sections = [
        "Deterministic preferences (the better response always wins). MPO is our reconstruction of the paper "
        "from its abstract (docs/mpo.md); its default form is what runs here unless a row says otherwise. "
        "Claims checked in two worlds: an exact tabular bandit (every quantity an exact sum) and the reviews "
        "language-model world (KL and reward estimated from samples).",
        *tabular_sections,
        "## Reviews world\n\n"
        f"Preference pairs of reference samples labelled **deterministically** by the `{TARGET}` reward; "
        f"{n_records} pairs per seed, seeds {seeds}{' (quick)' if quick else ''}; every run trains "
        f"{s['steps']} steps of batch 16 (≈ {s['steps'] * 16 / n_records:.1f} epochs) at a constant learning "
        f"rate after warmup, from the same reference. MPO: β = {MPO_LOSS['beta']:g}, length-normalized, "
        f"{MPO['samples_per_prompt']} reference samples per prompt as its regularization set; "
        "`regularizer_only` turns the preference term off (`loss.preference_term: false`).",
        measures,
        f"### End points (held-out prompts; {dpo_demo.seeds_heading(seeds)})\n\n"
        + markdown_table(rows, ["run", *KEYS]),
        "### The paper's claims here\n\n" + "\n".join(reviews_sentences(reviews)),
        "### Frontier and training curves\n\n![reward vs KL](reward_vs_kl.png)\n\n![KL over training](kl_vs_step.png)"
        "\n\n![true reward over training](reward_vs_step.png)",
    ]
    write_report(out_dir, "MPO vs DPO vs IPO on deterministic preferences: reward-vs-KL frontiers", sections)
    write_summary(out_dir, summary)
    return summary
