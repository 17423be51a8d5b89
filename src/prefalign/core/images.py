"""Image preference data for the diffusion methods: arrays or image folders -> tensors in the model's [-1, 1].

Sources: `.npz` / `.safetensors` with arrays `chosen`, `rejected` (pixels in [0, 1], [N, C, H, W] or [N, H, W])
and `context` (int class labels [N] or float embeddings [N, L, D]); or a folder with `pairs.csv` (columns
chosen, rejected, label; image paths relative to the folder). Every problem is a one-line `DataError`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prefalign.core import sources
from prefalign.core.data_files import read_arrays
from prefalign.core.errors import ConfigError, DataError


def to_model_space(images01: torch.Tensor) -> torch.Tensor:
    """Digits world pixels [0, 1] -> the DDPM's [-1, 1]."""
    return images01 * 2 - 1


def to_pixel_space(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def _as_images(array, path, field_name) -> torch.Tensor:
    x = torch.as_tensor(array, dtype=torch.float32)
    if x.dim() == 3:  # [N, H, W] -> one channel
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(
            f"{path}: field '{field_name}' must have shape [N, C, H, W] or [N, H, W], got {list(x.shape)}"
        )
    bad = ~torch.isfinite(x).flatten(1).all(1) | (x.flatten(1).amin(1) < 0) | (x.flatten(1).amax(1) > 1)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise DataError(f"{path}: row {row}, field '{field_name}': pixel values must be finite and in [0, 1]")
    return x


def load_image_data(path: str | Path, need_rejected: bool = True) -> dict[str, torch.Tensor]:
    """Images with a condition from `.npz`/`.safetensors` (arrays `chosen`, `rejected`, `context` = int class
    labels or float embeddings) or from a folder with `pairs.csv` (columns chosen, rejected, label; image
    paths relative to the folder). Pixels in [0, 1]; returns chosen/rejected in the model's [-1, 1]."""
    path = Path(path)
    if path.is_dir():
        arrays = _load_image_folder(path, need_rejected)
    else:
        arrays = read_arrays(path, "image data file")
    return load_image_data_from_arrays(arrays, path, need_rejected)


def load_image_data_from_arrays(arrays: dict, path, need_rejected: bool = True) -> dict[str, torch.Tensor]:
    fields = ["chosen", "context"] + (["rejected"] if need_rejected else [])
    for name in fields:
        if name not in arrays:
            raise DataError(f"{path}: missing field '{name}' (found {sorted(arrays)})")
    data = {"chosen": to_model_space(_as_images(arrays["chosen"], path, "chosen"))}
    context = torch.as_tensor(arrays["context"])
    data["context"] = context.long() if not torch.is_floating_point(context) else context.float()
    if len(context) != len(data["chosen"]):
        raise DataError(
            f"{path}: field 'context' has {len(context)} rows but 'chosen' has {len(data['chosen'])}"
        )
    if need_rejected:
        data["rejected"] = to_model_space(_as_images(arrays["rejected"], path, "rejected"))
        if data["rejected"].shape != data["chosen"].shape:
            raise DataError(
                f"{path}: 'rejected' shape {list(data['rejected'].shape)} != 'chosen' shape {list(data['chosen'].shape)}"
            )
    return data


def _load_image_folder(folder: Path, need_rejected: bool) -> dict:
    table = folder / "pairs.csv"
    if not table.is_file():
        raise DataError(f"{folder}: an image folder needs pairs.csv (columns chosen, rejected, label)")
    columns = ["chosen", "label"] + (["rejected"] if need_rejected else [])
    out = {c: [] for c in columns}
    with open(table, newline="") as fh:
        for row_number, row in enumerate(csv.DictReader(fh), start=2):
            for column in columns:
                if not row.get(column):
                    raise DataError(f"{table}: row {row_number}, field '{column}': missing value")
            for column in set(columns) - {"label"}:
                file = folder / row[column]
                if not file.is_file():
                    raise DataError(f"{table}: row {row_number}, field '{column}': no image {file}")
                image = np.asarray(Image.open(file).convert("L"), dtype=np.float32) / 255.0
                out[column].append(image)
            try:
                out["label"].append(int(row["label"]))
            except ValueError:
                raise DataError(
                    f"{table}: row {row_number}, field 'label': expected an integer, got {row['label']!r}"
                ) from None
    arrays = {c: np.stack(out[c]) for c in columns if c != "label"}
    arrays["context"] = np.asarray(out["label"], dtype=np.int64)
    return arrays


class ImageDataset:
    """Rows of `load_image_data`; each item is a dict with its row `index` (SSPO caches per row)."""

    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def __len__(self):
        return len(self.data["chosen"])

    def __getitem__(self, i):
        return {"index": i, **{k: v[i] for k, v in self.data.items()}}


def collate_images(items: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}


# ---------------------------------------------------------------- AI feedback on the digits world


# ------------------------------------------------------------------------------ the `data:` config section


@dataclass
class ImageDataConfig:
    """`data:` of the diffusion methods."""

    # .npz/.safetensors (chosen, rejected, context), an image folder with pairs.csv, or a world source
    train: str = ""
    eval: str | None = None  # held-out pairs for `prefalign eval` (default: the training pairs, said so)
    n_pairs: int = 1000  # world sources: how many pairs to make
    sample_steps: int = 20  # world sources: sampler steps of the base model
    eval_samples_per_class: int = 0  # > 0 with a world base: its evaluator scores samples during training

    def validate(self):
        if not self.train:
            raise ConfigError(
                "config key 'data.train' is empty: name a pairs file, an image folder or world:NAME"
            )


def load_image_pairs(
    data: ImageDataConfig, unet, scheduler, seed: int, out_dir: Path | None, need_rejected=True
):
    """Pairs from `data.train`: a file or folder, or made by a world source from the base model (then saved
    to `out_dir/pairs.npz` for inspection and reuse)."""
    if not sources.is_source(data.train):
        return load_image_data(data.train, need_rejected=need_rejected)
    arrays = sources.get(data.train, "pairs", "data.train").load(
        unet, scheduler, n_pairs=data.n_pairs, sample_steps=data.sample_steps, seed=seed
    )
    if out_dir is None:
        return load_image_data_from_arrays(arrays, data.train, need_rejected)
    path = Path(out_dir) / "pairs.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return load_image_data(path, need_rejected=need_rejected)


def evaluation_pairs(data: ImageDataConfig, run_dir: Path, need_rejected: bool = True):
    """(name, arrays) of the pairs `prefalign eval` scores: `data.eval`, else the training pairs (a file, or
    the `pairs.npz` a world source wrote into the run directory)."""
    if data.eval:
        return "eval", load_image_data(data.eval, need_rejected)
    path = Path(run_dir) / "pairs.npz" if sources.is_source(data.train) else Path(data.train)
    return "train_pairs", load_image_data(path, need_rejected)
