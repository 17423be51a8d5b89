"""`prefalign demo dpo`: reviews world -> reference SFT -> preferences of one annotator type -> DPO and IPO
-> ground-truth evaluation (true reward, KL to the reference, win rate) -> report.md + summary.json."""

from __future__ import annotations

import copy
from pathlib import Path

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.data import save_jsonl
from prefalign.core.report import markdown_table, mean_std, plot_lines, write_report, write_summary
from prefalign.methods import dpo
from prefalign.worlds.reviews import ReviewsWorld

TARGET = "enthusiast"
ANNOTATOR_TEMPERATURE = (
    0.2  # Plackett-Luce temperature of the annotators (1.0 gives ~62% agreement with the reward)
)
METHODS = {"dpo": {"name": "dpo", "beta": 0.1}, "ipo": {"name": "ipo", "beta": 0.1}}


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            model="world:reviews-quick",
            steps=100,
            pairs_per_prompt=24,
            eval_every=10,
            eval_samples=8,
            final_samples=16,
        )
    return dict(
        model="world:reviews",
        steps=300,
        pairs_per_prompt=64,
        eval_every=25,
        eval_samples=16,
        final_samples=32,
    )


def world_metrics(world, policy, reference, n_samples: int, seed: int) -> dict:
    """Ground truth of `policy` for the target type on held-out prompts."""
    m = world.evaluate(policy, reference, target_type=TARGET, n_samples_per_prompt=n_samples, seed=seed)
    return {"true_reward": m["true_reward"][TARGET], "kl": m["kl"], "win_rate": m["win_rate"]}


def train_settings(out_dir: Path, seed: int, s: dict) -> dict:
    """The `train:` section shared by every method of the reviews demos (same steps, batch, lr)."""
    return {
        "output_dir": str(out_dir),
        "seed": seed,
        "max_steps": s["steps"],
        "batch_size": 16,
        "learning_rate": 1e-3,
        "warmup_steps": 10,
        "log_every": 10,
        "eval_every": s["eval_every"],
        "save_every": 0,
        "progress": True,
    }


def train_one(world, reference, tokenizer, records, method: str, out_dir: Path, seed: int, s: dict) -> dict:
    """Train one method from the reference; returns final ground-truth metrics and the curve over training."""
    cfg = build(
        dpo.Config,
        {
            "model": {"name_or_path": s["model"]},  # recorded in config.yaml for `prefalign eval`
            "data": {"max_length": 64, "max_prompt_length": 16},
            "loss": METHODS[method],
            "train": train_settings(out_dir, seed, s),
        },
    )

    def evaluate_fn(model):
        return world_metrics(world, model, reference, s["eval_samples"], seed)

    result = runner.run(
        cfg, records=records, eval_records=[], model=copy.deepcopy(reference), tokenizer=tokenizer,
        evaluate_fn=evaluate_fn,
    )  # fmt: skip
    curve = [r for r in result.history if "eval/kl" in r]
    final = world_metrics(world, result.model, reference, s["final_samples"], seed + 1000)
    return {**final, "curve": curve}


def run(out_dir: Path, quick: bool = False, seeds: list[int] | None = None) -> dict:
    seeds = seeds or [0]
    s = settings(quick)
    out_dir = Path(out_dir)
    world = ReviewsWorld(seed=0, quick=quick)
    reference, tokenizer = world.reference()
    per_seed: dict[str, list[dict]] = {"reference": [], **{m: [] for m in METHODS}}
    for seed in seeds:
        prompts = world.train_prompts * s["pairs_per_prompt"]
        records, _ = world.preference_data(
            prompts, TARGET, n_responses=2, temperature=ANNOTATOR_TEMPERATURE, seed=seed
        )
        save_jsonl(records, out_dir / "data" / f"train-seed{seed}.jsonl")
        if seed == seeds[0]:
            save_jsonl(records, out_dir / "data" / "train.jsonl")
        per_seed["reference"].append(
            world_metrics(world, reference, reference, s["final_samples"], seed + 1000)
        )
        for method in METHODS:
            per_seed[method].append(
                train_one(
                    world, reference, tokenizer, records, method, out_dir / f"seed{seed}" / method, seed, s
                )
            )
    return write_outputs(out_dir, per_seed, seeds, quick, len(records))


def write_outputs(out_dir: Path, per_seed: dict, seeds: list[int], quick: bool, n_records: int) -> dict:
    keys = ("true_reward", "kl", "win_rate")
    summary: dict = {"target_type": TARGET, "seeds": seeds, "quick": quick, "n_train_pairs": n_records}
    rows = []
    for method, results in per_seed.items():
        stats = {k: mean_std([r[k] for r in results]) for k in keys}
        summary[method] = {k: stats[k][0] for k in keys}
        summary[method].update({f"{k}_std": stats[k][1] for k in keys})
        summary[method]["per_seed"] = [{k: r[k] for k in keys} for r in results]
        rows.append({"method": method, **{k: stats[k] for k in keys}})
    margins = [d["true_reward"] - r["true_reward"] for d, r in zip(per_seed["dpo"], per_seed["reference"])]
    summary["dpo_margin_over_reference"] = dict(zip(("mean", "std"), mean_std(margins)))

    # curves of the first seed: true reward against KL, and both against steps (step 0 = the reference)
    start = per_seed["reference"][0]
    series_kl, series_steps = {}, {}
    for method in METHODS:
        curve = per_seed[method][0]["curve"]
        kls = [0.0] + [r["eval/kl"] for r in curve]
        rewards = [start["true_reward"]] + [r["eval/true_reward"] for r in curve]
        steps = [0] + [r["step"] for r in curve]
        series_kl[method] = (kls, rewards)
        series_steps[method] = (steps, rewards)
    plot_lines(
        out_dir / "reward_vs_kl.png",
        series_kl,
        "KL(π‖π_ref) (nats)",
        f"true reward ({TARGET})",
        "true reward vs KL over training",
        markers=True,
    )
    plot_lines(
        out_dir / "reward_vs_step.png",
        series_steps,
        "step",
        f"true reward ({TARGET})",
        "true reward over training",
        markers=True,
    )
    m = summary["dpo_margin_over_reference"]
    sections = [
        f"Reviews world; preferences from annotators of type `{TARGET}` (Plackett–Luce sampled), "
        f"annotator temperature {ANNOTATOR_TEMPERATURE}, {n_records} pairs per seed, seeds {seeds}{' (quick)' if quick else ''}. "
        "Policies start from the world's SFT reference; evaluation samples held-out prompts.",
        "## Results (mean ± std over seeds)\n\n" + markdown_table(rows, ["method", *keys]),
        f"DPO raises the true reward by **{m['mean']:.3f} ± {m['std']:.3f}** over the reference.",
        "## Over training (first seed)\n\n![reward vs KL](reward_vs_kl.png)\n\n![reward vs step](reward_vs_step.png)",
    ]
    write_report(out_dir, "DPO and IPO on the reviews world", sections)
    write_summary(out_dir, summary)
    return summary
