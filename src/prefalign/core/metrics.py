"""Training metrics: TRL-named preference metrics of a batch, and the log that reduces and writes them.

One definition of a ranking's ends serves every metric: the best candidate is `ranking[:, 0]`; the worst
tier is the last ranked candidate or, for a partial (top-k of n) ranking, all the present candidates that
were left unranked (each is below every ranked one, and they are tied among themselves). "rejected"
metrics are means over the worst tier; for a pair both definitions give the rejected response.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def ranked_ends(ranking: torch.Tensor, candidate_mask: torch.Tensor | None = None):
    """(best [B] candidate index, worst tier [B, n] bool) of rankings [B, n] (best first, −1 padded).

    candidate_mask [B, n] marks the candidates that exist (None: every column)."""
    B, n = ranking.shape
    if candidate_mask is None:
        candidate_mask = torch.ones_like(ranking, dtype=torch.bool)
    ranked = torch.zeros_like(candidate_mask).scatter(1, ranking.clamp(min=0), ranking >= 0)
    unranked = candidate_mask & ~ranked
    n_ranked = (ranking >= 0).sum(-1)
    last = ranking.gather(1, (n_ranked - 1).clamp(min=0)[:, None])
    last_ranked = torch.zeros_like(candidate_mask).scatter(1, last, True)
    worst = torch.where(unranked.any(-1, keepdim=True), unranked, last_ranked)
    return ranking[:, 0], worst


def tier_mean(values: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, n] over a tier mask [B, n] per row -> [B]."""
    return (values * tier).sum(-1) / tier.sum(-1).clamp(min=1)


def preference_metrics(losses, weight, rewards, logps, ranking, candidate_mask=None):
    """-> (weighted mean loss, TRL-named metrics) of a batch of B records.

    losses [B]; weight [B] (record weights); rewards, logps [B, n] (implicit rewards and policy log-probs of
    each candidate); ranking [B, n]. Every metric is a weighted mean over records, so a set of records split
    into batches and recombined by weight gives the same numbers as one batch (`weighted_sums`)."""
    best, worst = ranked_ends(ranking, candidate_mask)
    rows = torch.arange(len(best), device=best.device)
    chosen, rejected = rewards[rows, best].detach(), tier_mean(rewards.detach(), worst)
    w = weight / weight.sum()
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "logps/chosen": logps[rows, best].detach(),
        "logps/rejected": tier_mean(logps.detach(), worst),
    }
    return (losses * w).sum(), {name: (value * w).sum() for name, value in metrics.items()}


class WeightedMean:
    """Accumulates weighted batch means into the mean over all records: Σ_b W_b·m_b / Σ_b W_b."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.total = 0.0

    def add(self, metrics: dict, weight_sum: float) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * weight_sum
        self.total += weight_sum

    def result(self) -> dict[str, float]:
        return {name: value / self.total for name, value in self.sums.items()} if self.total else {}


class MetricsLog:
    """`metrics.jsonl` of a run plus accelerate's trackers.

    Metrics arrive as detached tensors each optimizer step and stay on the device; `flush` reduces the
    window (mean over steps, then over processes) with ONE host transfer per logging step."""

    def __init__(self, path: Path | None, accelerator, trackers: bool):
        self.path, self.accelerator, self.trackers = path, accelerator, trackers
        self.window: dict[str, list[torch.Tensor]] = {}
        self.history: list[dict] = []

    def resume(self, step: int) -> None:
        """Keep only the lines logged up to `step` (the file then reads as if the run was never stopped)."""
        if self.path and self.path.is_file() and self.accelerator.is_main_process:
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
            self.history = [json.loads(ln) for ln in kept]

    def start_fresh(self) -> None:
        if self.path and self.accelerator.is_main_process and self.path.exists():
            self.path.unlink()

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = torch.as_tensor(value, device=self.accelerator.device).detach().float().reshape(())
            self.window.setdefault(name, []).append(value)

    def flush(self, step: int, extra: dict) -> dict:
        """Reduce and write the window as one record {step, **extra, metric: mean}; returns the record."""
        names = sorted(self.window)
        record = {"step": step, **extra}
        if names:
            values = torch.stack([torch.stack(self.window[n]).mean() for n in names])
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            record.update(dict(zip(names, values.tolist())))
        self.window = {}
        self.write(record)
        return record

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process and self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
