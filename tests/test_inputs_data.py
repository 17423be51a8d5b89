"""Data as users bring it (issue 11, faults 9 and 18): implicit-prompt rows split at a turn or word boundary;
duplicated and contradictory rows counted at load time; messages point at the line a human opens."""

import json
import logging

import pytest

from prefalign.core.data import DataConfig, PreferenceRecord, load_preferences, load_records
from prefalign.core.data_smells import count_smells
from prefalign.core.errors import DataError

HEAD = "\n\nHuman: Is water wet?\n\nAssistant:"


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt", "responses"),
    [
        # both answers start with "ye": the character rule would cut "...Assistant: ye" | "s it is." / "ah no."
        (HEAD + " yes it is.", HEAD + " yeah no.", HEAD, [" yes it is.", " yeah no."]),
        # one answer is a prefix of the other: a valid pair, not "empty text"
        (HEAD + " hi", HEAD + " hi there", HEAD, [" hi", " hi there"]),
        # answers sharing whole words: still split at the assistant turn (HH convention)
        (HEAD + " The cat sat.", HEAD + " The dog ran.", HEAD, [" The cat sat.", " The dog ran."]),
        # multi-turn: the LAST shared assistant turn
        (
            HEAD + " Yes.\n\nHuman: Sure?\n\nAssistant: Quite sure.",
            HEAD + " Yes.\n\nHuman: Sure?\n\nAssistant: Quite.",
            HEAD + " Yes.\n\nHuman: Sure?\n\nAssistant:",
            [" Quite sure.", " Quite."],
        ),
        # no turn marker: the last word boundary (the space goes to the responses, TRL's convention)
        ("The sky is blue.", "The sky is green.", "The sky is", [" blue.", " green."]),
        ("The sky is bright.", "The sky is brown.", "The sky is", [" bright.", " brown."]),
    ],
)
def test_implicit_prompt_ends_at_a_turn_or_word_boundary(chosen, rejected, prompt, responses):
    [record] = load_preferences([{"chosen": chosen, "rejected": rejected}])
    assert (record.prompt, record.responses) == (prompt, responses)


def test_implicit_prompt_without_any_boundary_is_a_named_error():
    with pytest.raises(
        DataError, match=r"row 0: field 'prompt': missing, and chosen/rejected share no prefix"
    ):
        load_preferences([{"chosen": "yes", "rejected": "yeah"}])


def rows_with_smells():
    """20 copies of a > b, one b > a (same annotator: a contradiction), one b > a by another annotator."""
    a_over_b = {"prompt": "p", "chosen": "a", "rejected": "b"}
    return (
        [a_over_b] * 20
        + [{"prompt": "p", "chosen": "b", "rejected": "a"}]
        + [{"prompt": "p", "chosen": "b", "rejected": "a", "annotator": "u2"}]
    )


def test_duplicates_and_contradictions_are_counted_and_warned_once(tmp_path, caplog):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_with_smells()))
    records = load_preferences(path)
    assert (records.report.duplicates, records.report.contradictions) == (19, 1)
    assert len(records) == 22  # counted, not dropped
    with caplog.at_level(logging.WARNING):
        load_records(DataConfig(train=str(path), eval_fraction=0.0), seed=0)
    [line] = [r.getMessage() for r in caplog.records]
    assert "19 rows repeat an earlier row" in line and "1 rows order two responses the other way" in line
    assert "row 1 (line 2) repeats" in line and "row 20 (line 21) contradicts" in line


def test_smells_of_rankings_use_every_stated_pair():
    """A ranking [x, y, z] states x > y, x > z, y > z; a later pair z > x by the same annotator contradicts it.
    The same ranking with its responses listed in another order is the same row."""
    records = [
        PreferenceRecord("q", ["x", "y", "z"], [0, 1, 2]),
        PreferenceRecord("q", ["z", "x", "y"], [1, 2, 0]),  # the same ranking: a duplicate
        PreferenceRecord.pair("q", "z", "x"),
        PreferenceRecord.pair("q", "z", "x", annotator="other"),  # another annotator may disagree
        PreferenceRecord("q", ["x", "y", "w"], [0]),  # top-1 of 3: x > y, x > w, consistent
    ]
    duplicates, contradictions, examples = count_smells(records)
    assert (duplicates, contradictions) == (1, 1)
    assert examples == ["record 1 repeats record 0", "record 2 contradicts record 0"]


def test_messages_name_the_file_line_a_human_opens(tmp_path):
    """JSONL: blank lines count (row 1 is on line 4 here); CSV: the header is line 1 and a quoted cell may span
    lines (row 1 starts on line 4)."""
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    (tmp_path / "p.jsonl").write_text(good + "\n\n\n" + '{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    with pytest.raises(DataError) as info:
        load_preferences(tmp_path / "p.jsonl")
    assert str(info.value).startswith(f"{tmp_path / 'p.jsonl'}: row 1: field 'chosen'")
    assert str(info.value).endswith("(line 4)") and info.value.line == 4 and info.value.row == 1
    (tmp_path / "p.csv").write_text('prompt,chosen,rejected\n"two\nlines",a,b\np,a,\n')
    with pytest.raises(DataError, match=r"row 1: field 'rejected': .*\(line 4\)$"):
        load_preferences(tmp_path / "p.csv")
    records = load_preferences(tmp_path / "p.jsonl", on_bad_row="skip")
    assert records[0].origin == f"{tmp_path / 'p.jsonl'} row 0 (line 1)"
    assert load_preferences([{"prompt": "p", "chosen": "a", "rejected": "b"}])[0].origin == "<list> row 0"
