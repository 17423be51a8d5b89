"""End to end: `prefalign demo dpo --quick` writes its report and DPO beats the reference on ground truth."""

import json
import re

import pytest
from typer.testing import CliRunner

from prefalign.cli import app


@pytest.mark.slow
def test_dpo_demo_quick_improves_the_true_reward(tour):
    out = (
        tour / "runs" / "demo-dpo-quick"
    )  # `prefalign demo dpo --quick`, run once by the README tour fixture
    summary = json.loads((out / "summary.json").read_text())
    for row in ("reference", "dpo", "ipo"):
        assert {"true_reward", "kl", "win_rate"} <= summary[row].keys()
    # measured 0.089 -> 0.527 (win rate 0.845; 0.678 with a reference retrained on another thread count):
    # demand a clear margin, not the exact value
    assert summary["dpo"]["true_reward"] > summary["reference"]["true_reward"] + 0.2, summary
    assert summary["dpo"]["win_rate"] > 0.6, summary
    assert summary["dpo"]["kl"] > summary["reference"]["kl"] == 0.0
    report = (out / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (out / png).stat().st_size > 1000
    assert "| dpo |" in report
    # the saved training data reloads through the validating loader (so configs/dpo_reviews.yaml works on it)
    from prefalign.core.data import load_preferences

    assert len(load_preferences(out / "data" / "train.jsonl")) == summary["n_train_pairs"]


@pytest.mark.slow
def test_mpo_demo_quick_improves_at_small_kl(tmp_path):
    """Deterministic preferences: MPO (reference-free, off-policy NLL regularizer) raises the true reward over
    the reference while its KL stays far below DPO's (measured: reference 0.089, MPO 0.188 at KL 0.50, DPO
    0.539 at KL 17.7; with a reference trained on 2 threads 0.114 -> 0.162). The paper's full claim (MPO's
    reward >= DPO's) does not hold here; the summary says so."""
    out = tmp_path / "mpo"
    result = CliRunner().invoke(app, ["demo", "mpo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for row in ("reference", "dpo", "ipo", "mpo"):
        assert {"true_reward", "kl", "win_rate"} <= summary[row].keys()
    assert summary["mpo"]["true_reward"] > summary["reference"]["true_reward"] + 0.03, summary
    assert summary["mpo"]["kl"] < 0.25 * summary["dpo"]["kl"], summary
    report = (out / "report.md").read_text()
    assert all((out / png).is_file() for png in re.findall(r"\]\(([^)]+\.png)\)", report))
