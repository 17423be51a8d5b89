"""Reading preference rows and vector arrays from files, saved/hub `datasets` and memory.

Rows (`read_rows`) feed `data.load_preferences`, which validates them; arrays (`read_arrays`) are the vector
data of PFM and the diffusion recipes (`chosen`, `rejected`, optional `context` in `.npz`/`.safetensors`).
Every problem is a one-line `DataError` naming the source.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from prefalign.core.errors import DataError

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")


class Rows(list):
    """Rows read from a text file, with `lines`: the 1-based line of the file each row starts on."""

    lines: list[int] | None = None


def with_lines(rows: list, lines: list[int] | None) -> Rows:
    out = Rows(rows)
    out.lines = lines if lines is not None and len(lines) == len(rows) else None
    return out


class RowError(DataError):
    """A row-level problem raised before the source and row are known; `records.located_error` adds them."""

    def __init__(self, field: str, reason: str, expected: str):
        super().__init__(f"field '{field}': {expected}", field=field, reason=reason)
        self.expected = expected


def short_repr(value, limit: int = 80) -> str:
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


_Bad, _short = RowError, short_repr


def decode_csv_cells(row: dict) -> dict:
    """CSV cells are strings: empty = absent, lists (responses, ranking, scores, chat messages) are JSON."""
    out = {}
    for key, value in row.items():
        if not isinstance(value, str) or value == "":
            continue
        if key in ("responses", "ranking", "scores"):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                raise _Bad(key, "invalid JSON", f"expected a JSON list, got {_short(value)}") from None
        elif key in ("prompt", "chosen", "rejected") and value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            is_messages = isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed)
            out[key] = parsed if is_messages else value  # text that merely starts with "[" stays text
        elif key == "weight":
            try:
                out[key] = float(value)
            except ValueError:
                raise _Bad("weight", "bad weight", f"expected a number > 0, got {_short(value)}") from None
        else:
            out[key] = value
    return out


def _read_json(path: Path, name: str) -> list:
    if path.suffix in (".jsonl", ".ndjson"):
        rows, lines = [], []
        for row, line in iter_jsonl(path, name):
            rows.append(row)
            lines.append(line)
        return with_lines(rows, lines)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})", source=name) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    if not isinstance(data, list):
        raise DataError(f'{name}: expected a list of objects or {{"data": [...]}}, got {type(data).__name__}')
    return data


def iter_jsonl(path: Path, name: str):
    """(row, 1-based line) of each non-blank line of a JSON Lines file, read line by line (memory does not grow
    with the file); a line that is not valid JSON gives a `RowError` in place of its row."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{e.reason} at byte {offset + e.start}"
                raise DataError(f"{name}: not UTF-8 text ({where})", source=name) from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark is not part of the first row
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield json.loads(line), number
            except json.JSONDecodeError as e:
                yield _Bad("row", "invalid JSON", f"not valid JSON ({e.msg} at column {e.colno})"), number


