"""The README's tour, run as written and in order in a fresh folder (only configs/ beside it): each command
must work after the ones before it. Then what it promised: the run knows who labelled its data (ground truth
for the `enthusiast` type), eval.json/eval.md with samples, and an export that from_pretrained opens."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_in, tour_commands


def test_the_tour_is_prefalign_commands_starting_with_the_quick_demo():
    commands = tour_commands()
    assert commands[0] == ["prefalign", "demo", "dpo", "--quick"]
    assert len(commands) >= 5 and all(c[0] == "prefalign" for c in commands), commands


@pytest.mark.slow
def test_readme_tour_runs_in_order(tour):
    """`tour` ran the first command (the quick demo); the rest run here, in order."""
    outputs = {}
    for command in tour_commands()[1:]:
        result = run_in(tour, command)
        assert result.exit_code == 0, (command, result.output[-3000:])
        outputs[command[1]] = result.output
    assert (tour / "runs" / "demo-dpo-quick" / "report.md").is_file()
    run = tour / "runs" / "dpo_reviews"
    assert "prefalign: dpo -> runs/dpo_reviews" in outputs["train"] and "done: 100 steps" in outputs["train"]
    assert json.loads((run / "world.json").read_text())["annotator_types"] == {"enthusiast": 1.0}
    numbers = json.loads((run / "eval.json").read_text())
    assert numbers["annotator_types"] == "enthusiast 1"
    assert numbers["true_reward"] == numbers["true_reward/enthusiast"]
    assert numbers["win_rate"] == numbers["win_rate/enthusiast"]
    assert any("prefalign demo dpo --quick" in note for note in numbers["notes"])
    assert math.isfinite(numbers["eval/loss"]) and len(numbers["samples"]) == 3
    assert "## Samples" in (run / "eval.md").read_text()
    exported = AutoModelForCausalLM.from_pretrained(tour / "runs" / "dpo_reviews-model")
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    ids = torch.tensor([[5, 9, 1, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, final(ids).logits, atol=0, rtol=0)
    assert "library_name: transformers" in (tour / "runs" / "dpo_reviews-model" / "README.md").read_text()
