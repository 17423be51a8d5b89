"""toy2d: the PFM paper's 2-D toy. Reference policy N(0, I); known reward; preferences from the reward.

The reward is minus the distance to the nearer of two centres, so preferred samples pile up towards two
modes. Because the reward is known, the best-of-n distributions are known exactly by sampling, and any
policy can be compared with them (mean reward, exact 2-Wasserstein distance by an optimal assignment).
"""

from __future__ import annotations

from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from prefalign.core.report import pyplot, save_figure

CENTERS = torch.tensor([[1.5, 1.0], [-1.5, 1.0]])


def reference(n: int, seed: int | None = None) -> torch.Tensor:
    """The black-box reference generator: n samples of N(0, I) in 2-D."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(n, 2, generator=g)


def reward(samples: torch.Tensor, context=None) -> torch.Tensor:
    """Ground-truth reward (also the judge): -distance to the nearer centre. `context` is ignored."""
    return -torch.cdist(samples.float(), CENTERS).min(dim=1).values


def best_of(n: int, k: int, seed: int | None = None) -> torch.Tensor:
    """n samples of the best-of-k distribution: the highest-reward of k reference samples."""
    candidates = reference(n * k, seed).reshape(k, n, 2)
    best = reward(candidates.reshape(-1, 2)).reshape(k, n).argmax(0)
    return candidates[best, torch.arange(n)]


def wasserstein(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between two empirical samples of equal size n (uniform weights): the
    optimal plan is a permutation (Birkhoff), so W2^2 = min over matchings of the mean squared distance."""
    if len(a) != len(b):
        raise ValueError(f"wasserstein: expected samples of equal size, got {len(a)} and {len(b)}")
    cost = torch.cdist(a.double(), b.double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean()) ** 0.5


def plot(path: str | Path, samples: dict[str, torch.Tensor], title: str = "") -> Path:
    """One scatter panel per named sample set, over reward contours."""
    plt = pyplot()
    grid = torch.linspace(-4, 4, 121)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    zz = reward(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(xx.shape)
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.3), sharex=True, sharey=True)
    for ax, (name, points) in zip(list(axes) if len(samples) > 1 else [axes], samples.items()):
        ax.contourf(xx, yy, zz, levels=12, cmap="Greys", alpha=0.35)
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        ax.scatter(CENTERS[:, 0], CENTERS[:, 1], marker="x", color="red")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)
