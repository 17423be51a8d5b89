"""`prefalign demo dpo`: reviews world -> reference SFT -> preferences of one annotator type -> DPO and IPO
-> ground-truth evaluation (true reward, KL to the reference, win rate) -> report.md + summary.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.data import save_jsonl
from prefalign.core.report import (
    markdown_table,
    mean_std,
    plot_lines,
    write_report,
    write_summary,
)
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


def data_settings(data_file: Path | None) -> dict:
    """The `data:` section of the demos' runs: the saved training file (recorded in config.yaml, so `prefalign
    eval` finds the run's prompts and world.json; the records themselves are passed in memory), no split."""
    data = {"max_length": 64, "max_prompt_length": 16}
    return {**data, "train": str(data_file), "eval_fraction": 0.0} if data_file else data


def write_world(out_dir: Path, model: str, quick: bool, demo: str, preferences: str) -> Path:
    """data/world.json: which world and annotator type made the data (runs trained on it copy it, and
    `prefalign eval` then reports ground truth for that type)."""
    path = out_dir / "data" / "world.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    made_by = f"prefalign demo {demo}{' --quick' if quick else ''}"
    info = {"world": model, "annotator_types": {TARGET: 1.0}, "made_by": made_by, "preferences": preferences}
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def measures(world, s: dict) -> str:
    """The report's line defining its three measures."""
    return (
        f"**Measures** (the world's ground truth on its {len(world.eval_prompts)} held-out prompts, samples at "
        f"temperature 1): *true reward* = mean `{TARGET}` reward of the policy's samples (each in [−1, 1]); "
        "*KL* = KL(π‖π_ref) to the reference policy in nats per response, estimated on the policy's samples; "
        "*win rate* = P(a policy sample's true reward > a **reference-policy** sample's on the same prompt) "
        "+ ½·P(tie), so 0.5 means no better than the reference. The table samples "
        f"{s['final_samples']} responses per prompt."
    )


def train_one(world, reference, tokenizer, records, method: str, out_dir: Path, seed: int, s: dict,
              data_file: Path | None = None) -> dict:  # fmt: skip
    """Train one method from the reference; returns final ground-truth metrics and the curve over training."""
    cfg = build(
        dpo.Config,
        {
            "model": {"name_or_path": s["model"]},  # recorded in config.yaml for `prefalign eval`
            "data": data_settings(data_file),
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
    write_world(out_dir, s["model"], quick, "dpo", f"Plackett-Luce, temperature {ANNOTATOR_TEMPERATURE}")
    per_seed: dict[str, list[dict]] = {"reference": [], **{m: [] for m in METHODS}}
    for seed in seeds:
        prompts = world.train_prompts * s["pairs_per_prompt"]
        records, _ = world.preference_data(
            prompts, TARGET, n_responses=2, temperature=ANNOTATOR_TEMPERATURE, seed=seed
        )
        data_file = save_jsonl(records, out_dir / "data" / f"train-seed{seed}.jsonl")
        if seed == seeds[0]:
            save_jsonl(records, out_dir / "data" / "train.jsonl")
        per_seed["reference"].append(
            world_metrics(world, reference, reference, s["final_samples"], seed + 1000)
        )
        for method in METHODS:
            per_seed[method].append(
                train_one(
                    world,
                    reference,
                    tokenizer,
                    records,
                    method,
                    out_dir / f"seed-{seed}" / method,
                    seed,
                    s,
                    data_file,
                )  # fmt: skip
            )
    return write_outputs(out_dir, per_seed, seeds, quick, len(records), world, s)


def seed_columns(per_seed: dict, keys, summary: dict) -> list[dict]:
    """Table rows and summary entries per method: the mean, and the std over seeds (null for one seed:
    there is no spread to show)."""
    rows = []
    for method, results in per_seed.items():
        stats = {k: mean_std([r[k] for r in results]) for k in keys}
        summary[method] = {k: stats[k][0] for k in keys}
        summary[method].update({f"{k}_std": stats[k][1] if len(results) > 1 else None for k in keys})
        summary[method]["per_seed"] = [{k: r[k] for k in keys} for r in results]
        rows.append({"method": method, **stats})  # one seed: std 0, printed as the mean alone (`report.pm`)
    return rows


def seeds_heading(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"one seed ({seeds[0]}): no spread to show; `--seeds 3` gives mean ± std"
    return f"mean ± sample std over {len(seeds)} seeds {seeds}"


def curve_vs_table(per_seed: dict, methods, s: dict) -> str:
    """Why the curves' last points and the table differ for the same final model, with both numbers."""
    ends = []
    for method in methods:
        curve, final = per_seed[method][0]["curve"], per_seed[method][0]
        if curve:
            ends.append(
                f"{method} {curve[-1]['eval/true_reward']:.3f} (KL {curve[-1]['eval/kl']:.2f}) in the curve, "
                f"{final['true_reward']:.3f} (KL {final['kl']:.2f}) in the table"
            )
    return (
        f"The curves evaluate during training with {s['eval_samples']} samples per prompt (sampling seed = "
        f"the training seed); the table evaluates each final model again with {s['final_samples']} samples "
        "per prompt and another sampling seed. So the curve's last point and the table measure the same model "
        "with different samples and differ by sampling noise (first seed: " + "; ".join(ends) + ")."
    )


def write_outputs(out_dir: Path, per_seed: dict, seeds: list[int], quick: bool, n_records: int, world,
                  s: dict) -> dict:  # fmt: skip
    keys = ("true_reward", "kl", "win_rate")
    summary: dict = {"target_type": TARGET, "seeds": seeds, "quick": quick, "n_train_pairs": n_records}
    rows = seed_columns(per_seed, keys, summary)
    margins = [d["true_reward"] - r["true_reward"] for d, r in zip(per_seed["dpo"], per_seed["reference"])]
    margin_mean, margin_std = mean_std(margins)
    summary["dpo_margin_over_reference"] = {
        "mean": margin_mean,
        "std": margin_std if len(margins) > 1 else None,
    }

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
        steps={method: steps for method, (steps, _) in series_steps.items()},
    )
    plot_lines(
        out_dir / "reward_vs_step.png",
        series_steps,
        "step",
        f"true reward ({TARGET})",
        "true reward over training",
        markers=True,
    )
    margin = f"{margin_mean:.3f}" + (f" ± {margin_std:.3f}" if len(margins) > 1 else "")
    sections = [
        f"Reviews world; preferences from annotators of type `{TARGET}` (Plackett–Luce sampled), "
        f"annotator temperature {ANNOTATOR_TEMPERATURE}, {n_records} pairs per seed, seeds {seeds}{' (quick)' if quick else ''}. "
        "Policies start from the world's SFT reference; evaluation samples held-out prompts.",
        measures(world, s),
        f"## Results ({seeds_heading(seeds)})\n\n" + markdown_table(rows, ["method", *keys]),
        f"DPO raises the true reward by **{margin}** over the reference.",
        "## Over training (first seed)\n\n![reward vs KL](reward_vs_kl.png)\n\n![reward vs step](reward_vs_step.png)"
        "\n\n" + curve_vs_table(per_seed, METHODS, s),
    ]
    write_report(out_dir, "DPO and IPO on the reviews world", sections)
    write_summary(out_dir, summary)
    return summary
