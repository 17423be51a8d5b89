"""Preference data layer: layouts, sources, round trips, row-level errors, skip mode, splits."""

import json
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefalign.core import data
from prefalign.core.data import (
    DataError,
    PreferenceRecord,
    load_preferences,
    pairwise_records,
    ranking_from_scores,
    save_jsonl,
    split_records,
    validate_record,
)

USER = {"role": "user", "content": "Is the sky blue?"}
YES = {"role": "assistant", "content": "Yes."}
NO = {"role": "assistant", "content": "No, green."}

TEXT_RECORDS = [
    PreferenceRecord.pair("2+2?", "4", "5"),
    PreferenceRecord("Best color?", ["blue", "red", "green"], [2, 0, 1], annotator="ann-1", weight=0.5),
    PreferenceRecord("Pick one", ["a", "b", "c", "d"], [3], annotator="ann-2"),  # top-1 of 4
    PreferenceRecord("Ünïcode ✓", ["line\none", 'quote "x"'], [1, 0], weight=2.0),
]
CHAT_RECORDS = [
    PreferenceRecord.pair([USER], [YES], [NO], annotator="7"),
    # an extra message key: arrow fills it with None in the other messages; loading drops those fillers
    PreferenceRecord(
        [{"role": "system", "content": "Be brief.", "name": "rules"}, USER],
        [[YES], [NO], [{"role": "assistant", "content": "Maybe."}]],
        [1, 2],
    ),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- the record


def test_record_pair_chosen_rejected_and_partial_ranking():
    pair = PreferenceRecord.pair("p", "good", "bad")
    assert (pair.responses, pair.ranking, pair.chosen, pair.rejected) == (
        ["good", "bad"],
        [0, 1],
        "good",
        "bad",
    )
    # ranking [2, 0] over 4: best is responses[2]; 1 and 3 are unranked, below; the worst is the last unranked
    top2 = PreferenceRecord("p", ["r0", "r1", "r2", "r3"], [2, 0])
    assert (top2.chosen, top2.rejected) == ("r2", "r3")
    full = PreferenceRecord("p", ["r0", "r1", "r2"], [1, 2, 0])
    assert (full.chosen, full.rejected) == ("r1", "r0")


def test_pairwise_records_lists_every_implied_pair():
    """ranking [2, 0] over [r0, r1, r2] means r2 > r0 > {r1}: pairs (r2,r0), (r2,r1), (r0,r1), nothing else."""
    record = PreferenceRecord("p", ["r0", "r1", "r2"], [2, 0], annotator="a", weight=3.0)
    pairs = pairwise_records(record)
    assert [(p.chosen, p.rejected) for p in pairs] == [("r2", "r0"), ("r2", "r1"), ("r0", "r1")]
    assert all(p.annotator == "a" and p.weight == 3.0 and p.prompt == "p" for p in pairs)


# ------------------------------------------------------------------------------------------------ layouts


def test_every_layout_loads_to_the_expected_record(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "id": 17},  # extra columns are ignored
        {"prompt": [USER], "chosen": [YES], "rejected": [NO], "annotator_id": "x"},
        # TRL implicit prompt, conversational: the shared message prefix is the prompt
        {"chosen": [USER, YES], "rejected": [USER, NO], "user_id": 12},
        # TRL implicit prompt, text (TRL's rule: the space before the split stays with the responses)
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "q", "responses": ["x", "y", "z"], "ranking": [1, 2], "weight": 0.25},
        {"prompt": "q", "responses": ["x", "y", "z"], "scores": [0.1, 0.9, 0.5]},
    ]
    got = load_preferences(write_jsonl(tmp_path / "prefs.jsonl", rows))
    assert got == [
        PreferenceRecord("p", ["a", "b"], [0, 1]),
        PreferenceRecord([USER], [[YES], [NO]], [0, 1], annotator="x"),
        PreferenceRecord([USER], [[YES], [NO]], [0, 1], annotator="12"),
        PreferenceRecord("The sky is", [" blue.", " green."], [0, 1]),
        PreferenceRecord("q", ["x", "y", "z"], [1, 2], weight=0.25),
        PreferenceRecord("q", ["x", "y", "z"], [1, 2, 0]),  # 0.9 > 0.5 > 0.1
    ]
    assert got.report.n_rows == got.report.n_loaded == 6 and got.report.skipped == {}


