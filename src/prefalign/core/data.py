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
import itertools
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from prefalign.core import data_arrow
from prefalign.core.data_arrow import RecordSet, digest
from prefalign.core.data_files import RowError, decode_csv_cells, held_out_split, iter_rows, load_hub
from prefalign.core.data_files import short_repr as _short
from prefalign.core.data_mix import mix_indices, train_sources
from prefalign.core.data_smells import SmellCounter
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
    """`columns` checked: a mapping onto our field names, each of its columns present in some row of `rows`
    (the source's first rows; `load_preferences` passes them before validating any row)."""
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


def _check_options(tie_policy, on_bad_row) -> None:
    if tie_policy not in TIE_POLICIES:
        raise DataError(f"tie_policy: expected one of {', '.join(TIE_POLICIES)}, got {_short(tie_policy)}")
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row: expected 'error' or 'skip', got {_short(on_bad_row)}")


class _Validation:
    """One pass over a source's rows: `records()` yields each valid row's `PreferenceRecord` (origin set), in
    order; afterwards `report(smells)` is its `LoadReport`. Row-level checks are `records.record_from_row` (one
    function per row layout); this adds the source's name, row and line to their messages, the renaming of
    `columns`, CSV cell decoding, and `on_bad_row` / `tie_policy: skip` counting."""

    PEEK = 10_000  # rows read ahead to check `columns` before validating any row

    def __init__(
        self, source, *, split, tie_policy, on_bad_row, columns, limit, hub=None, name=None, sft_rows=False
    ):
        _check_options(tie_policy, on_bad_row)
        self.sft_rows = sft_rows
        self.name, rows = iter_rows(source, split, hub)
        self.name = name or self.name
        rows = rows if limit is None else itertools.islice(rows, limit)
        head = list(itertools.islice(rows, self.PEEK))
        if not head:
            raise DataError(f"{self.name} has no rows", source=self.name)
        self.rows = itertools.chain(head, rows)
        self.columns = _check_columns(columns, [row for row, _ in head], self.name) if columns else {}
        self.is_csv = isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".csv"
        self.tie_policy, self.on_bad_row = tie_policy, on_bad_row
        self.n_rows, self.skipped = 0, Counter()
        self.smells = SmellCounter()
        self.big = len(head) == self.PEEK

    def records(self):
        row_ties = "error" if self.tie_policy == "skip" else self.tie_policy
        # disable=None: tqdm draws no bar when stderr is not a terminal (a log file gets no redraws)
        bar = tqdm(desc=f"loading {self.name}", unit=" rows", disable=None if self.big else True)
        for i, (raw, line) in enumerate(self.rows):
            self.n_rows = i + 1
            bar.update()
            try:
                if isinstance(raw, RowError):
                    raise raw
                row = _rename(raw, self.columns)
                record = record_from_row(
                    decode_csv_cells(row) if self.is_csv else row, row_ties, self.sft_rows
                )
            except RowError as e:
                error = located_error(e, self.name, i, line)
                if self.on_bad_row == "skip" or (self.tie_policy == "skip" and e.reason == "tied scores"):
                    self.skipped[e.reason] += 1
                    continue
                raise error from None
            record.origin = where(self.name, i, line)
            self.smells.add(record)
            yield record
        bar.close()

    def report(self, name_of) -> LoadReport:
        """The pass's LoadReport (call after `records()` is exhausted); `name_of(i)`: the origin of record i."""
        n_loaded = len(self.smells.rows)
        report = LoadReport(
            self.n_rows, n_loaded, dict(self.skipped), self.name, *self.smells.result(name_of)
        )
        if not n_loaded:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            raise DataError(
                f"no valid rows in {self.name} ({self.n_rows} rows; reasons: {reasons})", source=self.name
            )
        if self.skipped:
            logger.warning(report.summary())
        return report


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
    LoadReport). A run keeps its records on disk instead (`load_record_set`: the same checks and messages)."""
    check = _Validation(
        source, split=split, tie_policy=tie_policy, on_bad_row=on_bad_row, columns=columns, limit=limit,
        sft_rows=sft_rows,
    )  # fmt: skip
    records = PreferenceData(check.records())
    records.report = check.report(lambda i: records[i].origin)
    return records


def source_key(source, split, hub: dict | None) -> str | None:
    """What identifies a source's rows: the bytes of a file or saved folder, a `datasets` fingerprint, or a hub
    dataset streamed at a pinned commit; None when nothing does (lists, a streamed branch): not cached."""
    import sys

    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, datasets.Dataset):
        return source._fingerprint
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if path.exists():
        return data_arrow.file_digest(path)
    hub = hub or {}
    if hub.get("streaming"):
        revision = hub.get("revision") or ""
        return digest(source, split, hub) if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    return "hub"  # resolved to the loaded dataset's fingerprint by load_record_set


def load_record_set(
    source,
    *,
    split="train",
    tie_policy="error",
    on_bad_row="error",
    columns=None,
    limit=None,
    hub=None,
    sft_rows=False,
) -> RecordSet:
    """`load_preferences` for a run: the same validation and messages, but the records go to a memory-mapped
    Arrow file in the data cache (`core.data_arrow`), batch by batch, and come back as a `RecordSet`. A second
    call with the same source bytes and options opens that file without reading the source. `hub`: the
    `datasets.load_dataset` options of a hub source (name, revision, streaming)."""
    _check_options(tie_policy, on_bad_row)
    name = str(source) if isinstance(source, (str, Path)) else None
    options = [name, split, tie_policy, on_bad_row, columns, limit, hub, data_arrow.CACHE_VERSION]
    options += ["sft_rows"] if sft_rows else []  # keys of runs without SFT rows stay as they were
    key = source_key(source, split, hub)
    from_hub = key == "hub"
    if from_hub:  # loaded once here (datasets caches it); its fingerprint names the rows
        source = load_hub(source, split, hub)
        key = getattr(source, "_fingerprint", None)
    path = None if key is None else data_arrow.cache_dir() / f"records-{digest(key, options)}.arrow"
    if path is not None and path.exists():
        report = data_arrow.read_meta(path.with_suffix(".json"))
        if report is not None:
            if report.skipped:
                logger.warning(report.summary())
            return RecordSet(datasets_from_file(path), path.stem, report)
    check = _Validation(
        source,
        split=split,
        tie_policy=tie_policy,
        on_bad_row=on_bad_row,
        columns=columns,
        limit=limit,
        hub=hub,
        name=name if from_hub else None,  # a hub dataset loaded above: messages name the hub source
        sft_rows=sft_rows,
    )
    dataset = data_arrow.write_records(check.records(), path)
    report = check.report(lambda i: dataset[i]["origin"])
    if path is not None:
        data_arrow.write_meta(path.with_suffix(".json"), report)
    return RecordSet(dataset, None if path is None else path.stem, report)


def datasets_from_file(path: Path):
    import datasets  # lazy: loaded for the run's data only

    return datasets.Dataset.from_file(str(path))


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
    records = list(records)
    annotators = [r.annotator for r in records] if by_annotator else None
    train, held_out = split_indices(len(records), eval_fraction, seed, annotators)
    return [records[i] for i in train], [records[i] for i in held_out]


def split_indices(n: int, eval_fraction: float, seed: int, annotators: list | None = None):
    """(train indices, eval indices) of `split_records` over n records (`annotators`: one per record, to keep
    each annotator's records together)."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction: expected a number in [0, 1), got {_short(eval_fraction)}")
    if annotators is None:
        keys, groups = list(range(n)), None  # one group per record (the same shuffle as the general case)
    else:
        groups = {}
        for i, who in enumerate(annotators):
            groups.setdefault(("annotator", who) if who is not None else ("row", i), []).append(i)
        keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, round(eval_fraction * n)) if eval_fraction > 0 else 0
    if groups is None:
        held_out = sorted(keys[:target])
    else:
        chosen: list[int] = []
        for key in keys:
            if len(chosen) >= target:
                break
            chosen += groups[key]
        held_out = sorted(chosen)
    if held_out and len(held_out) == n:
        raise DataError(f"split_records: eval_fraction {eval_fraction} leaves no train record")
    is_eval = np.zeros(n, dtype=bool)
    is_eval[held_out] = True
    return np.flatnonzero(~is_eval), np.asarray(held_out, dtype=np.int64)


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
    held-out split (`test`, else `validation`, when `data.split` is train); else a seeded split of
    `data.train`. Several `data.train` sources are each split, then their train parts mixed (`mix_indices`).
    Both are `RecordSet`s: memory-mapped Arrow rows (`load_record_set`), selected by index. `sft_rows`: see
    `load_preferences`. The eval set's `.held_out` names the DatasetDict split(s) it came from (the console)."""
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
    parts, evals, own_splits = [], [], []
    for source in sources:
        hub = {k: v for k, v in source.hub.items() if k != "split"}
        split = source.hub.get("split", data.split)
        records = load_record_set(source.path, **{**kwargs, "split": split}, hub=hub)
        warn_smells(records)
        train, held_out = records, None
        own = None if data.eval or split != "train" else held_out_split(source.path)
        if own:  # the dataset's own held-out split
            held_out = load_record_set(source.path, **{**kwargs, "split": own}, hub=hub)
            own_splits.append(f"{source.path} split '{own}'")
        elif not data.eval and fraction > 0 and len(records) >= 10:
            train_rows, eval_rows = split_indices(len(records), fraction, seed)
            train, held_out = records.select(train_rows, "train"), records.select(eval_rows, "eval")
        parts.append(train)
        evals += [held_out] if held_out is not None else []
    train = parts[0] if len(sources) == 1 else _mixture(parts, sources, seed)
    if data.eval:
        eval_records = load_record_set(data.eval, **kwargs)
        warn_smells(eval_records)
        return train, eval_records
    if not evals:
        return train, []
    evals = evals[0] if len(evals) == 1 else data_arrow.concatenate(evals, "eval")
    evals.held_out = ", ".join(own_splits) or None
    return train, evals


def _mixture(parts: list[RecordSet], sources, seed: int) -> RecordSet:
    """`mix_indices` of several sources, with one LoadReport over them and `.mixture` (per source: its
    weight, records available and records used)."""
    names = [source.path for source in sources]
    weights = [source.weight for source in sources]
    chosen, used = mix_indices([len(p) for p in parts], weights, seed)
    out = data_arrow.concatenate([p.select(rows, "mix") for p, rows in zip(parts, chosen)], [weights, seed])
    reports = [p.report for p in parts if p.report is not None]
    skipped: Counter = Counter()
    for report in reports:
        skipped.update(report.skipped)
    n_rows, n_loaded = sum(r.n_rows for r in reports), sum(r.n_loaded for r in reports)
    out.report = LoadReport(n_rows, n_loaded, dict(skipped), " + ".join(names))
    out.mixture = [
        {"source": name, "weight": w, "records": len(part), "used": k}
        for name, w, part, k in zip(names, weights, parts, used)
    ]
    return out
