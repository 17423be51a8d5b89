"""The digits world: scikit-learn's bundled 8x8 digits with the class label as context (no download).

Three disjoint splits of the 1797 images, seeded:
- `train` (40%): fits the deliberately mediocre black-box generator;
- `judge` (30%): fits the labelling judge, a logistic regression; its probability of the intended class is
  what preferences are made from;
- `eval` (30%): fits the held-out evaluator, a different model (a small MLP), and is the set of real digits
  that `diversity` compares against. Reported scores never come from the judge.

Images are float32 tensors in [0, 1] (sklearn pixels are 0..16) of shape [N, 1, 8, 8]; labels are int64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from prefalign.core.report import pyplot

SPLIT_FRACTIONS = {"train": 0.4, "judge": 0.3, "eval": 0.3}


def load_digits_split(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{'train'|'judge'|'eval': {'images': [N,1,8,8] float32 in [0,1], 'labels': [N] int64}}."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    splits, start = {}, 0
    for i, (name, fraction) in enumerate(SPLIT_FRACTIONS.items()):
        end = len(order) if i == len(SPLIT_FRACTIONS) - 1 else start + int(fraction * len(order))
        idx = order[start:end]
        splits[name] = {"images": images[idx], "labels": labels[idx]}
        start = end
    return splits


def _flat(samples: torch.Tensor) -> np.ndarray:
    samples = torch.as_tensor(samples, dtype=torch.float32)
    if samples.dim() == 4 and samples.shape[1:] == (1, 8, 8) or samples.dim() == 2 and samples.shape[1] == 64:
        return samples.detach().reshape(len(samples), 64).cpu().numpy()
    raise ValueError(f"digits samples must have shape [N,1,8,8] or [N,64], got {list(samples.shape)}")


@dataclass
class Classifier:
    """A fitted scikit-learn classifier; calling it gives each sample's probability of its intended class."""

    model: object

    def __call__(self, samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        x = _flat(samples)
        if len(labels) != len(x):
            raise ValueError(f"got {len(x)} samples but {len(labels)} labels")
        proba = torch.tensor(self.model.predict_proba(x), dtype=torch.float32)
        return proba[torch.arange(len(labels)), labels]

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.model.predict(_flat(images)) == np.asarray(labels)).mean())


class MediocreGenerator:
    """A black-box class-conditional generator that is deliberately mediocre, so preferences can help.

    Per class: a PCA-Gaussian (k components, std inflated by `spread`), blended with the mean of a random
    other class by a weight drawn from U(0, `blend`), plus pixel noise, clipped to [0, 1]. Call it with
    labels; it returns [N, 1, 8, 8] samples. Nothing downstream touches its parameters.
    """

    def __init__(self, images, labels, components=10, spread=1.5, blend=0.7, pixel_noise=0.1):
        x, y = images.reshape(len(images), 64).double(), labels
        self.means = torch.stack([x[y == c].mean(0) for c in range(10)])
        self.bases, self.stds = [], []
        for c in range(10):  # PCA by SVD of the centred class data
            _, s, vt = torch.linalg.svd(x[y == c] - self.means[c], full_matrices=False)
            self.bases.append(vt[:components])
            self.stds.append(s[:components] / (int((y == c).sum()) - 1) ** 0.5)
        self.spread, self.blend, self.pixel_noise = spread, blend, pixel_noise

    def __call__(self, labels: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        n = len(labels)
        z = torch.randn(n, self.bases[0].shape[0], generator=g, dtype=torch.float64)
        bases, stds = torch.stack(self.bases)[labels], torch.stack(self.stds)[labels]
        x = self.means[labels] + torch.einsum("nk,nkd->nd", z * stds * self.spread, bases)
        other = (labels + torch.randint(1, 10, (n,), generator=g)) % 10
        weight = torch.rand(n, 1, generator=g, dtype=torch.float64) * self.blend
        x = (1 - weight) * x + weight * self.means[other]
        x = x + self.pixel_noise * torch.randn(n, 64, generator=g, dtype=torch.float64)
        return x.clamp(0, 1).float().reshape(n, 1, 8, 8)


def pairwise_within_class(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean L2 distance between distinct samples of the same class, averaged over classes present."""
    x, labels = torch.as_tensor(_flat(samples)), torch.as_tensor(labels)
    means = []
    for c in labels.unique():
        xc = x[labels == c]
        if len(xc) > 1:
            means.append(torch.cdist(xc, xc).sum() / (len(xc) * (len(xc) - 1)))
    return float(torch.stack(means).mean()) if means else float("nan")


@dataclass
class DigitsWorld:
    splits: dict
    generator: MediocreGenerator
    judge: Classifier  # labels preferences
    evaluator: Classifier  # reports scores; a different model fitted on a different split
    real_diversity: float

    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Held-out evaluator's probability of the intended class, per sample."""
        return self.evaluator(samples, labels)

    def diversity(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean within-class pairwise distance relative to real held-out digits (1 = as varied as real)."""
        return pairwise_within_class(samples, labels) / self.real_diversity


@functools.lru_cache(maxsize=8)
def make_world(seed: int = 0) -> DigitsWorld:
    """Splits, generator, judge and evaluator for one seed (about a second; cached per process)."""
    splits = load_digits_split(seed)
    train, judge_split, eval_split = splits["train"], splits["judge"], splits["eval"]
    judge = LogisticRegression(C=1.0, max_iter=2000).fit(_flat(judge_split["images"]), judge_split["labels"])
    evaluator = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=600, random_state=seed)
    evaluator.fit(_flat(eval_split["images"]), eval_split["labels"].numpy())
    return DigitsWorld(
        splits=splits,
        generator=MediocreGenerator(train["images"], train["labels"]),
        judge=Classifier(judge),
        evaluator=Classifier(evaluator),
        real_diversity=pairwise_within_class(eval_split["images"], eval_split["labels"]),
    )


def score(samples: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Evaluator's probability of the intended class per sample (world of `seed`)."""
    return make_world(seed).score(samples, labels)


def diversity(samples: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """Within-class pairwise distance divided by that of the real held-out digits (world of `seed`)."""
    return make_world(seed).diversity(samples, labels)


def save_grid(
    path: str | Path, samples: torch.Tensor, nrow: int = 10, scale: int = 4, labels=None, title: str = ""
) -> Path:
    """Write samples as a grayscale PNG grid, `nrow` images per row, each pixel `scale`x`scale`. `labels`
    (one per image: the digit it was asked for) are written in each cell's corner, `title` above the grid."""
    plt = pyplot()
    x = torch.as_tensor(_flat(samples)).reshape(-1, 8, 8).clamp(0, 1)
    rows = -(-len(x) // nrow)
    grid = torch.ones(rows * 9 + 1, nrow * 9 + 1)  # 1-pixel white gutters
    for i, image in enumerate(x):
        r, c = divmod(i, nrow)
        grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = 1 - image  # dark ink on white
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if labels is None and not title:
        grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        plt.imsave(path, grid.numpy(), cmap="gray", vmin=0, vmax=1)
        return path
    fig, ax = plt.subplots(figsize=(0.45 * nrow + 0.4, 0.45 * rows + (0.7 if title else 0.3)))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for i, label in enumerate(list(labels or [])[: len(x)]):
        r, c = divmod(i, nrow)
        ax.text(9 * c + 1.3, 9 * r + 2.2, str(int(label)), color="tab:red", fontsize=6)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
