"""Property-based tests of the loaders: random, often malformed rows written to real files (jsonl, json,
csv, parquet). Every row either loads or fails with a DataError naming the file, its row and a field;
nothing escapes as an internal error (KeyError, TypeError, ...), and skip mode accounts for every row."""

import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefalign.core.data import DataError, load_preferences

text = st.one_of(st.text(max_size=8), st.just(""), st.just("  "))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "", 3]), "content": text})
scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), text)
value = st.one_of(
    scalar,
    st.lists(scalar, max_size=4),
    st.lists(message, max_size=3),
    st.lists(st.integers(-2, 4), max_size=4),
)
KEYS = [
    "prompt",
    "chosen",
    "rejected",
    "responses",
    "ranking",
    "scores",
    "weight",
    "annotator",
    "user_id",
    "x",
]
row = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), value, max_size=6), scalar, st.lists(scalar, max_size=2)
)
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def check_rows(path, n_rows):
    """Each row alone: loads, or a DataError naming the source and this row and a field."""
    try:
        data = load_preferences(path, on_bad_row="skip")
    except DataError as e:  # no valid row at all (or an unreadable file): still a located, one-line error
        assert str(path) in str(e) and "\n" not in str(e)
        return
    report = data.report
    assert report.n_rows == n_rows
    assert report.n_loaded + sum(report.skipped.values()) == n_rows
    try:
        load_preferences(path)
    except DataError as e:
        assert re.search(rf"{re.escape(str(path))}: row \d+: field '[\w\[\]]+'", str(e)), str(e)
    for record in data:
        assert len(record.responses) >= 2 and record.ranking
        assert all(0 <= i < len(record.responses) for i in record.ranking)
        assert math.isfinite(record.weight) and record.weight > 0


@SETTINGS
@given(rows=st.lists(row, min_size=1, max_size=6))
def test_jsonl_rows_load_or_fail_with_row_level_message(tmp_path, rows):
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    path.write_text("\n".join(lines) + "\n")
    check_rows(path, len(lines))


@SETTINGS
@given(rows=st.lists(row, min_size=1, max_size=6))
def test_json_rows_load_or_fail_with_row_level_message(tmp_path, rows):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(rows))
    check_rows(path, len(rows))


cell = st.one_of(
    st.just(""), st.text(max_size=10), st.sampled_from(["[0, 1]", "[1]", '["a", "b"]', "[x", "1e400", "-1"])
)


@SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({k: cell for k in KEYS[:8]}), min_size=1, max_size=5))
def test_csv_rows_load_or_fail_with_row_level_message(tmp_path, rows):
    import pandas

    path = tmp_path / "prefs.csv"
    pandas.DataFrame(rows).to_csv(path, index=False)
    check_rows(path, len(rows))


@SETTINGS
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "prompt": st.one_of(st.none(), text),
                "chosen": st.one_of(st.none(), text),
                "rejected": st.one_of(st.none(), text),
                "weight": st.one_of(st.none(), st.floats(allow_nan=True)),
            }
        ),
        min_size=1,
        max_size=5,
    )
)
def test_parquet_rows_load_or_fail_with_row_level_message(tmp_path, rows):
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    check_rows(path, len(rows))