def test_tie_policies():
    """scores [3, 5, 5, 1]: sorted best first the indices are 1, 2 (tied with 1), 0, 3.
    any-order keeps tied ones in input order -> [1, 2, 0, 3]; truncate keeps the strict prefix above the
    first tie, which is empty here -> error; for [5, 3, 3, 1] truncate gives [0] (1, 2, 3 unranked below)."""
    assert ranking_from_scores([3, 5, 5, 1], "any-order") == [1, 2, 0, 3]
    assert ranking_from_scores([5, 3, 3, 1], "truncate") == [0]
    assert ranking_from_scores([5, 3, 1, 1], "truncate") == [0, 1]
    with pytest.raises(DataError, match="tied"):
        ranking_from_scores([3, 5, 5, 1], "truncate")
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 3]},
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [2, 2, 1]},
    ]
    with pytest.raises(DataError, match=r"<list>: row 1: field 'scores': tied scores"):
        load_preferences(rows)
    skipped = load_preferences(rows, tie_policy="skip")  # even with on_bad_row="error"
    assert [r.ranking for r in skipped] == [[2, 1, 0]] and skipped.report.skipped == {"tied scores": 1}
    assert load_preferences(rows, tie_policy="any-order")[1].ranking == [0, 1, 2]
    with pytest.raises(DataError, match="tie_policy"):
        load_preferences(rows, tie_policy="average")


def test_columns_maps_user_names(tmp_path):
    rows = [{"question": "q", "good": "a", "bad": "b", "rater": "r1"}]
    mapping = {"question": "prompt", "good": "chosen", "bad": "rejected", "rater": "annotator"}
    assert load_preferences(rows, columns=mapping) == [PreferenceRecord("q", ["a", "b"], [0, 1], "r1")]
    swapped = load_preferences(
        [{"prompt": "q", "chosen": "a", "rejected": "b"}],
        columns={"chosen": "rejected", "rejected": "chosen"},
    )
    assert swapped[0].responses == ["b", "a"]
    with pytest.raises(DataError, match="columns: 'question' maps to unknown 'promt'"):
        load_preferences(rows, columns={"question": "promt"})
    with pytest.raises(
        DataError, match=r"columns: no column 'query' in <list> \(has bad, good, question, rater\)"
    ):
        load_preferences(rows, columns={"query": "prompt"})
    with pytest.raises(DataError, match=r"row 0: field 'prompt': both 'question' \(mapped by columns\)"):
        load_preferences(
            [{"question": "q", "prompt": "p", "chosen": "a", "rejected": "b"}], columns={"question": "prompt"}
        )


# ------------------------------------------------------------------------------------ sources, round trip


