"""Image preference data for the diffusion methods: arrays, tables of images, or a world -> a dataset.

Arrays (`.npz` / `.safetensors`): `chosen`, `rejected` ([N, C, H, W] or [N, H, W]) as pixels in [0, 1], or,
for a pipeline with a VAE, as latents already encoded (C = the UNet's latent channels, values unbounded:
the VAE's latents times its scaling factor); the condition is `context` (integer class labels [N] or float
embeddings [N, L, D]) or `caption` (strings [N]). Tables (Pick-a-Pic layout, pairs, winners): see
`core/image_rows.py`. Every problem is a one-line `DataError` naming the file, the row and the field.

A dataset item is `{"index": i, "chosen": x, "rejected": x, "caption": str | "context": c, "time_ids": t}`
with images as pixels in [-1, 1] (or latents); `collate_images` stacks tensors (nested dicts included) and
keeps captions as a list. `core.conditioning.Conditioner` turns a batch into the UNet's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from prefalign.core import sources
from prefalign.core.data_files import FILE_TYPES, read_arrays
from prefalign.core.diffusion import map_cond
from prefalign.core.errors import ConfigError, DataError
from prefalign.core.image_rows import TableImages, read_image_table


def to_model_space(images01: torch.Tensor) -> torch.Tensor:
    """Pixels [0, 1] -> the [-1, 1] that pixel-space UNets and VAEs take."""
    return images01 * 2 - 1


def to_pixel_space(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- arrays


def _as_images(array, path, field_name, latent_channels: int | None = None) -> torch.Tensor:
    """Pixels in [0, 1] -> [-1, 1]; latents (C = `latent_channels`) are only checked to be finite."""
    x = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array, dtype=torch.float32)
    if x.dim() == 3:  # [N, H, W] -> one channel
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(
            f"{path}: field '{field_name}' must have shape [N, C, H, W] or [N, H, W], got {list(x.shape)}"
        )
    finite = torch.isfinite(x).flatten(1).all(1)
    if latent_channels is not None and x.shape[1] == latent_channels:
        if not finite.all():
            raise DataError(
                f"{path}: row {int((~finite).nonzero()[0])}, field '{field_name}': latents must be finite"
            )
        return x
    bad = ~finite | (x.flatten(1).amin(1) < 0) | (x.flatten(1).amax(1) > 1)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise DataError(f"{path}: row {row}, field '{field_name}': pixel values must be finite and in [0, 1]")
    return to_model_space(x)


def arrays_to_data(
    arrays: dict, path, need_rejected: bool = True, latent_channels: int | None = None
) -> dict:
    """Checked tensors from named arrays (see the module docstring)."""
    cond_field = "caption" if "caption" in arrays else "context"
    for name in ["chosen", cond_field] + (["rejected"] if need_rejected else []):
        if name not in arrays:
            raise DataError(f"{path}: missing field '{name}' (found {sorted(arrays)})")
    data = {"chosen": _as_images(arrays["chosen"], path, "chosen", latent_channels)}
    n = len(data["chosen"])
    if cond_field == "caption":
        captions = [str(c) for c in np.asarray(arrays["caption"]).tolist()]
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            raise DataError(f"{path}: row {empty[0]}, field 'caption': expected a non-empty caption")
        data["caption"] = captions
    else:
        context = torch.as_tensor(
            np.asarray(arrays["context"]) if not torch.is_tensor(arrays["context"]) else arrays["context"]
        )
        data["context"] = context.long() if not torch.is_floating_point(context) else context.float()
    if len(data[cond_field]) != n:
        raise DataError(f"{path}: field '{cond_field}' has {len(data[cond_field])} rows but 'chosen' has {n}")
    if need_rejected:
        data["rejected"] = _as_images(arrays["rejected"], path, "rejected", latent_channels)
        if data["rejected"].shape != data["chosen"].shape:
            raise DataError(
                f"{path}: 'rejected' shape {list(data['rejected'].shape)} != 'chosen' shape {list(data['chosen'].shape)}"
            )
    return data


def load_image_data_from_arrays(arrays: dict, path, need_rejected: bool = True) -> dict[str, torch.Tensor]:
    return arrays_to_data(arrays, path, need_rejected)


# ---------------------------------------------------------------- the dataset


def _row(value, i: int):
    if isinstance(value, dict):
        return {k: _row(v, i) for k, v in value.items()}
    return value[i]


class ImageDataset:
    """Rows of image data: a dict of equal-length columns (tensors, lists, nested dicts such as SDXL
    conditions). `images`, when given, decodes a row's image references (`core.image_rows.TableImages`)."""

    def __init__(self, data: dict, images=None):
        self.data, self.images = data, images

    def __len__(self):
        return len(self.data["chosen"])

    def __getitem__(self, i):
        item = {"index": i, **{k: _row(v, i) for k, v in self.data.items()}}
        return self.images(item) if self.images is not None else item


