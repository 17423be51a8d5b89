"""Tokenized records on disk: `encode_data` for a `RecordSet` maps it in batches (`Dataset.map(batched=True)`)
through the same encoder as in-memory records (`core.encode.encode_records`), into a memory-mapped Arrow file
cached under a key that covers every input that changes the token ids:

- the records (`RecordSet.key`: the source's bytes and every loading option, the split/mixture indices);
- the tokenizer: the bytes of every file `save_pretrained` writes (vocabulary, merges, added and special
  tokens, normalizer, the chat template installed from `data.chat_template`), its class;
- (max_length, max_prompt_length) after `fit_lengths`, and the truncation rule;
- the encoder itself: the bytes of `core/encode.py` and this file, and the transformers and tokenizers
  versions (a change to how text is tokenized computes afresh).

The same discipline as the reference cache (`core.reference`): the key names everything, files are written
to a temporary name and renamed (datasets' map does this), and `CACHE_VERSION` is bumped when what the file
holds is computed differently. A cached second run opens the file and reads its per-batch statistics
columns (what truncation cut), without tokenizing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import tempfile
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from prefalign.core import encode
from prefalign.core.data import DataConfig
from prefalign.core.data_arrow import RecordSet, cache_dir, digest, from_columns
from prefalign.core.encode import EncodedRecord, EncodeReport, encode_records
from prefalign.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
# what encode_records' report counts, one column each: a batch's totals sit on its first row (zeros elsewhere),
# so a column's sum (or max) over the file is the report of the whole set
STATS = {
    "prompts_cut": "sum",
    "responses_cut": "sum",
    "responses": "sum",
    "longest_prompt": "max",
    "longest_sequence": "max",
}


def tokenizer_digest(tokenizer) -> str:
    """blake2b of every file the tokenizer's `save_pretrained` writes (its own name and path left out)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).rglob("*")):
            if file.is_file():
                text = file.read_bytes()
                if file.name == "tokenizer_config.json":
                    text = b"\n".join(line for line in text.split(b"\n") if b'"name_or_path"' not in line)
                h.update(file.name.encode() + b"\0" + text)
    return h.hexdigest()


def encoder_digest() -> str:
    """The encoder's code and the libraries that tokenize: any change computes the ids afresh."""
    h = hashlib.blake2b(digest_size=16)
    for module in (encode.__file__, __file__):
        h.update(Path(module).read_bytes())
    for package in ("transformers", "tokenizers"):
        h.update(f"{package}={metadata.version(package)}".encode())
    return h.hexdigest()