def _read_file(path: Path, name: str) -> list:
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"{name}: unsupported file type '{suffix}'; expected {', '.join(FILE_TYPES)}, a dir")
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_json(path, name)
    if suffix == ".parquet":
        import pyarrow.parquet  # lazy, like pandas and datasets below: loaded only for that kind of source

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{name}: not a readable parquet file ({e})", source=name) from None
    import pandas

    try:  # every cell as a string: no NaN for empty cells, no int/float guessing
        rows = pandas.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
        return with_lines(rows, _csv_lines(path))
    except pandas.errors.EmptyDataError:
        return []
    except (pandas.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: not a readable CSV file ({str(e).strip()})", source=name) from None


def _csv_lines(path: Path) -> list[int] | None:
    """The 1-based file line each CSV data row starts on (quoted cells may span lines; the header is line 1);
    None when the csv module reads the file differently from pandas."""
    import csv

    lines, previous_end, header = [], 0, False
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                if row and (len(row) > 1 or row[0].strip()):  # pandas skips blank lines
                    if header:
                        lines.append(previous_end + 1)
                    header = True
                previous_end = reader.line_num
    except (csv.Error, UnicodeDecodeError):
        return None
    return lines


EVAL_SPLITS = ("test", "validation")  # a DatasetDict's held-out splits, by name (TRL's eval split is "test")


def held_out_split(source) -> str | None:
    """The held-out split (`test`, else `validation`) of a saved DatasetDict folder or an in-memory
    DatasetDict, else None (a file, a single Dataset, a hub name)."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        names = list(source.keys())
    elif isinstance(source, (str, Path)) and (Path(source) / "dataset_dict.json").is_file():
        try:
            names = json.loads((Path(source) / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError):
            return None
    else:
        return None
    return next((name for name in EVAL_SPLITS if name in names), None)


def looks_like_hub_name(text: str) -> bool:
    if text.startswith("hf://"):
        return True
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and Path(text).suffix.lower() not in FILE_TYPES


def read_rows(source, split: str, hub: dict | None = None) -> tuple[str, list]:
    """(name, rows) of a source, all in memory (`Rows` with `.lines` for JSONL/CSV files)."""
    name, rows = iter_rows(source, split, hub)
    pairs = list(rows)
    lines = [line for _, line in pairs]
    out = with_lines([row for row, _ in pairs], lines if lines and None not in lines else None)
    return name, out


HUB_KEYS = ("name", "revision", "streaming")  # `datasets.load_dataset` options a hub source may set


def iter_rows(source, split: str, hub: dict | None = None):
    """(name, iterator of (row, 1-based file line or None)): the rows of a source, read lazily where the format
    allows (JSONL line by line, parquet by record batch, datasets by Arrow batch, a streamed hub dataset row by
    row); a .json file and a CSV are read whole. `hub`: `name` (the dataset's configuration), `revision`,
    `streaming` for `datasets.load_dataset`."""
    if isinstance(source, (list, tuple)):  # PreferenceRecords too
        return "<list>", ((r.to_dict() if hasattr(r, "to_dict") else r, None) for r in source)
    datasets = sys.modules.get("datasets")  # an in-memory Dataset means the library is already imported
    if datasets is not None and isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return "<Dataset>", _dataset_iter(source, split, "<Dataset>")
    if not isinstance(source, (str, Path)):
        raise DataError(f"unsupported source {type(source).__name__}; expected a path, name, list or Dataset")
    path, name = Path(source), str(source)
    if path.is_dir():
        loaded = load_saved(path, name)
        dataset_dict = isinstance(loaded, sys.modules["datasets"].DatasetDict)
        return (f"{name}[{split}]" if dataset_dict else name), _dataset_iter(
            loaded, split, name
        )  # split named
    if path.is_file():
        return name, _file_iter(path, name)
    if isinstance(source, str) and looks_like_hub_name(source):
        return source, _dataset_iter(load_hub(source, split, hub), split, source)
    raise DataError(f"file not found: {name}", source=name)


def load_saved(path: Path, name: str):
    import datasets  # lazy, like pyarrow and pandas: loaded only for that kind of source

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{name}: a directory not written by datasets' save_to_disk ({e})") from None


def load_hub(source: str, split: str, hub: dict | None = None):
    """`datasets.load_dataset` of a hub name (`hf://owner/name` or `owner/name`) and `split`, with the `hub`
    options that are set; streaming gives an `IterableDataset`."""
    import datasets

    options = {k: v for k, v in (hub or {}).items() if k in HUB_KEYS and v not in (None, False)}
    try:
        return datasets.load_dataset(source.removeprefix("hf://"), split=split, **options)
    except Exception as e:  # network, missing dataset, missing split: all end the same way for the user
        raise DataError(f"{source}: no such local path, and loading from the hub failed: {e}") from None


def _dataset_iter(dataset, split: str, name: str):
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DataError(f"{name}: no split '{split}' (available: {', '.join(dataset.keys())})")
        dataset = dataset[split]
    return _batches_iter(dataset)


def _batches_iter(dataset):
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        for row in dataset:
            yield row, None
        return
    for batch in dataset.iter(batch_size=1000):
        for values in zip(*batch.values()):
            yield dict(zip(batch, values)), None


def _file_iter(path: Path, name: str):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from iter_jsonl(path, name)
    elif suffix == ".parquet":
        import pyarrow.parquet

        try:
            for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=10_000):
                for row in batch.to_pylist():
                    yield row, None
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{name}: not a readable parquet file ({e})", source=name) from None
    else:
        rows = _read_file(path, name)
        lines = getattr(rows, "lines", None)
        for i, row in enumerate(rows):
            yield row, lines[i] if lines else None


def read_arrays(path, what: str = "data file") -> dict:
    """Named arrays of a `.npz` (numpy, no pickles) or `.safetensors` (torch) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    raise DataError(f"{path}: expected a .npz or .safetensors file")
