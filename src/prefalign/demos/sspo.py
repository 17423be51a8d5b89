"""`prefalign demo sspo`: SSPO with winners the base model did not generate, as in the paper.

The paper trains SD-1.5 on Pick-a-Pic winners: images from outside the model, better than its own samples.
Here the winners are real digits of the digits world's `judge` split: the base DDPM was trained on the
`train` split and never saw them, and the held-out evaluator was fitted on the `eval` split, so they are
external to the model and to the score alike (the world's judge was fitted on them, but the judge scores
nothing here). On them: SFT; Diffusion-DPO on pairs (the external winner vs a base sample of the same label,
the pair SSPO's first step forms against the initial model); SSPO with the SSR rule `sign` (its sign from
the loss's single (t, ε) draw, and from the mean of several draws), `indicator` and `none` (no SSR).
Control rows: SFT and SSPO on the base's own samples ordered by the judge (the previous demo's winners).
Every sampler call — evaluation, SSPO's reference samples, Diffusion-DPO's losers, the control winners —
uses the same DDIM step count. Every row is scored by the held-out evaluator on fresh samples.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.report import markdown_table, mean_std, plot_bars, plot_lines, write_report, write_summary
from prefalign.demos.sspo_claims import check_claims, claim_lines
from prefalign.methods import diffusion_dpo, sspo
from prefalign.worlds.digits import make_world, save_grid
from prefalign.worlds.digits_ddpm import judge_labelled_pairs, load_digits_ddpm, sample_digits

# row -> (winners: "external" | "self", method, config overrides on top of the common SSPO config)
RUNS = {
    "sft": ("external", sspo, {"loss": {"name": "sft"}}),
    "diffusion_dpo": ("external", diffusion_dpo, {}),
    "sspo_sign": ("external", sspo, {"loss": {"ssr": "sign"}}),
    "sspo_sign_multi": ("external", sspo, {"loss": {"ssr": "sign"}, "sspo": {"sign_draws": "SIGN_DRAWS"}}),
    "sspo_indicator": ("external", sspo, {"loss": {"ssr": "indicator"}}),
    "sspo_none": ("external", sspo, {"loss": {"ssr": "none"}}),
    "sft_self": ("self", sspo, {"loss": {"name": "sft"}}),
    "sspo_self": ("self", sspo, {"loss": {"ssr": "sign"}}),
}
FULL_ONLY = {  # random checkpoint replay's ablations (the full demo only: the quick one keeps to 3 minutes)
    "sspo_initial": ("external", sspo, {"loss": {"ssr": "sign"}, "sspo": {"bank": {"draw": "initial"}}}),
    "sspo_latest": ("external", sspo, {"loss": {"ssr": "sign"}, "sspo": {"bank": {"draw": "latest"}}}),
}
CHECKED = ("sspo_sign", "sspo_sign_multi")  # rows that log sspo/sign_agreement
LABELS = {
    "base": "the base DDPM",
    "sft": "SFT on the external winners",
    "diffusion_dpo": "Diffusion-DPO: external winner vs a base sample",
    "sspo_sign": "SSPO, SSR sign from one (t, ε) draw",
    "sspo_sign_multi": "SSPO, SSR sign from the mean of {sign_draws} draws",
    "sspo_indicator": "SSPO, SSR indicator (one draw)",
    "sspo_none": "SSPO without SSR",
    "sft_self": "control: SFT on the base's own judge winners",
    "sspo_self": "control: SSPO (sign) on the base's own judge winners",
    "sspo_initial": "SSPO (sign), the checkpoint always the initial model",
    "sspo_latest": "SSPO (sign), the checkpoint always the latest snapshot",
}


def runs(quick: bool) -> dict:
    return RUNS if quick else {**RUNS, **FULL_ONLY}


def settings(quick: bool) -> dict:
    return {
        "n_winners": 300 if quick else 0,  # external winners (0: the whole judge split, 539 digits)
        "n_self_pairs": 300 if quick else 1000,  # the control rows' judge-ordered base samples
        "max_steps": 60 if quick else 150,
        "batch_size": 32,
        "learning_rate": 1e-4,
        "beta": 2000.0,
        "bank_size": 7,
        "save_every": 10 if quick else 20,
        "sample_steps": 10 if quick else 20,  # DDIM steps of evaluation, x_ref, DPO losers, self winners
        "eval_per_class": 30 if quick else 50,
        "sign_draws": 8,
        "sign_check_draws": 32 if quick else 64,
        "sign_check_every": 10,
        "log_every": 5,
    }


def external_winners(n: int, seed: int) -> dict:
    """Real digits of the world's `judge` split (never seen by the base DDPM nor by the evaluator): all of
    them for n = 0, else a seeded subset of n. Pixels [N,1,8,8] in [0, 1] and labels [N]."""
    split = make_world(0).splits["judge"]
    index = torch.arange(len(split["labels"]))
    if 0 < n < len(index):
        index = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))[:n]
    return {"chosen": split["images"][index], "context": split["labels"][index]}


def evaluate(unet, scheduler, s: dict, seed: int) -> tuple[dict, torch.Tensor]:
    world = make_world(0)
    labels = torch.arange(10).repeat(
        s["eval_per_class"]
    )  # the first 100 samples: a 10x10 grid, column = class
    x = sample_digits(unet, scheduler, labels, steps=s["sample_steps"], seed=10_000 + seed)
    return {"score": float(world.score(x, labels).mean()), "diversity": world.diversity(x, labels)}, x


def write_data(unet, scheduler, s: dict, seed: int, seed_dir: Path) -> dict:
    """external.npz (winners + a base sample of the same label as Diffusion-DPO's loser), self.npz (the
    control: two base samples per label ordered by the judge). Returns the winners' evaluator scores."""
    world = make_world(0)
    winners = external_winners(s["n_winners"], seed)
    losers = sample_digits(unet, scheduler, winners["context"], steps=s["sample_steps"], seed=20_000 + seed)
    np.savez(seed_dir / "external.npz", chosen=winners["chosen"].numpy(), rejected=losers.numpy(),
             context=winners["context"].numpy())  # fmt: skip
    pairs = judge_labelled_pairs(unet, scheduler, s["n_self_pairs"], steps=s["sample_steps"], seed=seed)
    np.savez(seed_dir / "self.npz", **pairs)
    return {
        "external_winners": float(world.score(winners["chosen"], winners["context"]).mean()),
        "external_losers": float(world.score(losers, winners["context"]).mean()),
        "self_winners": float(world.score(torch.as_tensor(pairs["chosen"]), torch.as_tensor(pairs["context"])).mean()),
    }  # fmt: skip


