"""Preference data: records, loading (jsonl/json/parquet/csv/HF datasets/memory), row-level validation.

A `PreferenceRecord` is one prompt, >= 2 candidate responses and a `ranking`: indices into `responses`,
best first, possibly partial (top-k of n: the unranked responses are below every ranked one, unordered
among themselves). A pair is `responses=[chosen, rejected], ranking=[0, 1]`. Prompt and responses are all
text, or all chat messages `[{"role": ..., "content": ...}]`.

Accepted row layouts (`columns=` renames your column names to these):
  prompt/chosen/rejected     TRL "preference" format, text or conversational
  chosen/rejected            TRL "implicit prompt": the shared prefix of chosen and rejected is the prompt
  prompt/responses/ranking   ranking = indices into responses, best first (partial allowed)
  prompt/responses/scores    one number per response, higher is better; ties follow `tie_policy`
  optional: annotator (or annotator_id / user_id; a string or integer id) and weight (finite, > 0; default 1)
Other columns are ignored. A null value counts as absent. Every problem is a one-line `DataError` naming the
source, the row, the field and what was expected.

Where a message points (one convention everywhere): "row N" is the row's 0-based index among the source's
rows, as `dataset[N]` or `rows[N]` reads it (the data rows of a CSV, the non-blank lines of a JSONL file); for
a JSONL or CSV file the message adds "line L", the 1-based line of the file a text editor shows (a CSV's header
is line 1). Later messages about a record (tokenization, truncation) name it the same way (`record.origin`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from prefalign.core.data_files import RowError, decode_csv_cells, held_out_split, read_rows
from prefalign.core.data_files import short_repr as _short
from prefalign.core.data_mix import mix_records, train_sources
from prefalign.core.data_smells import count_smells
from prefalign.core.errors import ConfigError, DataError
from prefalign.core.records import (  # noqa: F401  (re-exported: the public data API)
    ANNOTATOR_COLUMNS,
    FIELDS,
    LAYOUTS,
    TIE_POLICIES,
    LoadReport,
    PreferenceData,
    PreferenceRecord,
    located_error,
    ranking_from_scores,
    record_from_row,
    validate_record,
    where,
)

logger = logging.getLogger(__name__)


def _rename(row, columns: dict):
    if not columns or not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if k not in columns}
    for old, new in columns.items():
        if old in row:
            if out.get(new) is not None:
                raise RowError(
                    new, "ambiguous layout", f"both '{old}' (mapped by columns) and '{new}' present"
                )
            out[new] = row[old]
    return out


def _check_columns(columns, rows: list, name: str) -> dict:
    if columns is None:
        return {}
    if not isinstance(columns, dict) or not all(isinstance(x, str) for item in columns.items() for x in item):
        raise DataError(f"columns: expected a mapping of your column names to ours, got {_short(columns)}")
    for old, new in columns.items():
        if new not in FIELDS:
            raise DataError(f"columns: '{old}' maps to unknown '{new}'; expected one of {', '.join(FIELDS)}")
    have = {k for row in rows if isinstance(row, dict) for k in row}
    for old in columns:
        if old not in have:
            raise DataError(f"columns: no column '{old}' in {name} (has {', '.join(sorted(map(str, have)))})")
    return columns


def load_preferences(
    source, *, split="train", tie_policy="error", on_bad_row="error", columns=None, limit=None, sft_rows=False
) -> PreferenceData:
    """Load and validate preference rows from a file (.jsonl/.json/.parquet/.csv), a `save_to_disk`
    directory (`split` picks from a DatasetDict), a hub name (`hf://owner/name` or `owner/name`, only when no
    such local path exists), or an in-memory list of dicts/records or `datasets.Dataset`.

    tie_policy (tied scores): "error" | "skip" (drop the row, counted in the report) | "any-order" |
    "truncate" (see `ranking_from_scores`). on_bad_row: "error" raises the first row's DataError; "skip" drops
    bad rows and counts them per reason in `.report` (one warning log line). columns: {your_name: our_name}.
    limit: read only the first `limit` rows. sft_rows: accept TRL's SFT rows (messages, prompt/completion,
    text) as one-response records (`loss.name: sft`). Returns a `PreferenceData` list with `.report` (a
    LoadReport)."""
    if tie_policy not in TIE_POLICIES:
        raise DataError(f"tie_policy: expected one of {', '.join(TIE_POLICIES)}, got {_short(tie_policy)}")
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row: expected 'error' or 'skip', got {_short(on_bad_row)}")
    name, rows = read_rows(source, split)
    lines = getattr(rows, "lines", None)  # 1-based file lines (JSONL, CSV)
    rows = rows if limit is None else rows[:limit]
    if not rows:
        raise DataError(f"{name} has no rows", source=name)
    columns = _check_columns(columns, rows, name)
    is_csv = isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".csv"
    row_ties = "error" if tie_policy == "skip" else tie_policy
    records, skipped = PreferenceData(), Counter()
    # disable=None: tqdm draws no bar when stderr is not a terminal (a log file gets no redraws)
    for i, raw in enumerate(tqdm(rows, desc=f"loading {name}", disable=True if len(rows) < 20_000 else None)):
        try:
            if isinstance(raw, RowError):
                raise raw
            row = _rename(raw, columns)
            record = record_from_row(decode_csv_cells(row) if is_csv else row, row_ties, sft_rows)
            record.origin = where(name, i, lines[i] if lines else None)
            records.append(record)
        except RowError as e:
            error = located_error(e, name, i, lines[i] if lines else None)
            if on_bad_row == "skip" or (tie_policy == "skip" and e.reason == "tied scores"):
                skipped[e.reason] += 1
                continue
            raise error from None
    records.report = LoadReport(len(rows), len(records), dict(skipped), name, *count_smells(records))
    if not records:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        raise DataError(f"no valid rows in {name} ({len(rows)} rows; reasons: {reasons})", source=name)
    if skipped:
        logger.warning(records.report.summary())
    return records


def warn_smells(records) -> None:
    """One warning line about duplicated and contradictory rows of loaded data (`LoadReport.smells`)."""
    report = getattr(records, "report", None)
    if report is not None and report.smells():
        logger.warning(report.smells())


# ------------------------------------------------------------------------------------------ saving, splits


def save_jsonl(records, path) -> Path:
    """One `to_dict()` per line; `load_preferences` reads it back to equal records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    return path


