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
import math
import numbers
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from prefalign.core.data_files import RowError, decode_csv_cells, read_rows
from prefalign.core.data_files import short_repr as _short
from prefalign.core.data_mix import mix_records, train_sources
from prefalign.core.data_smells import count_smells
from prefalign.core.errors import ConfigError, DataError

_Bad = RowError  # a row-level problem raised before the source and row are known

logger = logging.getLogger(__name__)

LAYOUTS = "prompt/chosen/rejected, chosen/rejected (implicit prompt), prompt/responses/ranking, prompt/responses/scores"
ANNOTATOR_COLUMNS = ("annotator", "annotator_id", "user_id")
FIELDS = ("prompt", "chosen", "rejected", "responses", "ranking", "scores", "weight", *ANNOTATOR_COLUMNS)
TIE_POLICIES = ("error", "skip", "any-order", "truncate")


def _located(error: _Bad, source: str, row: int, line: int | None = None) -> DataError:
    message = f"{source}: row {row}: field '{error.field}': {error.expected}"
    if line is not None:
        message += f" (line {line})"
    located = DataError(message, source=source, row=row, field=error.field, reason=error.reason)
    located.line = line
    return located


def where(source: str, row: int, line: int | None = None) -> str:
    """How messages name a row: `source row N` (0-based), plus `(line L)` for JSONL/CSV files."""
    return f"{source} row {row}" + (f" (line {line})" if line is not None else "")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


@dataclass
class PreferenceRecord:
    prompt: str | list[dict]
    responses: list[str | list[dict]]
    ranking: list[int]  # indices into responses, best first; unranked responses are below all ranked ones
    annotator: str | None = None
    weight: float = 1.0
    # where the record came from ("prefs.jsonl row 2 (line 3)"), for later messages; not part of its value
    origin: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def pair(cls, prompt, chosen, rejected, annotator=None, weight=1.0) -> PreferenceRecord:
        return cls(prompt, [chosen, rejected], [0, 1], annotator, weight)

    @property
    def chosen(self):
        return self.responses[self.ranking[0]]

    @property
    def rejected(self):
        """A worst response: of the worst tier as `core.metrics.ranked_ends` defines it (the last ranked one;
        for a partial ranking the unranked ones, tied last, of which this is the last)."""
        unranked = [i for i in range(len(self.responses)) if i not in self.ranking]
        return self.responses[unranked[-1] if unranked else self.ranking[-1]]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)  # a deep copy: editing the dict leaves the record alone
        out.pop("origin")
        return out


@dataclass
class LoadReport:
    n_rows: int
    n_loaded: int
    skipped: dict[str, int]  # reason -> number of rows dropped for it
    source: str = ""
    duplicates: int = 0  # loaded rows equal to an earlier one (same annotator, prompt and ranking)
    contradictions: int = 0  # loaded rows ordering two responses the other way than an earlier row
    smell_examples: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.source}: loaded {self.n_loaded} of {self.n_rows} rows"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {self.n_rows - self.n_loaded} ({reasons})"
        return text

    def smells(self) -> str:
        """One line about duplicated and contradictory rows ('' when there are none)."""
        parts = []
        if self.duplicates:
            parts.append(f"{self.duplicates} rows repeat an earlier row")
        if self.contradictions:
            parts.append(f"{self.contradictions} rows order two responses the other way than an earlier row")
        if not parts:
            return ""
        examples = "; ".join(self.smell_examples)
        return f"{self.source}: {' and '.join(parts)} (kept; e.g. {examples})"


class PreferenceData(list):
    """The list of records returned by `load_preferences`, with its `.report` (a `LoadReport`); a mixture
    of several sources (`load_records`) also has `.mixture`: one dict per source (see `mix_records`)."""

    report: LoadReport | None = None
    mixture: list[dict] | None = None


# ---------------------------------------------------------------------------------------------- validation


def _text_or_messages(value, field: str):
    if isinstance(value, str):
        if not value.strip():
            raise _Bad(field, "empty text", f"expected non-empty text, got {_short(value)}")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        messages = []
        for i, m in enumerate(value):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role.strip() or not isinstance(content, str):
                expected = "expected {'role': str, 'content': str}"
                raise _Bad(field, "wrong type", f"message {i}: {expected}, got {_short(m)}")
            messages.append({k: v for k, v in m.items() if v is not None})  # None: arrow filler
        if not any(m["content"].strip() for m in messages):
            raise _Bad(field, "empty text", "expected a message with non-empty content, all are empty")
        return messages
    if isinstance(value, (list, tuple)) and not value:
        raise _Bad(field, "empty text", "expected text or a non-empty list of messages, got []")
    expected = "expected text or a list of {'role', 'content'} messages"
    raise _Bad(field, "wrong type", f"{expected}, got {_short(value)}")