def row_config(row: str, s: dict, seed: int, seed_dir: Path, quick: bool):
    winners, module, overrides = runs(quick)[row]
    cfg = {
        "model": {"name_or_path": "world:digits-quick" if quick else "world:digits"},
        "data": {"train": str(seed_dir / f"{winners}.npz")},
        "loss": {"beta": s["beta"]},
        "train": {
            "output_dir": str(seed_dir / row), "max_steps": s["max_steps"], "batch_size": s["batch_size"],
            "learning_rate": s["learning_rate"], "lr_scheduler": "constant", "seed": seed,
            "log_every": s["log_every"], "resume": False, "progress": True,
        },
    }  # fmt: skip
    if module is sspo:
        cfg["sspo"] = {
            "reference_sample": {"steps": s["sample_steps"]},  # the evaluation's step count
            "bank": {"size": s["bank_size"], "save_every": s["save_every"]},
        }
        if row in CHECKED:
            cfg["sspo"].update(sign_check_draws=s["sign_check_draws"], sign_check_every=s["sign_check_every"])
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict):  # sspo.bank.draw
                cfg[section][key] = {**cfg[section].get(key, {}), **value}
            else:
                cfg[section][key] = s["sign_draws"] if value == "SIGN_DRAWS" else value
    if cfg["loss"].get("name") == "sft":
        del cfg["loss"]["beta"]  # SFT has no β
    return build(module.Config, cfg)


def history_mean(history: list[dict], key: str) -> float | None:
    values = [r[key] for r in history if key in r]
    return float(np.mean(values)) if values else None


def run_seed(seed: int, s: dict, out_dir: Path, quick: bool) -> dict:
    seed_dir = out_dir / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    unet, scheduler = load_digits_ddpm(quick=quick)
    data_scores = write_data(unet, scheduler, s, seed, seed_dir)
    results, samples, flips = {}, {}, {}
    results["base"], samples["base"] = evaluate(unet, scheduler, s, seed)
    for row in runs(quick):
        start = time.time()
        result = runner.run(row_config(row, s, seed, seed_dir, quick))
        results[row], samples[row] = evaluate(result.model.eval(), scheduler, s, seed)
        results[row]["train_s"] = round(time.time() - start, 1)
        for key in ("sspo/flip_rate", "sspo/sign_agreement", "sspo/sign_agreement_one_draw"):
            value = history_mean(result.history, key)
            if value is not None:
                results[row][key.split("/")[1]] = value
        lines = [r for r in result.history if "sspo/flip_rate" in r]
        if lines:
            flips[row] = ([r["step"] for r in lines], [r["sspo/flip_rate"] for r in lines])
    return {"results": results, "samples": samples, "flips": flips, "data_scores": data_scores}


def aggregate(per_seed: list[dict]) -> dict:
    """rows.<row>.<metric> = (mean, std) over seeds; gain = the per-seed difference to the base."""
    rows = {}
    for row in per_seed[0]:
        metrics = {m: mean_std([p[row][m] for p in per_seed]) for m in ("score", "diversity")}
        metrics["gain"] = mean_std([p[row]["score"] - p["base"]["score"] for p in per_seed])
        for m in ("flip_rate", "sign_agreement", "sign_agreement_one_draw", "train_s"):
            if m in per_seed[0][row]:
                metrics[m] = mean_std([p[row][m] for p in per_seed])
        rows[row] = metrics
    return rows