class EncodedSet(Sequence):
    """Tokenized records on disk: `len()`, `encoded[i]` -> `EncodedRecord`, `encoded[a:b]` and
    `encoded.__getitems__(indices)` -> lists (one Arrow read per batch); picklable by file (DataLoader workers
    open the same memory map). `kept`: the index of each one's record among those given; `report` (an
    `EncodeReport`), `lengths` as on `EncodedData`; `key`: the cache key (None when not cached). Reference
    log-probs set by `set_reference_logps` are held in memory (4 bytes per candidate) and attached to each
    record read."""

    def __init__(self, dataset, kept, report: EncodeReport, lengths, key: str | None):
        self.dataset, self.kept, self.report, self.lengths, self.key = dataset, kept, report, lengths, key
        self.reference: tuple[np.ndarray, np.ndarray] | None = None  # (flat values, start offsets)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.__getitems__(range(len(self))[index])
        i = range(len(self))[index]
        return self._records(self.dataset[i : i + 1], [i])[0]

    def __getitems__(self, indices) -> list[EncodedRecord]:
        indices = [int(i) for i in indices]
        return self._records(self.dataset[indices], indices) if indices else []

    def __iter__(self):
        start = 0
        for batch in self.dataset.iter(batch_size=1000):
            n = len(batch["ranking"])
            yield from self._records(batch, range(start, start + n))
            start += n

    def _records(self, batch: dict, indices) -> list[EncodedRecord]:
        out = []
        for k, i in enumerate(indices):
            record = EncodedRecord(
                batch["prompt_ids"][k],
                batch["response_ids"][k],
                batch["ranking"][k],
                batch["weight"][k],
                batch["annotator"][k],
            )
            if self.reference is not None:
                values, starts = self.reference
                record.reference_logps = values[starts[i] : starts[i] + len(record.response_ids)].tolist()
            out.append(record)
        return out

    def set_reference_logps(self, logps: list[list[float]]) -> None:
        """Reference log-probs, one list per record (one float per candidate), in order."""
        counts = np.array([len(row) for row in logps], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        values = np.array([v for row in logps for v in row], dtype=np.float64)
        self.reference = (values, starts)

    def sizes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt tokens, longest candidate's tokens, candidates) per record, from the Arrow columns."""
        table = self.dataset.with_format("arrow")[:]
        prompt = pc.list_value_length(table["prompt_ids"]).to_numpy(zero_copy_only=False)
        flat = pc.list_value_length(pc.list_flatten(table["response_ids"])).to_numpy(zero_copy_only=False)
        count = pc.list_value_length(table["response_ids"]).to_numpy(zero_copy_only=False)
        longest = (
            np.maximum.reduceat(flat, np.concatenate([[0], np.cumsum(count)[:-1]])) if len(flat) else flat
        )
        return prompt, longest, count

    def longest(self, n: int) -> list[EncodedRecord]:
        """`logprobs.longest_records`: the n records with the longest prompt + candidate (then the most
        candidates), in order."""
        prompt, longest, count = self.sizes()
        order = np.lexsort((-np.arange(len(self)), count, prompt + longest))[::-1]  # ties: the earlier first
        return self.__getitems__(sorted(order[:n].tolist()))


def encode_data(tokenizer, records, data: DataConfig, name: str, lengths: tuple[int, int]):
    """A run's records -> encoded records: a `RecordSet` is tokenized in batches into a cached Arrow file
    (an `EncodedSet`); a list goes through `core.encode.encode_data`. Both count and report truncation in one
    warning line and drop (under `data.on_bad_row: skip`) or refuse records whose ranked responses became
    identical token sequences, with the same messages."""
    if not isinstance(records, RecordSet) or not len(records):
        return encode.encode_data(
            tokenizer, [] if isinstance(records, RecordSet) else records, data, name, lengths
        )
    if len(records) and bool(pc.any(pc.starts_with(_column(records, "prompt"), "[")).as_py()):
        if getattr(tokenizer, "chat_template", None) is None:  # chat messages are stored as JSON lists
            raise ConfigError(
                f"{name}: chat messages given, but the tokenizer has no chat_template; set data.chat_template "
                "(a Jinja template or a file holding one)"
            )
    max_length, max_prompt_length = lengths
    key = None
    if records.key is not None:
        key = digest(
            CACHE_VERSION, records.key, tokenizer_digest(tokenizer), lengths, "keep_start", encoder_digest()
        )
    with _bar(len(records) >= 5000):
        mapped = records.dataset.map(
            _batch_encoder(tokenizer, max_length, max_prompt_length),
            batched=True,
            batch_size=1000,
            remove_columns=records.dataset.column_names,
            cache_file_name=None if key is None else str(cache_dir() / f"encoded-{key}.arrow"),
            load_from_cache_file=True,
            new_fingerprint=key or uuid.uuid4().hex,
            desc=f"tokenize {name}",
        )
    stats = mapped.with_format("arrow")[:]
    report = EncodeReport(records=len(mapped))
    for column, how in STATS.items():
        values = stats[f"stats_{column}"]
        setattr(report, column, int((pc.sum if how == "sum" else pc.max)(values).as_py() or 0))
    report.identical = np.flatnonzero(stats["identical"].to_numpy(zero_copy_only=False)).tolist()
    cut = report.summary(name, max_length, max_prompt_length)
    if cut:
        logger.warning(cut)
    kept = np.arange(len(mapped))
    if report.identical:
        names = [records[i].origin or f"record {i}" for i in report.identical[:3]]
        more = len(report.identical) - len(names)
        shown = ", ".join(names) + (f" and {more} more" if more > 0 else "")
        what = (
            f"{len(report.identical)} of {len(records)} records have ranked responses whose token ids are "
            f"identical after tokenization and truncation to data.max_length {max_length} (no preference left): "
            f"{shown}"
        )
        if data.on_bad_row != "skip":
            raise DataError(
                f"{name}: {what}; raise data.max_length, check that the tokenizer tells the responses apart "
                "(unknown tokens), or set data.on_bad_row: skip to drop them"
            )
        logger.warning("%s: skipped %s", name, what)
        kept = np.setdiff1d(kept, report.identical)
        if not len(kept):
            raise DataError(f"{name}: no record left after dropping those with identical token ids")
        mapped = mapped.select(kept)
        key = None if key is None else digest(key, "kept", kept.tolist())
    columns = ["prompt_ids", "response_ids", "ranking", "weight", "annotator"]
    return EncodedSet(mapped.select_columns(columns), kept, report, lengths, key)


@contextlib.contextmanager
def _bar(wanted: bool):
    """datasets' progress bar only for large sets on a terminal (as `core.encode`'s tqdm: a log gets none)."""
    import datasets  # lazy like everywhere in core: the records on disk already loaded it

    was = datasets.is_progress_bar_enabled()
    if was and not (wanted and sys.stderr.isatty()):
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _column(records: RecordSet, name: str):
    return records.dataset.with_format("arrow")[:][name]


class Pretokenized:
    """The tokenizer, with the ids of a batch's texts computed in ONE call (the Rust tokenizer's batch path)
    and returned when the encoder asks for one of them (`tokenizer(text, add_special_tokens=False)`); every
    other call and attribute goes to the tokenizer itself. The same ids by construction: the same tokenizer
    on the same string, without padding or truncation; a text the encoder asks for that was not
    pre-tokenized (rendered chat, a joined prompt + response) is tokenized as before."""

    def __init__(self, tokenizer, texts: list[str]):
        self._tokenizer = tokenizer
        texts = list(dict.fromkeys(t for t in texts if isinstance(t, str)))
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        self._ids = dict(zip(texts, ids))

    def __call__(self, text, *args, **kwargs):
        if (
            not args
            and kwargs == {"add_special_tokens": False}
            and isinstance(text, str)
            and text in self._ids
        ):
            return {"input_ids": list(self._ids[text])}
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _batch_encoder(tokenizer, max_length: int, max_prompt_length: int):
    def encode_batch(batch: dict) -> dict:
        report = EncodeReport()
        records = from_columns(batch)
        texts = [x for r in records for x in [r.prompt, *r.responses]]
        fast = Pretokenized(tokenizer, texts) if getattr(tokenizer, "is_fast", False) else tokenizer
        encoded = encode_records(fast, records, max_length, max_prompt_length, report=report)
        n, identical = len(encoded), set(report.identical)
        out = {
            "prompt_ids": [r.prompt_ids for r in encoded],
            "response_ids": [r.response_ids for r in encoded],
            "ranking": [r.ranking for r in encoded],
            "weight": [r.weight for r in encoded],
            "annotator": [r.annotator for r in encoded],
            "identical": [i in identical for i in range(n)],
        }
        for column in STATS:
            out[f"stats_{column}"] = [getattr(report, column)] + [0] * (n - 1)
        return out

    return encode_batch