def ranking_from_scores(scores, tie_policy: str = "error") -> list[int]:
    """Indices sorted by score, best first. Ties: "error" raises; "any-order" orders tied responses as they
    appear (an arbitrary strict order: it invents preferences between equals); "truncate" keeps only the
    ranked prefix above the first tie (a partial ranking, so nothing is invented; an error if the top is tied).
    ("skip" is handled by `load_preferences`, which drops and counts tied rows.)"""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: earlier first among ties
    ties = [k for k in range(len(order) - 1) if scores[order[k]] == scores[order[k + 1]]]
    if not ties or tie_policy == "any-order":
        return order
    if tie_policy == "truncate" and ties[0] > 0:
        return order[: ties[0]]
    hint = "the top is tied" if tie_policy == "truncate" else "set tie_policy to skip/any-order/truncate"
    raise _Bad("scores", "tied scores", f"tied scores {_short(list(scores))} ({hint})")


def _check_ranking(value, n: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(i) for i in value):
        raise _Bad("ranking", "wrong type", f"expected a list of integer indices, got {_short(value)}")
    ranking = [int(i) for i in value]
    if not ranking:
        raise _Bad("ranking", "bad ranking", "expected at least one index (the best response), got []")
    for i in ranking:
        if not 0 <= i < n:
            what = f"{'negative index' if i < 0 else 'index out of range'} {i} in {ranking}"
            raise _Bad("ranking", "bad ranking", f"{what}; expected indices 0..{n - 1} ({n} responses)")
    duplicates = [i for i, count in Counter(ranking).items() if count > 1]
    if duplicates:
        raise _Bad("ranking", "bad ranking", f"duplicate index {duplicates[0]} in {ranking}; expected unique")
    return ranking


def _check_scores(value, n: int) -> list[float]:
    if not isinstance(value, (list, tuple)) or not all(_is_real(s) for s in value):
        raise _Bad("scores", "wrong type", f"expected a list of numbers (one each), got {_short(value)}")
    if len(value) != n:
        raise _Bad("scores", "wrong type", f"expected {n} scores (one per response), got {len(value)}")
    if not all(_is_finite(s) for s in value):
        raise _Bad("scores", "non-finite score", f"expected finite numbers, got {_short(list(value))}")
    return [float(s) for s in value]


# the start of an assistant turn in Anthropic-HH style dialogues ("\n\nHuman: ...\n\nAssistant: ...")
ASSISTANT_TURN = re.compile(r"(?:^|\n)[ \t]*Assistant:")


