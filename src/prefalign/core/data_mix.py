"""Several training sources as one set: `data.train: [a.jsonl, {path: b.jsonl, weight: 3}]`.

Without weights every record of every source is used once. With weights, each source makes up its share
w_i / Σw of a mixture as large as the sources together (`mix_records`); the console and `.mixture` of the
loaded records say how many records each source had and gave. Each source is split into train/eval
before mixing (`core.data.load_records`), so a repeated record never lands in both.
"""

from __future__ import annotations

import math
import numbers
import random
from pathlib import Path
from typing import NamedTuple

from prefalign.core.data_files import looks_like_hub_name, short_repr
from prefalign.core.errors import ConfigError


class TrainSource(NamedTuple):
    path: str
    weight: float | None
    hub: dict  # `datasets.load_dataset` options of a hub source: name, revision, split, streaming


SOURCE_KEYS = {"path", "weight", "name", "revision", "split", "streaming"}


def train_sources(train) -> list[TrainSource]:
    """`data.train` as [TrainSource]: a string, or a list of strings / {path, weight, name, revision, split,
    streaming} items (the last four: a hub dataset's configuration, revision, split and streaming)."""
    if isinstance(train, str):
        return [TrainSource(train, None, {})]
    items: list[TrainSource] = []
    for i, item in enumerate(train):
        key = f"config key 'data.train[{i}]'"
        if isinstance(item, str) and item:
            items.append(TrainSource(item, None, {}))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - SOURCE_KEYS:
            raise ConfigError(
                f"{key}: expected a file name or {{path: FILE, weight: NUMBER}} (a hub dataset may add name, "
                f"revision, split, streaming), got {short_repr(item)}"
            )
        weight = item.get("weight")
        good = isinstance(weight, numbers.Real) and not isinstance(weight, bool) and math.isfinite(weight)
        if weight is not None and not (good and weight > 0):
            raise ConfigError(f"{key}: weight must be a number > 0, got {short_repr(weight)}")
        hub = {k: item[k] for k in ("name", "revision", "split", "streaming") if item.get(k) is not None}
        for k in ("name", "revision", "split"):
            if k in hub and not isinstance(hub[k], str):
                raise ConfigError(f"{key}: {k} must be a string, got {short_repr(hub[k])}")
        if not isinstance(hub.get("streaming", False), bool):
            raise ConfigError(f"{key}: streaming must be true or false, got {short_repr(hub['streaming'])}")
        if hub and not looks_like_hub_name(item["path"]):
            raise ConfigError(
                f"{key}: {', '.join(sorted(hub))} apply to hub datasets; {item['path']!r} is not one"
            )
        items.append(TrainSource(item["path"], None if weight is None else float(weight), hub))
    if not items:
        raise ConfigError("config key 'data.train' is an empty list: name at least one source")
    weighted = [w is not None for _, w, _ in items]
    if any(weighted) and not all(weighted):
        raise ConfigError(
            "config key 'data.train': give every source a weight, or none (all records of each)"
        )
    return items


def mix_records(parts: list[list], weights: list[float | None], seed: int) -> tuple[list, list[int]]:
    """(records, how many each source gave): the records of `mix_indices`."""
    chosen, targets = mix_indices([len(p) for p in parts], weights, seed)
    return [part[i] for part, rows in zip(parts, chosen) for i in rows], targets


def mix_indices(
    sizes: list[int], weights: list[float | None], seed: int
) -> tuple[list[list[int]], list[int]]:
    """(for each part the indices of its records in the mixture, how many each part gave). Without weights:
    every record of each part, in order. With weights: N = the parts' total size, and part i gives
    round(N · w_i / Σw) records (largest remainders, so the counts add up to N): fewer than it has -> a seeded
    random subset, in order; more -> all its records k times, then a seeded subset for the rest."""
    total = sum(sizes)
    if all(w is None for w in weights):
        targets = list(sizes)
    else:
        exact = [total * w / sum(weights) for w in weights]
        targets = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(sizes)), key=lambda i: targets[i] - exact[i])  # stable: ties in order
        for i in by_remainder[: total - sum(targets)]:
            targets[i] += 1
    rng = random.Random(seed)
    chosen = []
    for size, k in zip(sizes, targets):
        repeats, rest = divmod(k, size)
        chosen.append(list(range(size)) * repeats + sorted(rng.sample(range(size), rest)))
    return chosen, targets


def check_sources_exist(data) -> None:
    """Before any work: every local file or folder named by `data.train` / `data.eval` exists, else a
    ConfigError naming the key. Registered sources (`world:...`), hub names (`owner/name`, `hf://...`) and
    in-memory data (an empty key) are left to their loaders."""
    for key in ("train", "eval"):
        value = getattr(data, key, None)
        if not value:
            continue
        for i, (source, *_) in enumerate(train_sources(value) if key == "train" else [(value, None)]):
            if not isinstance(source, str) or source.startswith("world:") or looks_like_hub_name(source):
                continue
            if not Path(source).expanduser().exists():
                where = f"data.{key}" + (f"[{i}]" if isinstance(value, list) else "")
                raise ConfigError(f"config key '{where}': file not found: {source}")
