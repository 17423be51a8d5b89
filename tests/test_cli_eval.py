"""`prefalign eval RUN_DIR [--data FILE] [--samples N]`: eval.json and eval.md in the run; the held-out DPO
loss on any data file equals a naive batch-1 computation; samples beside the reference's."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from prefalign.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def run(tmp_path, tiny_lm, pairs_file):
    data = pairs_file(tmp_path / "d.jsonl", 40)
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(tiny_lm)},
        "data": {"train": str(data), "max_length": 24, "max_prompt_length": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "learning_rate": 1e-2,
                  "progress": False},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert invoke("train", tmp_path / "cfg.yaml").exit_code == 0
    return tmp_path / "run"


def naive_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log p(response + EOS | prompt): one unpadded forward, log_softmax, sum over the response tokens."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logps[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(response_ids))


def test_eval_on_any_data_with_samples(run, tmp_path, tiny_lm, pairs_file):
    """--data: 6 rows about another subject. eval/loss = mean over rows of
    -log σ(0.1 · [(π_c - ref_c) - (π_r - ref_r)]) from naive batch-1 log-probs of final/ and the base."""
    other = pairs_file(tmp_path / "other.jsonl", 6, "sushi")
    result = invoke("eval", run, "--data", other, "--samples", 2)
    assert result.exit_code == 0, result.output
    numbers = json.loads((run / "eval.json").read_text())
    policy = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    losses = []
    for row in map(json.loads, other.read_text().splitlines()):
        margin = sum(
            sign * (naive_logp(policy, tokenizer, row["prompt"], row[k]) - naive_logp(reference, tokenizer, row["prompt"], row[k]))
            for sign, k in ((1, "chosen"), (-1, "rejected"))
        )  # fmt: skip
        losses.append(-math.log(1 / (1 + math.exp(-0.1 * margin))))
    assert numbers["eval/loss"] == pytest.approx(np.mean(losses), abs=1e-5)
    assert "6 records, --data" in numbers["notes"][0]
    samples = numbers["samples"]
    assert [s["prompt"] for s in samples] == ["review 0: the sushi place", "review 1: the sushi place"]
    assert all(isinstance(s["policy"], str) and isinstance(s["reference"], str) for s in samples)
    report = (run / "eval.md").read_text()
    assert "| eval/loss |" in report and "- policy:" in report and "- reference:" in report
    assert "eval/loss" in result.output and str(run / "eval.md") in result.output
    card = (run / "final" / "README.md").read_text()
    assert "`prefalign eval` (eval.json)" in card


def test_eval_defaults_to_the_held_out_split_and_json(run):
    result = invoke("eval", run, "--json")
    assert result.exit_code == 0
    printed = json.loads(result.output)
    assert printed == json.loads((run / "eval.json").read_text())
    assert "held out (4 records)" in printed["notes"][0]  # 10% of 40


def test_eval_options_a_method_does_not_take_are_errors(tmp_path):
    rng = np.random.default_rng(0)
    chosen = rng.normal(1.0, 0.3, (32, 2)).astype(np.float32)
    np.savez(tmp_path / "v.npz", chosen=chosen, rejected=chosen - 1.0)
    cfg = {"method": "pfm", "model": {"hidden": 8, "depth": 1}, "data": {"train": str(tmp_path / "v.npz")},
           "train": {"output_dir": str(tmp_path / "pfm"), "max_steps": 2, "batch_size": 8, "progress": False}}  # fmt: skip
    (tmp_path / "pfm.yaml").write_text(yaml.safe_dump(cfg))
    assert invoke("train", tmp_path / "pfm.yaml").exit_code == 0
    result = invoke("eval", tmp_path / "pfm", "--samples", 2)
    assert result.exit_code == 2 and "--samples is not available for method pfm" in result.output
