"""`prefalign demo mpo`: reviews world with DETERMINISTIC preferences (the higher true reward always wins)
-> DPO, IPO and MPO trained for the same steps from the same reference -> KL(π‖π_ref) and true reward over
training, the reward-vs-KL frontier -> report.md + summary.json.

The claim under test (MPO paper's abstract, our reconstruction in docs/mpo.md): with deterministic
preferences DPO's KL keeps growing, while MPO's off-policy regularizer keeps it bounded at an equal or
higher true reward. The summary states, with the numbers, whether this world showed it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.data import save_jsonl
from prefalign.core.report import markdown_table, plot_lines, write_report, write_summary
from prefalign.demos import dpo as dpo_demo
from prefalign.methods import mpo
from prefalign.worlds.reviews import ReviewsWorld

TARGET = dpo_demo.TARGET
METHODS = ("dpo", "ipo", "mpo")  # dpo/ipo: the DPO demo's settings (β = 0.1); mpo: below
MPO_LOSS = {"name": "mpo", "beta": 1.0, "regularization_weight": 1.0, "average_logps": True}
MPO = {"samples_per_prompt": 16, "max_new_tokens": 48}
KEYS = ("true_reward", "kl", "win_rate")


def train_mpo(
    world, reference, tokenizer, records, out_dir: Path, seed: int, s: dict, data_file: Path
) -> dict:
    """MPO from the reference with the DPO demo's training settings; final metrics and the curve."""
    cfg = build(
        mpo.Config,
        {
            "model": {"name_or_path": s["model"]},
            "data": dpo_demo.data_settings(data_file),
            "loss": MPO_LOSS,
            "mpo": MPO,
            "train": dpo_demo.train_settings(out_dir, seed, s),
        },
    )
    policy = copy.deepcopy(reference)  # untouched: it samples the regularization set, then is trained

    def evaluate_fn(model):
        return dpo_demo.world_metrics(world, model, reference, s["eval_samples"], seed)

    result = runner.run(cfg, records=records, model=policy, tokenizer=tokenizer, evaluate_fn=evaluate_fn)
    curve = [r for r in result.history if "eval/kl" in r]
    final = dpo_demo.world_metrics(world, result.model, reference, s["final_samples"], seed + 1000)
    return {**final, "curve": curve}


def run(out_dir: Path, quick: bool = False, seeds: list[int] | None = None) -> dict:
    seeds = seeds or [0]
    s = dpo_demo.settings(quick)
    out_dir = Path(out_dir)
    world = ReviewsWorld(seed=0, quick=quick)
    reference, tokenizer = world.reference()
    preferences = f"deterministic: the higher {TARGET} reward always wins"
    dpo_demo.write_world(out_dir, s["model"], quick, "mpo", preferences)
    per_seed: dict[str, list[dict]] = {"reference": [], **{m: [] for m in METHODS}}
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
        for method in METHODS:
            run_dir = out_dir / f"seed{seed}" / method
            if method == "mpo":
                result = train_mpo(world, reference, tokenizer, records, run_dir, seed, s, data_file)
            else:
                result = dpo_demo.train_one(
                    world, reference, tokenizer, records, method, run_dir, seed, s, data_file
                )
            per_seed[method].append(result)
    return write_outputs(out_dir, per_seed, start_points, seeds, quick, len(records), world, s)


def mean_curves(per_seed: dict, start_points: list[dict]) -> dict:
    """method -> {steps, <key>: (mean, std) per eval point over seeds}; step 0 is the reference."""
    curves = {}
    for method in METHODS:
        steps = [0] + [r["step"] for r in per_seed[method][0]["curve"]]
        curves[method] = {"steps": steps}
        for key in KEYS:
            values = np.array(
                [
                    [p[key]] + [r[f"eval/{key}"] for r in res["curve"]]
                    for p, res in zip(start_points, per_seed[method])
                ]
            )
            curves[method][key] = (
                values.mean(0),
                values.std(0, ddof=1) if len(values) > 1 else 0 * values[0],
            )
    return curves


