"""The shared training loop: exact resume, accumulation equivalence, atomic checkpoints, clear failures."""

import json

import pytest
import torch
from torch import nn

from prefalign.core.train import NonFiniteLossError, TrainConfig, checkpoints, fit


class Noisy(nn.Module):
    """A model whose forward uses the RNG (dropout), so exact resume needs the RNG state restored."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.lin(self.drop(x)).squeeze(-1)


def make_data(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
    return [(x[i], y[i]) for i in range(n)]


def collate(items):
    return {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items])}


def mse_step(model, batch):
    pred = model(batch["x"])
    return ((pred - batch["y"]) ** 2).mean(), {"pred_mean": pred.mean()}


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        batch_size=4,
        learning_rate=0.05,
        log_every=1,
        warmup_steps=2,
        lr_scheduler="cosine",
        progress=False,
        save_every=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


def test_training_reduces_loss(tmp_path):
    torch.manual_seed(0)
    result = fit(Noisy(), make_data(), collate, mse_step, config(tmp_path, max_steps=60, save_every=0))
    ls = losses(result.history)
    assert ls[-1] < 0.3 * ls[0]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0].keys() >= {"step", "epoch", "loss", "grad_norm", "learning_rate", "pred_mean"}
    assert lines[1]["learning_rate"] > lines[0]["learning_rate"]  # warmup


def test_killed_run_resumes_with_identical_losses(tmp_path):
    """Crash after step 6 (checkpoint at step 4), resume: the 12 logged losses equal an uninterrupted run."""
    torch.manual_seed(0)
    full = fit(Noisy(), make_data(), collate, mse_step, config(tmp_path / "full"))

    calls = {"n": 0}

    def crashing_step(model, batch):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt("simulated kill")
        return mse_step(model, batch)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(Noisy(), make_data(), collate, crashing_step, config(tmp_path / "resumed"))
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step-4"]
    torch.manual_seed(123)  # a different fresh init: resume must overwrite it from the checkpoint
    resumed = fit(Noisy(), make_data(), collate, mse_step, config(tmp_path / "resumed"))
    assert losses(resumed.history) == pytest.approx(losses(full.history), abs=1e-6)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_accumulation_matches_larger_batch(tmp_path):
    """grad_accum=2 x batch 4 equals batch 8 when the loss is a mean over equal-size micro-batches."""
    data = make_data(32)

    def det_step(model, batch):  # no dropout: compare deterministic gradients
        model.eval()
        return mse_step(model, batch)

    torch.manual_seed(0)
    a = fit(
        Noisy(), data, collate, det_step, config(tmp_path / "a", batch_size=8, shuffle=False, save_every=0)
    )
    torch.manual_seed(0)
    b = fit(
        Noisy(),
        data,
        collate,
        det_step,
        config(tmp_path / "b", batch_size=4, grad_accum=2, shuffle=False, save_every=0),
    )
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_non_finite_loss_stops_with_clear_message(tmp_path):
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        loss, m = mse_step(model, batch)
        return (loss * float("nan") if calls["n"] == 6 else loss), m

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 6.*step-4"):
        fit(Noisy(), make_data(), collate, step, config(tmp_path))
    assert [p.name for p in checkpoints(tmp_path)] == ["step-4"]


def test_half_written_checkpoint_is_ignored(tmp_path):
    torch.manual_seed(0)
    fit(Noisy(), make_data(), collate, mse_step, config(tmp_path, max_steps=4))
    broken = tmp_path / "checkpoints" / "step-8"
    broken.mkdir()
    (broken / "trainable.safetensors").write_bytes(b"garbage")  # no trainer_state.json: incomplete
    assert [p.name for p in checkpoints(tmp_path)] == ["step-4"]