def run(
    out_dir: Path, quick: bool = False, seeds: list[int] | None = None, overrides: dict | None = None
) -> dict:
    """The demo; `overrides` replaces settings (tests use a tiny form)."""
    seeds = seeds or ([0] if quick else [0, 1, 2])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = {**settings(quick), **(overrides or {})}
    load_before, start, cpu_start = os.getloadavg(), time.time(), time.process_time()
    load_digits_ddpm(quick=quick)  # train (or load) the base once before timing the methods
    outputs = [run_seed(seed, s, out_dir, quick) for seed in seeds]
    per_seed = [o["results"] for o in outputs]
    rows = aggregate(per_seed)
    claims = check_claims(per_seed, rows)
    summary = {
        "demo": "sspo", "quick": quick, "seeds": seeds, "settings": s,
        "winners": {
            "source": "real digits of the digits world's judge split (never seen by the base DDPM or the "
                      "evaluator)",
            "evaluator_score": mean_std([o["data_scores"]["external_winners"] for o in outputs]),
            "dpo_loser_score": mean_std([o["data_scores"]["external_losers"] for o in outputs]),
            "self_winner_score": mean_std([o["data_scores"]["self_winners"] for o in outputs]),
        },
        "dpo_pairs": "external winner vs a base sample of the same label (sampled with settings.sample_steps)",
        "rows": rows, "claims": claims, "per_seed": per_seed,
        "wall_time_s": round(time.time() - start, 1), "cpu_time_s": round(time.process_time() - cpu_start, 1),
        "load_average": {"before": [round(v, 2) for v in load_before],
                         "after": [round(v, 2) for v in os.getloadavg()]},
    }  # fmt: skip
    write_summary(out_dir, summary)
    write_figures(out_dir, outputs[0], rows, seeds)
    write_report(out_dir, "SSPO with external winners on the digits DDPM", report_sections(summary))
    return summary


def write_figures(out_dir: Path, first: dict, rows: dict, seeds: list[int]) -> None:
    for row in rows:
        save_grid(out_dir / f"samples_{row}.png", first["samples"][row][:100])
    plot_bars(out_dir / "scores.png", {r: rows[r]["score"] for r in rows}, "held-out evaluator score",
              title=f"mean ± std over seeds {seeds}")  # fmt: skip
    plot_lines(out_dir / "flip_rate.png", first["flips"], "step", "sspo/flip_rate",
               title=f"fraction of s = -1 (seed {seeds[0]})")  # fmt: skip


def report_sections(summary: dict) -> list[str]:
    s, rows, seeds = summary["settings"], summary["rows"], summary["seeds"]
    label = {r: LABELS[r].format(**s) for r in rows}
    columns = [
        "row",
        "what",
        "score",
        "gain",
        "diversity",
        "flip_rate",
        "sign_agreement",
        "sign_agreement_one_draw",
    ]
    shown = {r: {k: v[0] if len(seeds) == 1 else v for k, v in rows[r].items()} for r in rows}  # 1 seed: no ±
    shown["base"].pop("gain")
    table = markdown_table([{"row": r, "what": label[r], **shown[r]} for r in rows], columns)
    w = summary["winners"]
    load = summary["load_average"]
    grids = "\n".join(f"**{r}** ({label[r]})\n\n![{r}](samples_{r}.png)\n" for r in rows)
    return [
        f"Seeds {seeds} (mean ± std over seeds; `gain` = the per-seed difference to the base), "
        f"{'quick' if summary['quick'] else 'full'} settings `{s}`; wall time {summary['wall_time_s']} s, "
        f"CPU time {summary['cpu_time_s']} s, load average (1/5/15 min) {load['before']} before and "
        f"{load['after']} after.",
        "Winners: "
        + summary["winners"]["source"]
        + f"; the evaluator scores them {w['evaluator_score'][0]:.3f}, "
        f"Diffusion-DPO's losers (base samples) {w['dpo_loser_score'][0]:.3f}, the control rows' winners (the "
        f"base's own samples, judge-ordered) {w['self_winner_score'][0]:.3f}. Every sampler call uses "
        f"{s['sample_steps']} DDIM steps (evaluation and SSPO's reference samples alike). `score` = the held-out "
        "MLP evaluator's mean probability of the intended class on fresh samples (never the judge); `diversity` "
        "= within-class spread relative to real digits; `flip_rate` = fraction of s = −1 over training; "
        f"`sign_agreement` = how often the sign used agrees with the sign of Δ_w averaged over "
        f"{s['sign_check_draws']} fresh (t, ε) draws (`..._one_draw`: the loss's own single draw), checked every "
        f"{s['sign_check_every']} steps on snapshots older than the current model.",
        "## Result\n" + table + "\n\n![scores](scores.png)",
        "## Claims\n" + "\n".join(f"- {line}" for line in claim_lines(summary["claims"])),
        "## SSR flip rate during training\nFraction of examples where the current model denoises the winner "
        "worse than the drawn checkpoint (s = −1).\n\n![flip rate](flip_rate.png)",
        f"## Samples (seed {seeds[0]}; column = class 0..9)\n" + grids,
    ]
