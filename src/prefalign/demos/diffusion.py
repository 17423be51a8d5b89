"""`prefalign demo diffusion`: Diffusion-DPO on a text-to-image pipeline, against ground truth.

The digits world as text-to-image (`worlds/digits_text.py`): a tiny Stable-Diffusion-style pipeline (CLIP
text encoder, VAE, latent UNet; trained once, cached) draws two images per caption "a handwritten d"; the
world's judge orders them (AI feedback). The pairs are saved as images with captions, so every method trains
through the pipeline's VAE and text encoder, as on Pick-a-Pic data. Rows: the base, SFT on the winners,
Diffusion-DPO (full fine-tuning and LoRA) and SSPO (winners only). Every row is scored by the *held-out*
evaluator (never the judge) on fresh samples of each caption (no guidance).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.pipelines import load_trained
from prefalign.core.report import markdown_table, mean_std, plot_bars, pm, write_report, write_summary
from prefalign.methods import diffusion_dpo, sspo
from prefalign.worlds.digits import save_grid
from prefalign.worlds.digits_text import evaluate, judge_labelled_pairs, load_digits_text, sample_digits

ROWS = ["base", "sft", "diffusion_dpo", "diffusion_dpo_lora", "sspo"]


def settings(quick: bool) -> dict:
    return {
        "n_pairs": 300 if quick else 1000,  # judge-ordered pairs of base samples per seed
        "pair_sample_steps": 10 if quick else 20,
        "max_steps": 60 if quick else 150,
        "batch_size": 32,
        "learning_rate": 1e-4,
        "beta": 2000.0,
        "bank_size": 7,
        "save_every": 10 if quick else 20,
        "eval_per_class": 30 if quick else 50,
        "eval_steps": 10 if quick else 20,  # DDIM steps of evaluation and of SSPO's reference samples
        "lora_learning_rate": 1e-3,
        "lora_r": 8,
    }


def run_seed(seed: int, s: dict, out_dir: Path, quick: bool) -> dict:
    seed_dir = out_dir / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    base = load_digits_text(quick=quick)
    pairs = judge_labelled_pairs(base, s["n_pairs"], steps=s["pair_sample_steps"], seed=seed)
    np.savez(seed_dir / "pairs.npz", **pairs)
    train = {
        "max_steps": s["max_steps"], "batch_size": s["batch_size"], "learning_rate": s["learning_rate"],
        "lr_scheduler": "constant", "seed": seed, "log_every": 10, "resume": False, "progress": True,
    }  # fmt: skip
    model = {"name_or_path": "world:digits-text-quick" if quick else "world:digits-text"}
    data = {"train": str(seed_dir / "pairs.npz")}
    lora = {"enabled": True, "r": s["lora_r"], "alpha": s["lora_r"]}
    runs = {
        "sft": (sspo, {"model": model, "loss": {"name": "sft"}}),
        "diffusion_dpo": (diffusion_dpo, {"model": model, "loss": {"beta": s["beta"]}}),
        "diffusion_dpo_lora": (diffusion_dpo, {"model": {**model, "lora": lora}, "loss": {"beta": s["beta"]},
                                               "train": {"learning_rate": s["lora_learning_rate"]}}),
        "sspo": (sspo, {"model": model, "loss": {"beta": s["beta"]}, "sspo": {
            "bank": {"size": s["bank_size"], "save_every": s["save_every"]},
            "reference_sample": {"steps": s["eval_steps"]}}}),
    }  # fmt: skip
    scoring = {"samples_per_class": s["eval_per_class"], "steps": s["eval_steps"], "seed": 10_000 + seed}
    results, samples = {"base": evaluate(base, **scoring)}, {}
    labels = list(range(10)) * 10
    samples["base"] = sample_digits(base, labels, steps=s["eval_steps"], seed=10_000 + seed)
    for row, (module, cfg) in runs.items():
        start = time.time()
        config = build(
            module.Config,
            {
                **cfg,
                "data": data,
                "train": {**train, **cfg.get("train", {}), "output_dir": str(seed_dir / row)},
            },
        )
        trained = load_trained(runner.run(config).run_dir, config.model)
        results[row] = {**evaluate(trained, **scoring), "train_s": round(time.time() - start, 1)}
        samples[row] = sample_digits(trained, labels, steps=s["eval_steps"], seed=10_000 + seed)
    results["judge_winner_score"] = float(np.mean(pairs["judge_chosen"]))
    return {"results": results, "samples": samples}


def run(
    out_dir: Path, quick: bool = False, seeds: list[int] | None = None, overrides: dict | None = None
) -> dict:
    """The demo; `overrides` replaces settings (tests use a tiny form)."""
    seeds = seeds or ([0] if quick else [0, 1, 2])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s, start = {**settings(quick), **(overrides or {})}, time.time()
    load_digits_text(quick=quick)  # train (or load) the base pipeline once, before timing the methods
    per_seed = [run_seed(seed, s, out_dir, quick) for seed in seeds]
    rows = {
        r: {m: mean_std([p["results"][r][m] for p in per_seed]) for m in ("score", "diversity")} for r in ROWS
    }
    gains = {
        r: mean_std([p["results"][r]["score"] - p["results"]["base"]["score"] for p in per_seed])
        for r in ROWS[1:]
    }
    summary = {
        "demo": "diffusion", "quick": quick, "seeds": seeds, "settings": s, "rows": rows, "gain_over_base": gains,
        "per_seed": [{r: p["results"][r] for r in ROWS} for p in per_seed], "wall_time_s": round(time.time() - start, 1),
    }  # fmt: skip
    write_summary(out_dir, summary)
    for row in ROWS:  # red digit: the caption each sample was drawn for
        save_grid(out_dir / f"samples_{row}.png", per_seed[0]["samples"][row], labels=list(range(10)) * 10,
                  title=f"{row}, seed {seeds[0]}: red = the captioned digit")  # fmt: skip
    spread = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0]}): no spread"
    plot_bars(out_dir / "scores.png", {r: rows[r]["score"] for r in ROWS}, "held-out evaluator score",
              title=spread)  # fmt: skip
    table = markdown_table(
        [{"method": r, **rows[r], "gain over base": gains.get(r, (0.0, 0.0))} for r in ROWS],
        ["method", "score", "diversity", "gain over base"],
    )
    dpo_gain, dpo_spread = gains["diffusion_dpo"]
    over = f"mean ± std of the per-seed gain over {len(seeds)} seeds" if len(seeds) > 1 else "one seed"
    verdict = (
        f"Diffusion-DPO − base: {pm(dpo_gain, dpo_spread, signed=True)} ({over}); "
        f"LoRA: {gains['diffusion_dpo_lora'][0]:+.3f}; SSPO (winners only): {gains['sspo'][0]:+.3f}; "
        f"SFT on the winners: {gains['sft'][0]:+.3f}."
    )
    grids = "\n".join(f"**{r}**\n\n![{r}](samples_{r}.png)\n" for r in ROWS)
    write_report(out_dir, "Diffusion-DPO on a text-to-image pipeline (digits world)", [
        f"Seeds {seeds}, {'quick' if quick else 'full'} settings `{s}`; wall time {summary['wall_time_s']} s.",
        "A tiny Stable-Diffusion-style pipeline (CLIP text encoder, VAE, latent UNet) draws two images per "
        "caption 'a handwritten d'; the digits world's judge orders them. Every method trains through the "
        "pipeline's VAE and text encoder. `score` = the held-out MLP evaluator's mean probability of the "
        "captioned digit on fresh samples (never the judge); `diversity` = within-class spread relative to "
        "real digits.",
        "## Result\n" + table + "\n\n" + verdict + "\n\n![scores](scores.png)",
        "## Samples (seed " + str(seeds[0]) + "; column = caption 0..9)\n" + grids,
    ])  # fmt: skip
    return summary