def test_round_trip_save_jsonl_and_every_file_format(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    for records in (TEXT_RECORDS, CHAT_RECORDS):
        path = save_jsonl(records, tmp_path / "out" / "records.jsonl")
        assert load_preferences(path) == records
        assert load_preferences(records) == records  # in-memory records are re-validated, unchanged
        dicts = [r.to_dict() for r in records]
        (tmp_path / "list.json").write_text(json.dumps(dicts))
        (tmp_path / "wrapped.json").write_text(json.dumps({"data": dicts}))
        assert load_preferences(tmp_path / "list.json") == records
        assert load_preferences(str(tmp_path / "wrapped.json")) == records
        pq.write_table(pa.Table.from_pylist(dicts), tmp_path / "records.parquet")
        assert load_preferences(tmp_path / "records.parquet") == records
    # CSV: list cells are JSON strings, an empty annotator cell means none
    table = [
        {k: json.dumps(v) if isinstance(v, list) else v for k, v in r.to_dict().items()} for r in TEXT_RECORDS
    ]
    pd.DataFrame(table).to_csv(tmp_path / "records.csv", index=False)
    assert load_preferences(tmp_path / "records.csv") == TEXT_RECORDS
    text_prompt = "[INST] keep me as text [/INST]"  # starts with "[" but is not a message list
    pd.DataFrame([{"prompt": text_prompt, "chosen": "a", "rejected": "b"}]).to_csv(
        tmp_path / "t.csv", index=False
    )
    assert load_preferences(tmp_path / "t.csv")[0].prompt == text_prompt


def test_datasets_sources_and_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([r.to_dict() for r in TEXT_RECORDS])
    test = datasets.Dataset.from_list([r.to_dict() for r in TEXT_RECORDS[:2]])
    assert load_preferences(train) == TEXT_RECORDS
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert load_preferences(tmp_path / "dd", split="test") == TEXT_RECORDS[:2]
    assert load_preferences(tmp_path / "dd") == TEXT_RECORDS
    with pytest.raises(DataError, match=r"dd: no split 'valid' \(available: train, test\)"):
        load_preferences(tmp_path / "dd", split="valid")
    train.save_to_disk(str(tmp_path / "single"))
    assert load_preferences(tmp_path / "single", limit=3) == TEXT_RECORDS[:3]


def test_hub_names_go_to_load_dataset_only_when_no_local_path(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([TEXT_RECORDS[0].to_dict()])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_preferences("hf://owner/prefs", split="test") == TEXT_RECORDS[:1]
    assert load_preferences("owner/prefs") == TEXT_RECORDS[:1]
    assert calls == [("owner/prefs", "test"), ("owner/prefs", "train")]
    monkeypatch.chdir(tmp_path)  # a local path of the same name wins
    (tmp_path / "owner").mkdir()
    save_jsonl(TEXT_RECORDS, tmp_path / "owner" / "prefs.jsonl")
    assert load_preferences("owner/prefs.jsonl") == TEXT_RECORDS and len(calls) == 2
    with pytest.raises(DataError, match="file not found: owner/missing.jsonl"):
        load_preferences("owner/missing.jsonl")
    assert len(calls) == 2


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"file not found: .*nope\.jsonl"):
        load_preferences(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl has no rows"):
        load_preferences(tmp_path / "empty.jsonl")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv has no rows"):
        load_preferences(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="<list> has no rows"):
        load_preferences([])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type '\.txt'"):
        load_preferences(tmp_path / "x.txt")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r'obj\.json: expected a list of objects or \{"data": \[\.\.\.\]\}'):
        load_preferences(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        load_preferences(tmp_path / "broken.json")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: field 'row': not valid JSON"):
        load_preferences(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text('prompt,responses,ranking\np,"[""a"",""b""]",0;1\n')
    with pytest.raises(DataError, match=r"bad\.csv: row 0: field 'ranking': expected a JSON list, got '0;1'"):
        load_preferences(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="unsupported source int"):
        load_preferences(3)


# ------------------------------------------------------------------------------------- row-level errors

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
M = {"prompt": "p", "responses": ["a", "b", "c"]}
BAD_ROWS = [  # (row, field named in the message, what the message must say)
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ({"chosen": "a", "rejected": "b", "prompt": None}, "prompt", "share no prefix"),
    ({"prompt": "p", "responses": ["a", "b"]}, "ranking", "missing"),
    ({"responses": ["a", "b"], "ranking": [0]}, "prompt", "missing"),
    ({"prompt": "p"}, "chosen", "missing"),
    ({"prompt": "  \n", "chosen": "a", "rejected": "b"}, "prompt", "expected non-empty text"),
    ({**M, "responses": ["a", " ", "c"], "ranking": [0]}, "responses[1]", "expected non-empty text"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "chosen", "non-empty list of messages"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen", "chosen == rejected"),
    ({**M, "responses": ["a", "b", "a"], "ranking": [2]}, "responses", "responses 0 and 2 are identical"),
    ({**M, "ranking": [0, 0]}, "ranking", "duplicate index 0 in [0, 0]"),
    ({**M, "ranking": [3]}, "ranking", "index out of range 3 in [3]; expected indices 0..2 (3 responses)"),
    ({**M, "ranking": [-1]}, "ranking", "negative index -1"),
    ({**M, "ranking": []}, "ranking", "expected at least one index"),
    ({**M, "ranking": "0,1"}, "ranking", "expected a list of integer indices, got '0,1'"),
    ({**M, "ranking": [0.0, 1.0]}, "ranking", "expected a list of integer indices"),
    ({**M, "ranking": [True]}, "ranking", "expected a list of integer indices"),
    (
        {"prompt": "p", "responses": ["a"], "ranking": [0]},
        "responses",
        "expected a list of >= 2 responses, got 1",
    ),
    ({"prompt": "p", "responses": "ab", "ranking": [0]}, "responses", "expected a list of >= 2 responses"),
    ({**M, "scores": [1.0, math.nan, 0.0]}, "scores", "expected finite numbers"),
    ({**M, "scores": [1.0, math.inf, 0.0]}, "scores", "expected finite numbers"),
    ({**M, "scores": [1.0, 2.0]}, "scores", "expected 3 scores"),
    ({**M, "scores": ["1", 2, 3]}, "scores", "expected a list of numbers"),
    ({**M, "scores": [1.0, 1.0, 0.0]}, "scores", "tied scores [1.0, 1.0, 0.0] (set tie_policy"),
    ({**M, "ranking": [0], "scores": [1, 2, 3]}, "scores", "both 'ranking' and 'scores'"),
    ({**GOOD, "responses": ["a", "b"]}, "responses", "both ['chosen', 'rejected'] and ['responses']"),
    ({**GOOD, "weight": -1}, "weight", "expected a finite number > 0, got -1"),
    ({**GOOD, "weight": 0}, "weight", "expected a finite number > 0"),
    ({**GOOD, "weight": math.nan}, "weight", "expected a finite number > 0"),
    ({**GOOD, "weight": "1.0"}, "weight", "expected a finite number > 0, got '1.0'"),
    ({**GOOD, "weight": True}, "weight", "expected a finite number > 0"),
    ({**GOOD, "annotator": ["x"]}, "annotator", "expected a non-empty string or integer"),
    ({**GOOD, "annotator": "a", "user_id": "b"}, "annotator", "conflicting annotator columns"),
    ({"prompt": [USER], "chosen": "a", "rejected": "b"}, "chosen", "expected all text or all messages"),
    ({"prompt": "p", "chosen": [{"role": "user"}], "rejected": "b"}, "chosen", "message 0: expected {'role'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "expected text or a list of"),
    (
        {"question": "q", "answer": "a"},
        "columns",
        "none known (got: answer, question); accepted column sets: "
        "prompt/chosen/rejected, chosen/rejected (implicit prompt), prompt/responses/ranking, prompt/responses/scores",
    ),
]


@pytest.mark.parametrize(("bad", "field", "expected"), BAD_ROWS)
def test_bad_row_error_names_file_row_field_and_expectation(tmp_path, bad, field, expected):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    message = str(info.value)
    assert message.startswith(f"{path}: row 2: field '{field}': "), message
    assert expected in message and "\n" not in message
    assert (info.value.row, info.value.field, info.value.source) == (2, field, str(path))
    with pytest.raises(DataError, match=r"^src: row 5: "):  # validate_record gives the same error
        validate_record(bad, 5, "src")


def test_non_object_row():
    with pytest.raises(DataError, match=r"<list>: row 1: field 'row': expected an object .*, got list"):
        load_preferences([GOOD, ["p", "a", "b"]])


def test_skip_mode_counts_reasons_and_logs_one_line(tmp_path, caplog):
    rows = [GOOD, {**GOOD, "chosen": "b"}, {"x": 1}, GOOD, {**GOOD, "weight": -2}, {**GOOD, "rejected": "c"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with open(path, "a") as f:
        f.write("not json\n")
    with caplog.at_level(logging.WARNING, logger="prefalign.core.data"):
        got = load_preferences(path, on_bad_row="skip")
    assert got == [PreferenceRecord.pair("p", "a", "b")] * 2 + [PreferenceRecord.pair("p", "a", "c")]
    assert got.report.skipped == {
        "identical responses": 1,
        "unknown layout": 1,
        "bad weight": 1,
        "invalid JSON": 1,
    }
    assert (got.report.n_rows, got.report.n_loaded) == (7, 3)
    summary = f"{path}: loaded 3 of 7 rows; skipped 4 (bad weight: 1, identical responses: 1, invalid JSON: 1, unknown layout: 1)"
    assert got.report.summary() == summary
    assert [r.getMessage() for r in caplog.records] == [summary]
    with pytest.raises(
        DataError,
        match=r"no valid rows in .*prefs\.jsonl \(2 rows; reasons: bad weight: 1, unknown layout: 1\)",
    ):
        load_preferences(write_jsonl(tmp_path / "prefs.jsonl", rows[2:3] + rows[4:5]), on_bad_row="skip")


def test_limit_reads_only_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, GOOD, {"bad": 1}])
    assert len(load_preferences(path, limit=2)) == 2


# ------------------------------------------------------------------------------------------------ splits


def test_split_records_deterministic_disjoint_and_by_annotator():
    records = [PreferenceRecord.pair(f"p{i}", "a", "b", annotator=f"u{i % 7}") for i in range(100)]
    train, evals = split_records(records, 0.2, seed=0)
    assert (len(train), len(evals)) == (80, 20)
    assert sorted(r.prompt for r in train + evals) == sorted(r.prompt for r in records)
    assert split_records(records, 0.2, seed=0) == (train, evals)
    assert split_records(records, 0.2, seed=1) != (train, evals)
    assert [records.index(r) for r in train] == sorted(records.index(r) for r in train)  # input order kept
    train, evals = split_records(records, 0.2, seed=0, by_annotator=True)
    train_ann, eval_ann = {r.annotator for r in train}, {r.annotator for r in evals}
    assert train_ann and eval_ann and not train_ann & eval_ann and len(train) + len(evals) == 100
    assert split_records(records, 0.0, seed=0) == (records, [])
    with pytest.raises(DataError, match="eval_fraction"):
        split_records(records, 1.0, seed=0)
    with pytest.raises(DataError, match="leaves no train record"):
        split_records(records[:1], 0.5, seed=0)


# --------------------------------------------------------------------------------- property: no crashes

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=4)}),
    max_size=3,
)
VALUE = JSON | MESSAGES | st.lists(st.integers(-2, 4), max_size=4) | st.lists(st.text(max_size=3), max_size=4)
WORD = st.text(min_size=1, max_size=3)
EXTRAS = {"weight": st.floats() | st.integers(), "user_id": st.integers() | WORD, "prompt": WORD | MESSAGES}
PAIRS = st.fixed_dictionaries({"chosen": WORD | MESSAGES, "rejected": WORD | MESSAGES}, optional=EXTRAS)
LISTS = st.fixed_dictionaries(
    {"prompt": WORD | MESSAGES, "responses": st.lists(WORD, min_size=1, max_size=4)},
    optional={
        "weight": EXTRAS["weight"],
        "ranking": st.lists(st.integers(-1, 4), max_size=3),
        "scores": st.lists(st.floats(), max_size=4),
    },
)
ROW = st.dictionaries(st.sampled_from([*data.FIELDS, "other"]), VALUE, max_size=6) | JSON | PAIRS | LISTS


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROW, st.sampled_from(["error", "any-order", "truncate"]))
def test_any_json_row_loads_or_fails_with_a_row_level_data_error(row, tie_policy):
    try:
        record = validate_record(row, 4, "f.jsonl", tie_policy=tie_policy)
    except DataError as e:
        assert str(e).startswith("f.jsonl: row 4: field '") and e.row == 4 and e.reason
        return
    assert validate_record(record.to_dict(), 0) == record  # what loads, reloads unchanged
