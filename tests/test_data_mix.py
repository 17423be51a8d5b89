"""Several training sources with mixing weights (`data.train: [{path, weight}, ...]`): the counts each source
gives (derived by hand), seeded and repeat-exact; config errors; and a run on a mixed two-file dataset."""

import re
from collections import Counter

import pytest
import yaml
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.core.data import DataConfig, load_records
from prefalign.core.data_mix import mix_records, train_sources
from prefalign.core.errors import ConfigError


def test_weights_are_shares_of_a_mixture_as_large_as_the_sources():
    """Sizes 30 and 10, weights 1:3 -> N = 40, shares 10 and 30: the first gives 10 of its 30 (distinct, in
    order), the second all of its 10 three times."""
    a, b = [("a", i) for i in range(30)], [("b", i) for i in range(10)]
    out, used = mix_records([a, b], [1.0, 3.0], seed=0)
    assert used == [10, 30] and len(out) == 40
    from_a = [r for r in out if r[0] == "a"]
    assert len(set(from_a)) == 10 and from_a == sorted(from_a)
    assert Counter(r for r in out if r[0] == "b") == {r: 3 for r in b}
    again, _ = mix_records([a, b], [1.0, 3.0], seed=0)
    other, _ = mix_records([a, b], [1.0, 3.0], seed=1)
    assert again == out and other != out


def test_shares_round_to_the_total_by_largest_remainder():
    """Sizes 10, 10, 11 with equal weights: N = 31, exact shares 10.33 each -> 10, 10, 10 plus the one left
    to the first (equal remainders go in order). Weights 2:1 on sizes 4 and 5: N = 9, shares 6 and 3."""
    parts = [list(range(10)), list(range(10)), list(range(11))]
    assert mix_records(parts, [1.0, 1.0, 1.0], seed=0)[1] == [11, 10, 10]
    assert mix_records([list(range(4)), list(range(5))], [2.0, 1.0], seed=0)[1] == [6, 3]


def test_without_weights_every_record_once_in_order():
    out, used = mix_records([[1, 2], [3, 4, 5]], [None, None], seed=0)
    assert out == [1, 2, 3, 4, 5] and used == [2, 3]


@pytest.mark.parametrize(
    "train, message",
    [
        ([{"path": "a.jsonl", "weight": 1}, "b.jsonl"], "give every source a weight, or none"),
        ([{"path": "a.jsonl", "weight": 0}], r"data.train\[0\]'.*weight must be a number > 0"),
        ([{"path": "a.jsonl", "weight": True}], "weight must be a number > 0"),
        ([{"path": "a.jsonl", "wieght": 2}], r"data.train\[0\]'.*expected a file name or \{path"),
        ([], "empty list"),
    ],
)
def test_bad_sources_are_config_errors(train, message):
    with pytest.raises(ConfigError, match=message):
        train_sources(train)


def test_each_source_is_split_before_mixing(tmp_path, pairs_file):
    """A: 30 rows, B: 10 rows, eval_fraction 0.1 -> held out 3 of A and 1 of B; train parts 27 and 9; with
    weights 1:3 the mixture of N = 36 takes 9 of A's 27 and B's 9 three times. No held-out record is trained on."""
    a, b = pairs_file(tmp_path / "a.jsonl", 30, "pizza"), pairs_file(tmp_path / "b.jsonl", 10, "sushi")
    data = DataConfig(train=[{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}])
    train, held_out = load_records(data, seed=0)
    assert len(train) == 36 and len(held_out) == 4
    prompts = Counter(r.prompt for r in train)
    assert sum(n for p, n in prompts.items() if "pizza" in p) == 9
    assert {n for p, n in prompts.items() if "sushi" in p} == {3} and len(
        [p for p in prompts if "sushi" in p]
    ) == 9
    assert not {r.prompt for r in held_out} & set(prompts)
    assert [m["used"] for m in train.mixture] == [9, 27] and train.report.n_rows == 40


def test_a_run_on_a_mixed_two_file_dataset(tmp_path, tiny_lm, pairs_file):
    a, b = pairs_file(tmp_path / "a.jsonl", 30, "pizza"), pairs_file(tmp_path / "b.jsonl", 10, "sushi")
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(tiny_lm)},
        "data": {"train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}],
                 "max_length": 24, "max_prompt_length": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "log_every": 2},
    }  # fmt: skip
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert re.search(
        rf"mixture: {a} 9 of its 27 \(weight 1\), {b} 27 = its 9 x 3 \(weight 3\)", result.output
    )
    assert "36 train / 4 eval" in result.output and "epochs of 36" in result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == cfg["data"]["train"]
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert f"`{a}` (weight 1) + `{b}` (weight 3)" in card
    rerun = CliRunner().invoke(app, ["train", str(path)])  # the same mixed config resumes (nothing to do)
    assert rerun.exit_code == 0, rerun.output