def check_claim(curves: dict, summary: dict) -> dict:
    """The claim in numbers. KL growth = KL at the last eval minus KL at the middle eval (of the seed mean).
    Holds when DPO's KL grows, MPO's grows less than half as much and ends lower than DPO's, and MPO's
    final true reward is at least DPO's minus their pooled seed std (0 with one seed)."""

    def growth(method):
        kl = curves[method]["kl"][0]
        return float(kl[-1] - kl[len(kl) // 2])

    dpo, mpo_ = summary["dpo"], summary["mpo"]
    tolerance = float(np.hypot(dpo["true_reward_std"] or 0.0, mpo_["true_reward_std"] or 0.0))
    claim = {
        "dpo_kl_growth_second_half": growth("dpo"),
        "ipo_kl_growth_second_half": growth("ipo"),
        "mpo_kl_growth_second_half": growth("mpo"),
        "dpo_kl_keeps_growing": growth("dpo") > 0,
        "mpo_kl_bounded": growth("mpo") < 0.5 * max(growth("dpo"), 0) and mpo_["kl"] < dpo["kl"],
        "mpo_reward_at_least_dpo": mpo_["true_reward"] >= dpo["true_reward"] - tolerance,
        "reward_tolerance": tolerance,
    }
    claim["holds"] = (
        claim["dpo_kl_keeps_growing"] and claim["mpo_kl_bounded"] and claim["mpo_reward_at_least_dpo"]
    )
    return claim


def write_outputs(
    out_dir: Path,
    per_seed: dict,
    start_points: list,
    seeds: list,
    quick: bool,
    n_records: int,
    world,
    s: dict,
):
    summary: dict = {
        "target_type": TARGET,
        "seeds": seeds,
        "quick": quick,
        "n_train_pairs": n_records,
        "preferences": "deterministic",
        "mpo_settings": {**MPO_LOSS, **MPO},
        "dpo_ipo_beta": 0.1,
    }
    rows = dpo_demo.seed_columns(per_seed, KEYS, summary)
    curves = mean_curves(per_seed, start_points)
    summary["curves"] = {
        m: {"steps": c["steps"], **{k: c[k][0].tolist() for k in KEYS}} for m, c in curves.items()
    }
    claim = summary["claim"] = check_claim(curves, summary)

    label = f"true reward ({TARGET})"
    for key, ylabel, name in [
        ("kl", "KL(π‖π_ref) (nats)", "kl_vs_step.png"),
        ("true_reward", label, "reward_vs_step.png"),
    ]:
        plot_lines(
            out_dir / name,
            {m: (c["steps"], c[key][0]) for m, c in curves.items()},
            "step",
            ylabel,
            f"{ylabel} over training (mean over {len(seeds)} seed(s))",
            bands={m: c[key][1] for m, c in curves.items()},
            markers=True,
        )
    frontier = {m: (c["kl"][0], c["true_reward"][0]) for m, c in curves.items()}
    frontier["reference"] = ([0.0], [summary["reference"]["true_reward"]])
    plot_lines(
        out_dir / "reward_vs_kl.png",
        frontier,
        "KL(π‖π_ref) (nats)",
        label,
        "reward-vs-KL frontier (each point an eval during training)",
        markers=True,
    )

    verdict = "**holds**" if claim["holds"] else "**does not hold**"
    tolerance_text = (
        f"− {claim['reward_tolerance']:.3f} (their pooled seed std)"
        if len(seeds) > 1
        else "(one seed: no spread to allow for)"
    )
    sections = [
        f"Reviews world, preference pairs labelled **deterministically** by the `{TARGET}` reward (the higher "
        f"true reward always wins); {n_records} pairs per seed, seeds {seeds}{' (quick)' if quick else ''}. "
        "DPO and IPO (β = 0.1, the DPO demo's settings) and MPO (our reconstruction, docs/mpo.md; "
        f"{', '.join(f'{k} = {v}' for k, v in MPO.items())}) train for the same steps from the same reference.",
        dpo_demo.measures(world, s),
        f"## Final results ({dpo_demo.seeds_heading(seeds)})\n\n" + markdown_table(rows, ["method", *KEYS]),
        f"## The claim: {verdict} in this run\n\n"
        "DPO's KL keeps growing while MPO's stays bounded, at an equal or higher true reward. "
        "KL growth over the second half of training (seed mean): "
        f"DPO {claim['dpo_kl_growth_second_half']:.3f}, IPO {claim['ipo_kl_growth_second_half']:.3f}, "
        f"MPO {claim['mpo_kl_growth_second_half']:.3f} nats. "
        f"DPO's KL keeps growing: {claim['dpo_kl_keeps_growing']}; MPO's KL bounded (grows < half of DPO's and "
        f"ends lower): {claim['mpo_kl_bounded']}; MPO's true reward ≥ DPO's {tolerance_text}: "
        f"{claim['mpo_reward_at_least_dpo']}.",
        "## Over training\n\n![KL over training](kl_vs_step.png)\n\n![true reward over training](reward_vs_step.png)"
        "\n\n![reward vs KL](reward_vs_kl.png)\n\n" + dpo_demo.curve_vs_table(per_seed, METHODS, s),
    ]
    write_report(out_dir, "DPO vs IPO vs MPO on deterministic preferences (reviews world)", sections)
    write_summary(out_dir, summary)
    return summary
