"""Preference records kept on disk: validated rows in a memory-mapped Arrow file, read by index.

A run's data never becomes a Python list. `data.load_record_set` streams a source's rows through the same
row validation as `load_preferences` (`records.record_from_row`, the same messages) into an Arrow file,
`records-KEY.arrow` in the data cache, and opens it memory-mapped as a `datasets.Dataset`; the key covers
the source's bytes (or its `datasets` fingerprint) and every option that changes the records, so a second
run of the same data opens the file without reading the source again. Splits and mixtures select rows by
index (`RecordSet.select`); tokenization maps the dataset in batches (`core.encode_arrow`).

One row per record: `prompt` and each of `responses` as JSON text (text or chat messages), `ranking`,
`annotator`, `weight`, and `origin` (how messages name the row: "prefs.jsonl row 2 (line 3)").

The cache folder is `$PREFALIGN_DATA_CACHE`, else `$PREFALIGN_CACHE/data` (default
`~/.cache/prefalign/data`); files are written to a temporary name and renamed, so a crash never leaves a
half-written entry. Delete the folder to reclaim space: nothing else refers to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from prefalign.core.records import LoadReport, PreferenceRecord

CACHE_VERSION = 1  # bump when what a records file holds is computed differently

SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("ranking", pa.list_(pa.int32())),
        ("annotator", pa.string()),
        ("weight", pa.float64()),
        ("origin", pa.string()),
    ]
)
BATCH_ROWS = 10_000  # rows per Arrow record batch while writing (what is held in memory at once)


def cache_dir() -> Path:
    root = os.environ.get("PREFALIGN_DATA_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign") / "data"


def digest(*parts) -> str:
    """A short stable key of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, or of every file under a folder (names and bytes), read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def to_columns(records: list[PreferenceRecord]) -> dict[str, list]:
    return {
        "prompt": [_json(r.prompt) for r in records],
        "responses": [[_json(x) for x in r.responses] for r in records],
        "ranking": [r.ranking for r in records],
        "annotator": [r.annotator for r in records],
        "weight": [r.weight for r in records],
        "origin": [r.origin for r in records],
    }


def from_columns(batch: dict[str, list]) -> list[PreferenceRecord]:
    """The records of a batch of rows (a dict of columns, as `datasets` gives them)."""
    out = []
    for prompt, responses, ranking, annotator, weight, origin in zip(
        batch["prompt"],
        batch["responses"],
        batch["ranking"],
        batch["annotator"],
        batch["weight"],
        batch["origin"],
    ):
        record = PreferenceRecord(json.loads(prompt), [json.loads(x) for x in responses], list(ranking))
        record.annotator, record.weight, record.origin = annotator, weight, origin
        out.append(record)
    return out


def _batches(records: Iterable[PreferenceRecord]) -> Iterator[pa.RecordBatch]:
    chunk: list[PreferenceRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == BATCH_ROWS:
            yield pa.RecordBatch.from_pydict(to_columns(chunk), schema=SCHEMA)
            chunk = []
    if chunk:
        yield pa.RecordBatch.from_pydict(to_columns(chunk), schema=SCHEMA)


def write_records(records: Iterable[PreferenceRecord], path: Path | None):
    """Write records batch by batch to the Arrow file `path` (atomically) and open it memory-mapped; with
    `path=None` build the table in memory (in-memory sources). Returns a `datasets.Dataset`."""
    import datasets  # lazy: core.records and friends stay importable without it

    if path is None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, SCHEMA) as writer:
            for batch in _batches(records):
                writer.write_batch(batch)
        return datasets.Dataset.from_buffer(sink.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            for batch in _batches(records):
                writer.write_batch(batch)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(path))


def write_meta(path: Path, report: LoadReport) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report.__dict__))
    os.replace(tmp, path)


def read_meta(path: Path) -> LoadReport | None:
    try:
        return LoadReport(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class RecordSet(Sequence):
    """Validated preference records on disk: `len()`, `records[i]` -> `PreferenceRecord` (with its origin),
    iteration in Arrow batches. `.dataset` is the `datasets.Dataset` (memory-mapped, or in memory for in-memory
    sources); `.key` identifies its content (None when it is not cached: in-memory sources); `.report` (a
    `LoadReport`) and `.mixture` as on `PreferenceData`."""

    held_out: str | None = None  # an eval set: the DatasetDict split(s) it came from (`data.load_records`)

    def __init__(self, dataset, key: str | None, report: LoadReport | None = None, mixture=None):
        self.dataset, self.key, self.report, self.mixture = dataset, key, report, mixture

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.rows(range(len(self))[index])
        i = range(len(self))[index]  # IndexError out of range, negative indices from the end
        return from_columns(self.dataset[i : i + 1])[0]

    def rows(self, indices) -> list[PreferenceRecord]:
        indices = [int(i) for i in indices]
        return from_columns(self.dataset[indices]) if indices else []

    def __iter__(self):
        for batch in self.dataset.iter(batch_size=1000):
            yield from from_columns(batch)

    def __repr__(self) -> str:
        return f"RecordSet({len(self)} records, key={self.key})"

    def select(self, indices, why: str) -> RecordSet:
        """The records at `indices` (in that order; repeats allowed), a new set keyed by this one's key, `why`
        and the indices."""
        indices = np.asarray(indices, dtype=np.int64)
        key = (
            None
            if self.key is None
            else digest(self.key, why, hashlib.blake2b(indices.tobytes()).hexdigest())
        )
        return RecordSet(self.dataset.select(indices), key, self.report, self.mixture)

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(responses per record, ranked responses per record), from the Arrow columns without reading rows."""
        import pyarrow.compute as pc

        table = self.dataset.with_format("arrow")[:]
        return (
            pc.list_value_length(table["responses"]).to_numpy(zero_copy_only=False),
            pc.list_value_length(table["ranking"]).to_numpy(zero_copy_only=False),
        )


def concatenate(parts: list[RecordSet], key_parts) -> RecordSet:
    """One set of several (a mixture), keyed by theirs and `key_parts`."""
    import datasets

    keys = [p.key for p in parts]
    key = None if None in keys else digest(keys, key_parts)
    return RecordSet(datasets.concatenate_datasets([p.dataset for p in parts]), key)