def split_records(records, eval_fraction: float, seed: int, *, by_annotator: bool = False):
    """Deterministic (train, eval) split, each keeping the input order. With `by_annotator`, all records of
    one annotator land in the same split (records without annotator are split one by one), so eval measures
    generalization to unseen annotators; eval then holds about, not exactly, `eval_fraction` of the records."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction: expected a number in [0, 1), got {_short(eval_fraction)}")
    records = list(records)
    groups: dict = {}
    for i, record in enumerate(records):
        key = ("annotator", record.annotator) if by_annotator and record.annotator is not None else ("row", i)
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, round(eval_fraction * len(records))) if eval_fraction > 0 else 0
    eval_rows: set[int] = set()
    for key in keys:
        if len(eval_rows) >= target:
            break
        eval_rows.update(groups[key])
    if eval_rows and len(eval_rows) == len(records):
        raise DataError(f"split_records: eval_fraction {eval_fraction} leaves no train record")
    train = [r for i, r in enumerate(records) if i not in eval_rows]
    return train, [r for i, r in enumerate(records) if i in eval_rows]


def pairwise_records(record: PreferenceRecord) -> list[PreferenceRecord]:
    """Every pair a (possibly partial) ranking implies: each ranked response beats every response ranked
    after it and every unranked one. For DPO-style training on ranking data."""
    unranked = [i for i in range(len(record.responses)) if i not in record.ranking]
    order = record.ranking + unranked
    prompt, responses = record.prompt, record.responses
    return [
        PreferenceRecord.pair(prompt, responses[better], responses[worse], record.annotator, record.weight)
        for a, better in enumerate(record.ranking)
        for worse in order[a + 1 :]
    ]


# ------------------------------------------------------------------------------ the `data:` config section


@dataclass
class DataConfig:
    """Preference data of the language-model methods (`data:` in a config)."""

    # file (.jsonl/.json/.parquet/.csv), saved `datasets` dir or hub dataset name; or a list of them, each
    # optionally {path: FILE, weight: W}: weights are each source's share of the training records (mix_records)
    train: str | list[str | dict[str, Any]] = ""
    eval: str | None = None  # held-out file; otherwise `eval_fraction` of train is held out
    eval_fraction: float = 0.1  # share of data.train held out for evaluation when data.eval is not given
    split: str = "train"  # the split of a saved or hub DatasetDict
    columns: dict[str, str] = dataclasses.field(
        default_factory=dict
    )  # your column -> ours: {question: prompt}
    tie_policy: Literal["error", "skip", "any-order", "truncate"] = "error"  # what tied scores do
    on_bad_row: Literal["error", "skip"] = "error"  # skip: drop bad rows, counted per reason
    # tokens of prompt + response; at most the model's position limit (a larger value is lowered to it, with
    # one warning line: core.encode.fit_lengths)
    max_length: int = 512
    max_prompt_length: int = 256  # the prompt keeps its last tokens
    limit: int | None = None  # read only the first rows
    # padding-free batches: each record's prompt once + its candidates in one packed row (core/logprobs.py);
    # same log-probs as padded batches, faster. false: right-padded batches
    packing: bool = True
    # chat template for conversational rows: a Jinja string, or a file holding one; replaces the tokenizer's
    # own (saved with the trained model's tokenizer). Needed when the tokenizer has none.
    chat_template: str | None = None

    def validate(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(
                f"config key 'data.limit' must be >= 1 (rows read from each source), got {self.limit}; "
                "leave it unset to read every row"
            )
        if self.max_length < 2:
            raise ConfigError(f"config key 'data.max_length' must be >= 2, got {self.max_length}")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"config key 'data.max_prompt_length' ({self.max_prompt_length}) must be >= 1 and < "
                f"data.max_length ({self.max_length})"
            )
        if self.chat_template is not None and not is_template(self.chat_template):
            if not Path(self.chat_template).expanduser().is_file():
                raise ConfigError(
                    f"config key 'data.chat_template': {self.chat_template!r} is neither a Jinja template "
                    "('{{ ... }}' / '{% ... %}') nor an existing file"
                )


def is_template(text: str) -> bool:
    """A Jinja template rather than a file name."""
    return "{{" in text or "{%" in text


def load_records(data: DataConfig, seed: int, *, eval_fraction: float | None = None, sft_rows: bool = False):
    """(train records, eval records) from the `data:` section: `data.eval`; else a saved DatasetDict's own
    held-out split (`test` or `validation`, when `data.split` is train); else a seeded split of `data.train`.
    Several `data.train` sources are each split, then their train parts mixed (`mix_records`). `sft_rows`:
    see `load_preferences`. The eval records' `.held_out` says where they came from (for the console)."""
    kwargs = dict(
        split=data.split,
        tie_policy=data.tie_policy,
        on_bad_row=data.on_bad_row,
        columns=data.columns or None,
        limit=data.limit,
        sft_rows=sft_rows,
    )
    if not data.train:
        raise ConfigError("config key 'data.train' is empty: name a preference data file or dataset")
    fraction = data.eval_fraction if eval_fraction is None else eval_fraction
    sources = train_sources(data.train)
    parts, evals = [], []
    own_splits = []
    for path, _ in sources:
        records = load_preferences(path, **kwargs)
        warn_smells(records)
        train, held_out = records, []
        own = None if data.eval or data.split != "train" else held_out_split(path)
        if own:
            held_out = load_preferences(path, **{**kwargs, "split": own})
            own_splits.append(f"{path} split '{own}'")
        elif not data.eval and fraction > 0 and len(records) >= 10:
            train, held_out = split_records(records, fraction, seed)
        parts.append(PreferenceData(train))
        parts[-1].report = records.report
        evals += held_out
    train = parts[0] if len(sources) == 1 else _mixture(parts, sources, seed)
    if data.eval:
        eval_records = load_preferences(data.eval, **kwargs)
        warn_smells(eval_records)
        return train, eval_records
    evals = PreferenceData(evals)
    evals.held_out = ", ".join(own_splits) or None
    return train, evals


def _mixture(parts: list[PreferenceData], sources, seed: int) -> PreferenceData:
    """`mix_records` of several sources, with one LoadReport over them and `.mixture` (per source: its
    weight, records available and records used)."""
    names = [path for path, _ in sources]
    records, used = mix_records(parts, [w for _, w in sources], seed)
    out = PreferenceData(records)
    reports = [p.report for p in parts if p.report is not None]
    skipped: Counter = Counter()
    for report in reports:
        skipped.update(report.skipped)
    n_rows, n_loaded = sum(r.n_rows for r in reports), sum(r.n_loaded for r in reports)
    out.report = LoadReport(n_rows, n_loaded, dict(skipped), " + ".join(names))
    out.mixture = [
        {"source": name, "weight": w, "records": len(part), "used": k}
        for name, (_, w), part, k in zip(names, sources, parts, used)
    ]
    return out
