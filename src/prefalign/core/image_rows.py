"""Tables of image preferences (Pick-a-Pic and friends) -> validated rows whose images are decoded lazily.

Accepted row layouts (after `data.columns` renames your column names to these):
  caption, jpg_0, jpg_1, label_0     Pick-a-Pic v2: label_0 = 1 -> image 0 won, 0 -> image 1 won, 0.5 -> a tie
  chosen, rejected (+ condition)     prefalign's pairs (the old `pairs.csv` of an image folder)
  image (or chosen) (+ condition)    winners only, for SSPO (which also takes the winner of any pair layout)
The condition is `caption` (or `prompt`, or a text `label`) for a text-conditioned pipeline, an integer `label`
for a class-conditional UNet. An image is a file path (relative to the table's folder), encoded bytes
(parquet / `datasets` binary columns), `{"bytes", "path"}` (a `datasets` Image column) or a PIL image.

Sources: a .csv/.parquet/.jsonl/.json file, a folder holding one of INDEX_FILES (its images beside it), a
`datasets` `save_to_disk` folder, or a hub dataset name. Every problem is one `DataError` line naming the
source, the row (CSV: the line of the file, header = line 1, as a spreadsheet shows it; other sources: the
row index from 0) and the field. Ties follow `tie_policy` (`error`, or `skip`: dropped and counted).
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prefalign.core.data_files import read_rows, short_repr
from prefalign.core.errors import DataError

logger = logging.getLogger(__name__)

INDEX_FILES = ("pairs.csv", "train.csv", "metadata.csv", "pairs.parquet", "train.parquet", "metadata.jsonl")
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
LAYOUTS = "caption/jpg_0/jpg_1/label_0 (Pick-a-Pic), chosen/rejected (+ caption or label), image (+ caption or label)"


@dataclass
class ImageTable:
    """Validated rows: image references (decoded on access), conditions, and where each row came from."""

    source: str
    folder: Path  # relative image paths are read from here
    chosen: list
    rejected: list | None
    captions: list[str] | None
    labels: list[int] | None
    rows: list[int]  # the row number each kept row is reported under
    skipped: dict[str, int] = field(default_factory=dict)
    columns: list[tuple] = field(default_factory=list)  # per row: the fields its (winner, loser) came from


def _where(name: str, row: int, column: str) -> str:
    return f"{name}: row {row}, field '{column}'"


def _read(source, split: str) -> tuple[str, list, Path, bool]:
    """(name, rows, folder of relative image paths, is_csv)."""
    path = Path(source).expanduser()
    if path.is_dir() and not any(
        (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        found = [path / f for f in INDEX_FILES if (path / f).is_file()]
        if not found:
            raise DataError(f"{path}: an image folder needs an index file: one of {', '.join(INDEX_FILES)}")
        path = found[0]
    name, rows = read_rows(str(path) if path.exists() else source, split)
    folder = path.parent if path.is_file() else path
    return name, rows, folder, path.suffix.lower() == ".csv"


def _rename(row: dict, columns: dict) -> dict:
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns}
    for old, new in columns.items():
        if old in row:
            out[new] = row[old]
    return out


def _present(row: dict, key: str) -> bool:
    value = row.get(key)
    return value is not None and not (isinstance(value, str) and value == "")


def _preference(value, where: str) -> float:
    """label_0 as 1.0 (image 0 won), 0.0 (image 1 won) or 0.5 (a tie)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if number not in (0.0, 0.5, 1.0):
        raise DataError(
            f"{where}: expected 1 (image 0 won), 0 (image 1 won) or 0.5 (a tie), got {short_repr(value)}"
        )
    return number


def _image_ref(value, where: str, folder: Path):
    if isinstance(value, dict):  # a datasets Image column: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) or isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)) and str(value).strip():
        file = folder / str(value).strip()
        if not file.is_file():
            raise DataError(f"{where}: no image file {file}")
        return file
    raise DataError(
        f"{where}: expected an image (a file path, encoded bytes or a PIL image), got {short_repr(value)}"
    )


