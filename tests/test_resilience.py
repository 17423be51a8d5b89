"""A run killed with SIGKILL in the middle of writing a checkpoint resumes from the previous one; a
non-finite loss stops the run with a clear message and leaves the last good checkpoint loadable."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from prefalign.core.train import NonFiniteLossError, TrainConfig, checkpoints, fit

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from torch import nn
    import prefalign.core.checkpoint as checkpoint
    import prefalign.core.train as train

    run_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])
    real_save = checkpoint.save_file

    def slow_save(tensors, path):  # the weights of step 4 are half-way written when the kill comes
        real_save(tensors, path)
        if ".tmp-step-4" in str(path):
            Path(path).write_bytes(Path(path).read_bytes()[:20])
            marker.write_text("writing")
            time.sleep(60)

    checkpoint.save_file = slow_save
    torch.manual_seed(0)
    data = [(torch.randn(4), torch.randn(())) for _ in range(32)]
    step = lambda m, b: (((m(b["x"]).squeeze(-1) - b["y"]) ** 2).mean(), {})
    collate = lambda items: {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items])}
    cfg = train.TrainConfig(output_dir=str(run_dir), max_steps=6, batch_size=4, save_every=2, log_every=1,
                            progress=False, learning_rate=0.05)
    train.fit(nn.Linear(4, 1), data, collate, step, cfg)
    """
)


def collate(items):
    return {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items])}


def mse(model, batch):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean(), {}


def test_kill_9_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(run_dir), str(marker)], env=env)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the training subprocess never reached the step-4 checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the half-written step-4 checkpoint is a temp dir that never became a checkpoint
    assert (run_dir / "checkpoints" / ".tmp-step-4").is_dir()
    assert [p.name for p in checkpoints(run_dir)] == ["step-2"]
    # resuming loads step-2, discards the temp dir and finishes the run
    torch.manual_seed(1)
    data = [(torch.randn(4), torch.randn(())) for _ in range(32)]
    cfg = TrainConfig(
        output_dir=str(run_dir),
        max_steps=6,
        batch_size=4,
        save_every=2,
        log_every=1,
        progress=False,
        learning_rate=0.05,
    )
    result = fit(nn.Linear(4, 1), data, collate, mse, cfg)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]  # 1-2 kept from the killed run
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in checkpoints(run_dir)] == ["step-4", "step-6"]


def test_non_finite_loss_keeps_last_good_checkpoint_loadable(tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(4), torch.randn(())) for _ in range(32)]
    calls = {"n": 0}

    def exploding(model, batch):
        calls["n"] += 1
        loss, metrics = mse(model, batch)
        return (loss * float("inf") if calls["n"] == 5 else loss), metrics

    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=8,
        batch_size=4,
        save_every=2,
        log_every=1,
        progress=False,
        learning_rate=0.05,
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 5\b.*last good checkpoint: .*step-4"
    ):
        fit(nn.Linear(4, 1), data, collate, exploding, cfg)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-4"]
    result = fit(nn.Linear(4, 1), data, collate, mse, cfg)  # resumes from step-4 and finishes
    assert result.history[-1]["step"] == 8
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
