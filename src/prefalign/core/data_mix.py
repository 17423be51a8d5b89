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

from prefalign.core.data_files import looks_like_hub_name, short_repr
from prefalign.core.errors import ConfigError


def train_sources(train) -> list[tuple[str, float | None]]:
    """`data.train` as [(path, weight or None)]: a string, or a list of strings / {path, weight} items."""
    if isinstance(train, str):
        return [(train, None)]
    items: list[tuple[str, float | None]] = []
    for i, item in enumerate(train):
        key = f"config key 'data.train[{i}]'"
        if isinstance(item, str) and item:
            items.append((item, None))
            continue
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("path"), str)
            or set(item) - {"path", "weight"}
        ):
            raise ConfigError(
                f"{key}: expected a file name or {{path: FILE, weight: NUMBER}}, got {short_repr(item)}"
            )
        weight = item.get("weight")
        good = isinstance(weight, numbers.Real) and not isinstance(weight, bool) and math.isfinite(weight)
        if weight is not None and not (good and weight > 0):
            raise ConfigError(f"{key}: weight must be a number > 0, got {short_repr(weight)}")
        items.append((item["path"], None if weight is None else float(weight)))
    if not items:
        raise ConfigError("config key 'data.train' is an empty list: name at least one source")
    weighted = [w is not None for _, w in items]
    if any(weighted) and not all(weighted):
        raise ConfigError(
            "config key 'data.train': give every source a weight, or none (all records of each)"
        )
    return items


def mix_records(parts: list[list], weights: list[float | None], seed: int) -> tuple[list, list[int]]:
    """(records, how many each source gave). Without weights: every record of each part, in order.
    With weights: N = the parts' total size, and part i gives round(N · w_i / Σw) records (largest
    remainders, so the counts add up to N): fewer than it has -> a seeded random subset, in order; more ->
    all its records k times, then a seeded subset for the rest."""
    total = sum(len(p) for p in parts)
    if all(w is None for w in weights):
        targets = [len(p) for p in parts]
    else:
        exact = [total * w / sum(weights) for w in weights]
        targets = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(parts)), key=lambda i: targets[i] - exact[i])  # stable: ties in order
        for i in by_remainder[: total - sum(targets)]:
            targets[i] += 1
    rng = random.Random(seed)
    out: list = []
    for part, k in zip(parts, targets):
        repeats, rest = divmod(k, len(part))
        chosen = list(range(len(part))) * repeats + sorted(rng.sample(range(len(part)), rest))
        out.extend(part[i] for i in chosen)
    return out, targets


def check_sources_exist(data) -> None:
    """Before any work: every local file or folder named by `data.train` / `data.eval` exists, else a
    ConfigError naming the key. Registered sources (`world:...`), hub names (`owner/name`, `hf://...`) and
    in-memory data (an empty key) are left to their loaders."""
    for key in ("train", "eval"):
        value = getattr(data, key, None)
        if not value:
            continue
        for i, (source, _) in enumerate(train_sources(value) if key == "train" else [(value, None)]):
            if not isinstance(source, str) or source.startswith("world:") or looks_like_hub_name(source):
                continue
            if not Path(source).expanduser().exists():
                where = f"data.{key}" + (f"[{i}]" if isinstance(value, list) else "")
                raise ConfigError(f"config key '{where}': file not found: {source}")