def read_image_table(
    source, conditioning: str, need_rejected: bool = True, *, split: str = "train", columns: dict | None = None,
    tie_policy: str = "error", n_classes: int | None = None,
) -> ImageTable:  # fmt: skip
    """Rows of `source` checked field by field (images only for presence; they are decoded on access).
    `conditioning`: "text"/"sdxl" (captions) or "class" (integer labels, < `n_classes` when known)."""
    name, raw_rows, folder, is_csv = _read(source, split)
    if not raw_rows:
        raise DataError(f"{name} has no rows")
    chosen, rejected, captions, labels, kept = [], [], [], [], []
    skipped: Counter = Counter()
    image_columns = []
    for i, raw in enumerate(raw_rows):
        number = i + 2 if is_csv else i
        if not isinstance(raw, dict):
            raise DataError(
                f"{name}: row {number}: expected an object with named fields, got {type(raw).__name__}"
            )
        row = _rename(raw, columns or {})
        where = lambda column, number=number: _where(name, number, column)  # noqa: E731
        if _present(row, "jpg_0") or _present(row, "jpg_1") or _present(row, "label_0"):
            for column in ("jpg_0", "jpg_1", "label_0"):
                if not _present(row, column):
                    raise DataError(
                        f"{where(column)}: missing (the Pick-a-Pic layout needs jpg_0, jpg_1, label_0)"
                    )
            won = _preference(row["label_0"], where("label_0"))
            if won == 0.5:
                if tie_policy == "skip":
                    skipped["tie"] += 1
                    continue
                raise DataError(
                    f"{where('label_0')}: a tie (0.5); set data.tie_policy: skip to drop ties (they are counted)"
                )
            order = ("jpg_0", "jpg_1") if won == 1.0 else ("jpg_1", "jpg_0")
        elif _present(row, "chosen") and (_present(row, "rejected") or not need_rejected):
            order = ("chosen", "rejected")
        elif _present(row, "image") and not need_rejected:
            order = ("image", None)
        else:
            got = ", ".join(sorted(map(str, row))) or "none"
            needed = LAYOUTS if not need_rejected else LAYOUTS.rsplit(", image", 1)[0]
            raise DataError(f"{name}: row {number}: no image columns I know (got: {got}); accepted: {needed}")
        image_columns.append(order)
        chosen.append(_image_ref(row[order[0]], where(order[0]), folder))
        if need_rejected:
            rejected.append(_image_ref(row[order[1]], where(order[1]), folder))
        if conditioning == "class":
            labels.append(_class_label(row, where, n_classes))
        else:
            captions.append(_caption(row, where))
        kept.append(number)
    if not kept:
        raise DataError(f"no usable rows in {name} ({len(raw_rows)} rows; skipped: {dict(skipped)})")
    if skipped:
        logger.warning(f"{name}: loaded {len(kept)} of {len(raw_rows)} rows; skipped {dict(skipped)}")
    return ImageTable(
        name, folder, chosen, rejected if need_rejected else None, None if conditioning == "class" else captions,
        labels if conditioning == "class" else None, kept, dict(skipped), image_columns,
    )  # fmt: skip


def _caption(row: dict, where) -> str:
    for column in ("caption", "prompt", "label"):
        if column in row and row[column] is not None:
            value = row[column]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where(column)}: expected a non-empty caption, got {short_repr(value)}")
            return value
    raise DataError(
        f"{where('caption')}: missing (the model is text-conditioned: give a caption or prompt column)"
    )


def _class_label(row: dict, where, n_classes: int | None) -> int:
    if not _present(row, "label"):
        raise DataError(f"{where('label')}: missing (the model is class-conditional: give an integer label)")
    value = row["label"]
    try:
        label = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        label = None
    if label is None or isinstance(value, bool):
        raise DataError(f"{where('label')}: expected an integer class label, got {short_repr(value)}")
    if label < 0 or (n_classes is not None and label >= n_classes):
        raise DataError(
            f"{where('label')}: class {label} out of range; the UNet has classes 0..{n_classes - 1}"
        )
    return label


# ---------------------------------------------------------------- decoding, resizing, cropping


def open_image(ref, where: str) -> Image.Image:
    try:
        if isinstance(ref, Image.Image):
            image = ref
        elif isinstance(ref, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(ref)))
        else:
            image = Image.open(ref)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable image ({str(e).splitlines()[0]})") from None


def prepare_image(image: Image.Image, channels: int | None, resolution: int | None, where: str):
    """-> (pixels [C, R, R] in [-1, 1], original (height, width), crop (top, left)).

    The image is converted to the model's channels (RGB stays RGB), its shorter side resized to `resolution`
    (bilinear) and the centre cut out, as the reference training scripts do (torchvision Resize + CenterCrop).
    `resolution` None: kept as it is."""
    if channels is None:  # no model to ask: grayscale stays grayscale, everything else becomes RGB
        channels = 1 if image.mode in ("1", "L", "I", "F") else 3
    if channels not in IMAGE_MODES:
        raise DataError(
            f"{where}: the model takes {channels}-channel images; only 1, 3 or 4 can be read from files"
        )
    image = image.convert(IMAGE_MODES[channels])
    original = (image.height, image.width)
    top = left = 0
    if resolution is not None:
        scale = resolution / min(image.width, image.height)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        top = int(round((image.height - resolution) / 2.0))
        left = int(round((image.width - resolution) / 2.0))
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[:, :, None] if array.ndim == 2 else array
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1) * 2 - 1
    return pixels, original, (top, left)


class TableImages:
    """Decodes a table row's images for `ImageDataset`: pixels in [-1, 1] at the model's resolution, and the
    SDXL size conditioning of the winner image (original height, width, crop top, left, target height, width)."""

    def __init__(self, table: ImageTable, channels: int, resolution: int | None):
        self.table, self.channels, self.resolution = table, channels, resolution

    def __call__(self, item: dict) -> dict:
        i = item["index"]
        row = self.table.rows[i]
        for key, column in zip(("chosen", "rejected"), self.table.columns[i]):
            if key not in item:
                continue
            where = _where(self.table.source, row, column)
            pixels, original, crop = prepare_image(
                open_image(item[key], where), self.channels, self.resolution, where
            )
            if key == "chosen":
                size = pixels.shape[-2:]
                item["time_ids"] = torch.tensor([*original, *crop, *size], dtype=torch.float32)
            elif pixels.shape != item["chosen"].shape:
                raise DataError(
                    f"{where}: image of shape {list(pixels.shape)} but the winner's is {list(item['chosen'].shape)} (set data.resolution)"
                )
            item[key] = pixels
        return item
