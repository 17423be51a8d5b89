"""`prefalign demo sspo`: does SSPO without pairs match Diffusion-DPO with pairs, and beat SFT on winners?

Digits world: a small class-conditional DDPM (cached) generates two samples per label; the world's judge
orders them (AI feedback). Diffusion-DPO trains on the pairs; SFT and SSPO see only the winners. Ablations:
SSPO with the reference checkpoint always the initial model, always the latest, and without SSR.
Every row is scored by the *held-out* evaluator (never the judge) on fresh samples; `diversity` is the
within-class spread relative to real digits.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.report import markdown_table, mean_std, plot_bars, plot_lines, write_report, write_summary
from prefalign.methods import diffusion_dpo, sspo
from prefalign.worlds.digits import make_world, save_grid
from prefalign.worlds.digits_ddpm import judge_labelled_pairs, load_digits_ddpm, sample_digits

ROWS = ["base", "sft", "diffusion_dpo", "sspo", "sspo_initial", "sspo_latest", "sspo_no_ssr"]
SSPO_VARIANTS = {  # row -> SSPO config overrides
    "sspo": {},
    "sspo_initial": {"sspo": {"bank": {"draw": "initial"}}},
    "sspo_latest": {"sspo": {"bank": {"draw": "latest"}}},
    "sspo_no_ssr": {"loss": {"ssr": "none"}},
}


def settings(quick: bool) -> dict:
    return {
        "n_pairs": 300 if quick else 1000,
        "pair_sample_steps": 10 if quick else 20,
        "max_steps": 60 if quick else 150,
        "batch_size": 32,
        "learning_rate": 1e-4,
        "beta": 2000.0,
        "bank_size": 7,
        "save_every": 10 if quick else 20,
        "ref_sample_steps": 5 if quick else 10,
        "eval_per_class": 30 if quick else 50,
        "eval_steps": 10 if quick else 20,
    }


def evaluate(unet, scheduler, s: dict, seed: int) -> tuple[dict, torch.Tensor]:
    world = make_world(0)
    labels = torch.arange(10).repeat(
        s["eval_per_class"]
    )  # the first 100 samples: a 10x10 grid, column = class
    x = sample_digits(unet, scheduler, labels, steps=s["eval_steps"], seed=10_000 + seed)
    return {"score": float(world.score(x, labels).mean()), "diversity": world.diversity(x, labels)}, x


def run_seed(seed: int, s: dict, out_dir: Path, quick: bool) -> dict:
    seed_dir = out_dir / f"seed-{seed}"
    unet, scheduler = load_digits_ddpm(quick=quick)
    pairs = judge_labelled_pairs(unet, scheduler, s["n_pairs"], steps=s["pair_sample_steps"], seed=seed)
    seed_dir.mkdir(parents=True, exist_ok=True)
    np.savez(seed_dir / "pairs.npz", **pairs)
    train = {
        "max_steps": s["max_steps"],
        "batch_size": s["batch_size"],
        "learning_rate": s["learning_rate"],
        "lr_scheduler": "constant",
        "seed": seed,
        "log_every": 5,
        "resume": False,
        "progress": True,
    }
    model = {"name_or_path": "world:digits-quick" if quick else "world:digits"}
    data = {"train": str(seed_dir / "pairs.npz")}
    results, samples, flips = {}, {}, {}
    results["base"], samples["base"] = evaluate(unet, scheduler, s, seed)
    runs = {
        "sft": (sspo, {"data": data, "loss": {"name": "sft"}}),
        "diffusion_dpo": (diffusion_dpo, {"data": data, "loss": {"beta": s["beta"]}}),
    }
    for row, overrides in SSPO_VARIANTS.items():
        cfg = {
            "data": data,
            "loss": {"beta": s["beta"]},
            "sspo": {
                "reference_sample": {"steps": s["ref_sample_steps"]},
                "bank": {"size": s["bank_size"], "save_every": s["save_every"]},
            },
        }
        for key, value in overrides.items():  # two levels deep: sspo.bank.draw, loss.ssr
            for sub, item in value.items():
                cfg[key][sub] = {**cfg[key].get(sub, {}), **item} if isinstance(item, dict) else item
        runs[row] = (sspo, cfg)
    for row, (module, cfg) in runs.items():
        start = time.time()
        config = build(
            module.Config, {"model": model, **cfg, "train": {**train, "output_dir": str(seed_dir / row)}}
        )
        result = runner.run(config)
        trained = result.model.eval()
        results[row], samples[row] = evaluate(trained, scheduler, s, seed)
        results[row]["train_s"] = round(time.time() - start, 1)
        history = [r for r in result.history if "sspo/flip_rate" in r]
        if history:
            flips[row] = ([r["step"] for r in history], [r["sspo/flip_rate"] for r in history])
    results["judge_winner_score"] = float(np.mean(pairs["judge_chosen"]))
    return {"results": results, "samples": samples, "flips": flips}


def run(out_dir: Path, quick: bool = False, seeds: list[int] | None = None) -> dict:
    seeds = seeds or ([0] if quick else [0, 1, 2])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s, start = settings(quick), time.time()
    load_digits_ddpm(quick=quick)  # train (or load) the base once before timing the methods
    per_seed = [run_seed(seed, s, out_dir, quick) for seed in seeds]
    rows = {
        r: {m: mean_std([p["results"][r][m] for p in per_seed]) for m in ("score", "diversity")} for r in ROWS
    }
    summary = {
        "demo": "sspo", "quick": quick, "seeds": seeds, "settings": s, "rows": rows,
        "per_seed": [{r: p["results"][r] for r in ROWS} for p in per_seed],
        "wall_time_s": round(time.time() - start, 1),
    }  # fmt: skip
    write_summary(out_dir, summary)

    first = per_seed[0]
    for row in ROWS:
        save_grid(out_dir / f"samples_{row}.png", first["samples"][row][:100])
    plot_bars(
        out_dir / "scores.png",
        {r: rows[r]["score"] for r in ROWS},
        "held-out evaluator score",
        title=f"mean ± std over seeds {seeds}",
    )
    flip_rows = [r for r in SSPO_VARIANTS if r in first["flips"]]
    plot_lines(
        out_dir / "flip_rate.png",
        {r: first["flips"][r] for r in flip_rows},
        "step",
        "sspo/flip_rate",
        title=f"fraction of s = -1 (seed {seeds[0]})",
    )
    table = markdown_table([{"method": r, **rows[r]} for r in ROWS], ["method", "score", "diversity"])
    score = {r: rows[r]["score"][0] for r in ROWS}
    spread = max(rows["sspo"]["score"][1], rows["diffusion_dpo"]["score"][1], rows["sft"]["score"][1])
    vs_dpo, vs_sft = score["sspo"] - score["diffusion_dpo"], score["sspo"] - score["sft"]
    verdict = (
        f"SSPO (winners only) − Diffusion-DPO (pairs): {vs_dpo:+.3f}; SSPO − SFT on winners: {vs_sft:+.3f}; "
        f"SSPO − base: {score['sspo'] - score['base']:+.3f} (largest seed std of the three: {spread:.3f}). "
        f"SSPO {'matches' if vs_dpo >= -spread else 'does not match'} Diffusion-DPO and "
        f"{'beats' if vs_sft > spread else 'does not beat'} SFT beyond that spread."
    )
    grids = "\n".join(f"**{r}**\n\n![{r}](samples_{r}.png)\n" for r in ROWS)
    write_report(out_dir, "SSPO vs Diffusion-DPO vs SFT on digits", [
        f"Seeds {seeds} (mean ± std over seeds), {'quick' if quick else 'full'} settings `{s}`; "
        f"wall time {summary['wall_time_s']} s.",
        "A small class-conditional DDPM generates two samples per label; the digits world's judge (logistic "
        "regression) orders them. Diffusion-DPO trains on the pairs; SFT and SSPO see only the winners. "
        "`score` = the held-out MLP evaluator's mean probability of the intended class on fresh samples "
        "(never the judge); `diversity` = within-class spread relative to real digits.",
        "## Result\n" + table + "\n\n" + verdict + "\n\n![scores](scores.png)",
        "## SSR flip rate during training\nFraction of examples where the current model denoises the winner "
        "worse than the drawn checkpoint (s = -1, SFT-like update).\n\n![flip rate](flip_rate.png)",
        "## Samples (seed " + str(seeds[0]) + "; column = class 0..9)\n" + grids,
    ])  # fmt: skip
    return summary