def _split_implicit_prompt(chosen, rejected):
    """The prompt of an implicit-prompt row: the shared beginning of chosen and rejected, cut back to a
    boundary so that neither response starts inside a word or a turn.

    Messages: the shared leading messages. Text: the shared characters up to the end of the last
    "Assistant:" turn marker they contain (the HH convention), else up to the last whitespace they contain
    (the whitespace goes to the responses). So "...Assistant: yes it is." / "...Assistant: yeah no." split
    after "Assistant:", never inside "ye", and " hi" / " hi there" is a valid pair."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if isinstance(chosen, str):
        shared = chosen[:k]
        turns = list(ASSISTANT_TURN.finditer(shared))
        if turns:
            k = turns[-1].end()
        else:
            k = max((i for i, ch in enumerate(shared) if ch.isspace()), default=0)
    if k == 0:
        raise _Bad("prompt", "missing field", "missing, and chosen/rejected share no prefix to use as prompt")
    return chosen[:k], chosen[k:], rejected[k:]


def _annotator(row: dict):
    found = {}
    for column in ANNOTATOR_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        if _is_int(value):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise _Bad(column, "wrong type", f"expected a non-empty string or integer, got {_short(value)}")
        found[column] = value
    if len(set(found.values())) > 1:
        raise _Bad("annotator", "ambiguous layout", f"conflicting annotator columns {found}")
    return next(iter(found.values()), None)


def _weight(row: dict) -> float:
    weight = row.get("weight")
    if weight is None:
        return 1.0
    if not _is_real(weight) or not _is_finite(weight) or weight <= 0:
        raise _Bad("weight", "bad weight", f"expected a finite number > 0, got {_short(weight)}")
    return float(weight)


def _record(row, tie_policy: str) -> PreferenceRecord:
    if not isinstance(row, dict):
        raise _Bad("row", "not an object", f"expected an object with named fields, got {type(row).__name__}")
    present = {k for k in FIELDS if row.get(k) is not None}
    pair, listwise = present & {"chosen", "rejected"}, present & {"responses", "ranking", "scores"}
    if pair and listwise:
        raise _Bad("responses", "ambiguous layout", f"both {sorted(pair)} and {sorted(listwise)} are present")
    if {"ranking", "scores"} <= present:
        raise _Bad("scores", "ambiguous layout", "both 'ranking' and 'scores' are present; keep one")
    if pair:
        for name in ("chosen", "rejected"):
            if name not in present:
                raise _Bad(name, "missing field", f"missing (layout prompt/chosen/rejected needs '{name}')")
        chosen = _text_or_messages(row["chosen"], "chosen")
        rejected = _text_or_messages(row["rejected"], "rejected")
        if chosen == rejected:
            raise _Bad("chosen", "identical responses", "chosen == rejected; expected two distinct responses")
        if "prompt" in present:
            prompt = row["prompt"]
        elif isinstance(chosen, str) != isinstance(rejected, str):
            raise _Bad("rejected", "mixed text and messages", "expected chosen and rejected of one kind")
        else:
            prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
        responses = [_text_or_messages(chosen, "chosen"), _text_or_messages(rejected, "rejected")]
        ranking, kind_field = [0, 1], "chosen"
    elif listwise:
        for name in ("prompt", "responses"):
            if name not in present:
                raise _Bad(name, "missing field", "missing (layouts prompt/responses/ranking or /scores)")
        if "ranking" not in present and "scores" not in present:
            raise _Bad("ranking", "missing field", "missing (give 'ranking' or 'scores' with 'responses')")
        prompt, value = row["prompt"], row["responses"]
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            what = f"{len(value)}" if isinstance(value, (list, tuple)) else _short(value)
            raise _Bad("responses", "too few responses", f"expected a list of >= 2 responses, got {what}")
        responses = [_text_or_messages(r, f"responses[{i}]") for i, r in enumerate(value)]
        if "ranking" in present:
            ranking = _check_ranking(row["ranking"], len(responses))
        else:
            ranking = ranking_from_scores(_check_scores(row["scores"], len(responses)), tie_policy)
        kind_field = "responses"
        for i in range(len(responses)):  # a ranked response equal to another one contradicts itself
            for j in range(i):
                if responses[i] == responses[j] and (i in ranking or j in ranking):
                    raise _Bad("responses", "identical responses", f"responses {j} and {i} are identical")
    elif "prompt" in present:
        raise _Bad("chosen", "missing field", "missing; expected chosen/rejected or responses+ranking/scores")
    else:
        got = ", ".join(sorted(map(str, row))) or "none"
        raise _Bad("columns", "unknown layout", f"none known (got: {got}); accepted column sets: {LAYOUTS}")
    prompt = _text_or_messages(prompt, "prompt")
    if len({isinstance(x, str) for x in [prompt, *responses]}) > 1:
        raise _Bad(kind_field, "mixed text and messages", "expected all text or all messages (with prompt)")
    return PreferenceRecord(prompt, responses, ranking, _annotator(row), _weight(row))


def validate_record(record_dict, row, source="<memory>", *, tie_policy="error") -> PreferenceRecord:
    """One raw row (any accepted layout) -> PreferenceRecord, or a DataError naming source, row and field.
    `tie_policy` here is "error", "any-order" or "truncate" (see `ranking_from_scores`)."""
    try:
        return _record(record_dict, tie_policy)
    except _Bad as e:
        raise _located(e, source, row) from None


def _rename(row, columns: dict):
    if not columns or not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if k not in columns}
    for old, new in columns.items():
        if old in row:
            if out.get(new) is not None:
                raise _Bad(new, "ambiguous layout", f"both '{old}' (mapped by columns) and '{new}' present")
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
    source, *, split="train", tie_policy="error", on_bad_row="error", columns=None, limit=None
) -> PreferenceData:
    """Load and validate preference rows from a file (.jsonl/.json/.parquet/.csv), a `save_to_disk`
    directory (`split` picks from a DatasetDict), a hub name (`hf://owner/name` or `owner/name`, only when no
    such local path exists), or an in-memory list of dicts/records or `datasets.Dataset`.

    tie_policy (tied scores): "error" | "skip" (drop the row, counted in the report) | "any-order" |
    "truncate" (see `ranking_from_scores`). on_bad_row: "error" raises the first row's DataError; "skip" drops
    bad rows and counts them per reason in `.report` (one warning log line). columns: {your_name: our_name}.
    limit: read only the first `limit` rows. Returns a `PreferenceData` list with `.report` (a LoadReport)."""
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
            if isinstance(raw, _Bad):
                raise raw
            row = _rename(raw, columns)
            record = _record(decode_csv_cells(row) if is_csv else row, row_ties)
            record.origin = where(name, i, lines[i] if lines else None)
            records.append(record)
        except _Bad as e:
            error = _located(e, name, i, lines[i] if lines else None)
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


def load_records(data: DataConfig, seed: int, *, eval_fraction: float | None = None):
    """(train records, eval records) from the `data:` section: `data.eval`, or a seeded split of `data.train`.
    Several `data.train` sources are each split, then their train parts mixed (`mix_records`)."""
    kwargs = dict(
        split=data.split,
        tie_policy=data.tie_policy,
        on_bad_row=data.on_bad_row,
        columns=data.columns or None,
        limit=data.limit,
    )
    if not data.train:
        raise ConfigError("config key 'data.train' is empty: name a preference data file or dataset")
    fraction = data.eval_fraction if eval_fraction is None else eval_fraction
    sources = train_sources(data.train)
    parts, evals = [], []
    for path, _ in sources:
        records = load_preferences(path, **kwargs)
        warn_smells(records)
        train, held_out = records, []
        if not data.eval and fraction > 0 and len(records) >= 10:
            train, held_out = split_records(records, fraction, seed)
        parts.append(PreferenceData(train))
        parts[-1].report = records.report
        evals += held_out
    train = parts[0] if len(sources) == 1 else _mixture(parts, sources, seed)
    if data.eval:
        eval_records = load_preferences(data.eval, **kwargs)
        warn_smells(eval_records)
        return train, eval_records
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