def data_row(data_cfg, dataset: ImageDataset, latents: bool) -> str:
    """The start block's `data` row of a diffusion run: source, rows, what conditions them, latents."""
    kind = "pairs (winner, loser)" if "rejected" in dataset.data else "winners"
    conditions = [name for name in ("caption", "label", "context") if name in dataset.data]
    condition = f"conditioned on {', '.join(conditions)}" if conditions else "unconditional"
    cached = "; VAE latents cached (data.latent_cache)" if latents else ""
    return f"{data_cfg.train}: {len(dataset)} {kind}, {condition}{cached}"


def collate_images(items: list[dict]) -> dict:
    """Stack tensors and numbers (nested dicts too); strings stay a list."""

    def join(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: join([v[k] for v in values]) for k in first}
        if isinstance(first, str):
            return list(values)
        return torch.stack([torch.as_tensor(v) for v in values])

    return {k: join([item[k] for item in items]) for k in items[0]}


def select_rows(batch: dict, index) -> dict:
    """Rows `index` of a collated batch (tensors, caption lists, nested dicts)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, list):
            out[key] = [value[int(i)] for i in index]
        else:
            out[key] = map_cond(lambda t: t[index.to(t.device) if torch.is_tensor(index) else index], value)
    return out


# ------------------------------------------------------------------------------ the `data:` config section


@dataclass
class ImageDataConfig:
    """`data:` of the diffusion methods."""

    # .npz/.safetensors arrays, a table (.parquet/.csv/.jsonl, a folder with one, a datasets folder or hub
    # name: Pick-a-Pic layout, pairs or winners), or a world source (world:digits-judge, world:digits-text-judge)
    train: str = ""
    eval: str | None = None  # held-out pairs for `prefalign eval` (default: the training pairs, said so)
    split: str = "train"  # datasets folders and hub names
    columns: dict[str, str] = field(
        default_factory=dict
    )  # your column -> ours: {image_0: jpg_0, text: caption}
    tie_policy: Literal["error", "skip"] = "error"  # Pick-a-Pic ties (label_0 = 0.5): skip = drop, counted
    resolution: int | None = None  # tables: images resized + centre-cropped to this; default the model's
    caption_dropout: float = 0.0  # fraction of training captions replaced by "" (the official recipe: 0.2)
    latent_cache: bool = False  # encode every image with the VAE once (stored under cache_dir, keyed)
    cache_dir: str | None = (
        None  # default: the shared data cache's latents/ (built once, reused by every run)
    )
    n_pairs: int = 1000  # world sources: how many pairs to make
    sample_steps: int = 20  # world sources: sampler steps of the base model
    eval_samples_per_class: int = 0  # > 0 with a world base: its evaluator scores samples during training

    def validate(self):
        if not self.train:
            raise ConfigError(
                "config key 'data.train' is empty: name a pairs file, an image table or world:NAME"
            )
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(
                f"config key 'data.caption_dropout' must be in [0, 1), got {self.caption_dropout}"
            )


def _is_arrays(path: Path) -> bool:
    return path.suffix in (".npz", ".safetensors")


def load_image_data(
    path, need_rejected: bool = True, parts=None, data: ImageDataConfig | None = None
) -> ImageDataset:
    """The dataset of `path` (arrays or a table) for the model `parts` (None: pixel arrays or a class-label
    table, images kept at their size). Nothing is decoded beyond the checks; table images decode on access."""
    data = data or ImageDataConfig(train=str(path))
    conditioning = parts.conditioning if parts is not None else "class"
    path_obj = Path(str(path)).expanduser()
    if _is_arrays(path_obj):
        latent = parts.unet.config.in_channels if parts is not None and parts.vae is not None else None
        arrays = arrays_to_data(read_arrays(path_obj, "image data file"), path, need_rejected, latent)
        _check_condition(arrays, conditioning, path)
        return ImageDataset(arrays)
    if path_obj.suffix and path_obj.suffix not in FILE_TYPES and not path_obj.is_dir():
        raise DataError(
            f"{path}: expected arrays (.npz, .safetensors), a table ({', '.join(FILE_TYPES)}) or a folder"
        )
    if conditioning == "embedding":
        raise DataError(f"{path}: this UNet takes embeddings, which only arrays (field 'context') can hold")
    n_classes = getattr(parts.unet.config, "num_class_embeds", None) if parts is not None else None
    table = read_image_table(
        path, conditioning, need_rejected, split=data.split, columns=data.columns,
        tie_policy=data.tie_policy, n_classes=n_classes,
    )  # fmt: skip
    columns = {"chosen": table.chosen}
    if need_rejected:
        columns["rejected"] = table.rejected
    if table.captions is not None:
        columns["caption"] = table.captions
    else:
        columns["context"] = torch.tensor(table.labels, dtype=torch.long)
    channels = parts.image_channels if parts is not None else None
    resolution = (data.resolution or parts.resolution) if parts is not None else None
    return ImageDataset(columns, TableImages(table, channels, resolution))


def _check_condition(data: dict, conditioning: str, path) -> None:
    has_caption = "caption" in data
    if conditioning in ("text", "sdxl") and not has_caption:
        context = data["context"]
        if conditioning == "sdxl" or not torch.is_floating_point(context) or context.dim() != 3:
            raise DataError(
                f"{path}: field 'context': the model is a text-conditioned pipeline; give captions (field "
                "'caption')" + ("" if conditioning == "sdxl" else " or text embeddings [N, L, D]")
            )
    if conditioning in ("class", "embedding") and has_caption:
        raise DataError(f"{path}: field 'caption': the model has no text encoder (give 'context' instead)")
    if conditioning == "class" and not has_caption and torch.is_floating_point(data["context"]):
        raise DataError(f"{path}: field 'context': the UNet is class-conditional; expected integer labels")


def load_image_pairs(data: ImageDataConfig, parts, seed: int, out_dir: Path | None, need_rejected=True):
    """The dataset of `data.train`: a file, table or folder, or pairs made by a world source from the base
    model (saved to `out_dir/pairs.npz` for inspection and reuse)."""
    if not sources.is_source(data.train):
        return load_image_data(data.train, need_rejected, parts, data)
    arrays = sources.get(data.train, "pairs", "data.train").load(
        parts, n_pairs=data.n_pairs, sample_steps=data.sample_steps, seed=seed
    )
    if out_dir is not None:
        path = Path(out_dir) / "pairs.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        return load_image_data(path, need_rejected, parts, data)
    checked = arrays_to_data(arrays, data.train, need_rejected)
    _check_condition(checked, parts.conditioning, data.train)
    return ImageDataset(checked)


def evaluation_pairs(data: ImageDataConfig, run_dir: Path, parts, need_rejected: bool = True):
    """(name, dataset) of the pairs `prefalign eval` scores: `data.eval`, else the training pairs (a file, or
    the `pairs.npz` a world source wrote into the run directory)."""
    if data.eval:
        return "eval", load_image_data(data.eval, need_rejected, parts, data)
    path = Path(run_dir) / "pairs.npz" if sources.is_source(data.train) else data.train
    return "train_pairs", load_image_data(path, need_rejected, parts, data)
