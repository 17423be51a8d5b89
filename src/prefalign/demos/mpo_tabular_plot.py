"""The tabular MPO experiment's figures (`demos/mpo_tabular.py`): end points over β / λ and paths over training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prefalign.core.report import pyplot, save_figure
from prefalign.demos.mpo_tabular import FAMILY_LABELS, SETTINGS, TRAINING_RUNS, keys, label


def mean_oracle(results: list[dict], grid: np.ndarray) -> np.ndarray:
    """The oracle's best reward on a common KL grid, averaged over seeds (each seed has its own world)."""
    return np.mean([np.interp(grid, r["oracle"]["kl"], r["oracle"]["true_reward"]) for r in results], 0)


def plot(summary: dict, results: list[dict], out_dir) -> list[str]:
    """tabular_frontier.png (end points over β / λ, seed mean ± std) and tabular_training.png (the path over
    training of one run per family, and KL(π_ref‖π) over steps). Returns the file names."""
    plt = pyplot()
    runs, k = summary["runs"], keys()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    top = max(r["kl"] for r in runs.values()) * 1.05
    grid = np.linspace(0, top, 100)
    ax.plot(grid, mean_oracle(results, grid), color="0.6", ls="--", label="oracle π_ref·exp(r/τ)")
    ax.plot([0], [summary["reference_true_reward"]], "k*", ms=10, label="reference")
    styles = {"dpo": "o-", "ipo": "s-", "mpo": "^-", "mpo_exact_kl": "v--", "regularizer_only": "x:"}
    for family, names in k.items():
        xs = [runs[n]["kl"] for n in names]
        ys = [runs[n]["true_reward"] for n in names]
        ax.errorbar(xs, ys, xerr=[runs[n]["kl_std"] for n in names], yerr=[runs[n]["true_reward_std"] for n in names],
                    fmt=styles[family], ms=4, capsize=2, label=FAMILY_LABELS[family])  # fmt: skip
        for n, x, y in [*zip(names, xs, ys)][:: len(names) - 1]:  # the two ends of each family
            ax.annotate(n.split("/")[1].replace("lambda", "λ").replace("beta", "β").replace("samples", "S"),
                        (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(π‖π_ref) (nats, exact)")
    ax.set_ylabel("expected true reward (exact)")
    ax.set_title(f"tabular world: end points after {SETTINGS['steps']} full-batch steps "
                 f"(mean ± std, {len(results)} seed(s))", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, Path(out_dir) / "tabular_frontier.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    steps = results[0]["steps"]
    for n in TRAINING_RUNS:
        curves = {m: np.mean([[r for r in res["runs"] if label(r) == n][0]["curve"][m] for res in results], 0)
                  for m in ("kl", "forward_kl", "true_reward")}  # fmt: skip
        left.plot(curves["kl"], curves["true_reward"], marker="o", ms=2, label=n)
        right.plot(steps[1:], curves["forward_kl"][1:], label=n)
    left.set_xlabel("KL(π‖π_ref)")
    left.set_ylabel("expected true reward")
    left.set_title("over training (each point an eval step; seed mean)", fontsize=9)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("KL(π_ref‖π)")
    right.set_title("forward KL over training", fontsize=9)
    for a in (left, right):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    save_figure(fig, Path(out_dir) / "tabular_training.png")
    return ["tabular_frontier.png", "tabular_training.png"]
