"""Named sources that worlds register (`world:reviews`, `world:digits`, ...), so the library never imports a world.

A world module calls `register(...)` when it is imported. Installed packages announce their world modules
under the entry-point group `prefalign.worlds` (prefalign's own are listed in pyproject.toml); the first
lookup of an unknown `world:` name imports them, which registers their sources. A third-party package can
add worlds the same way.

A source has a `kind` saying what `load()` returns:
- "causal_lm": `(model, tokenizer)` of a transformers causal LM (a world's reference policy);
- "diffusion": a `core.pipelines.DiffusionParts` (UNet, scheduler, optional VAE/text encoders; the older
  `(unet, scheduler)` pair is accepted too);
- "pairs": preference data made by the world (`load(parts, **options)` -> the arrays of `core.images`).
`evaluate(policy, reference, **options) -> dict`, when given, is the world's ground truth for a trained policy
(diffusion: `evaluate(parts, samples_per_class=...)`, the parts holding the trained UNet).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from prefalign.core import console, extras
from prefalign.core.errors import ConfigError

PREFIX = "world:"
ENTRY_POINT_GROUP = "prefalign.worlds"


@dataclass(frozen=True)
class Source:
    name: str
    kind: str
    load: Callable[..., Any]
    evaluate: Callable[..., dict] | None = None
    description: str = ""


_SOURCES: dict[str, Source] = {}
_entry_points_loaded = False
_UNAVAILABLE: list[str] = []  # world modules that could not load for a missing extra: what to install


def register(name: str, kind: str, load: Callable, evaluate: Callable | None = None, description: str = ""):
    """Make `name` (it must start with `world:`) resolvable by `get`. Registering a name again replaces it."""
    if not name.startswith(PREFIX):
        raise ValueError(f"source names start with '{PREFIX}', got {name!r}")
    _SOURCES[name] = Source(name, kind, load, evaluate, description)


def is_source(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        console.quiet_library_noise()  # world modules import diffusers pipelines, which log at import
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()  # importing the world module registers its sources
            except ModuleNotFoundError as e:  # the built-in digits worlds need prefalign[demos]
                missing = extras.from_import_error(e, "demos", f"world module '{ep.name}'")
                if missing is None:
                    raise
                _UNAVAILABLE.append(str(missing))


def known(kind: str | None = None) -> list[str]:
    _load_entry_points()
    return sorted(n for n, s in _SOURCES.items() if kind is None or s.kind == kind)


def get(name: str, kind: str | None = None, key: str = "model.name_or_path") -> Source:
    """The registered source `name`, checked to be of `kind`; a ConfigError naming `key` otherwise."""
    if name not in _SOURCES:
        _load_entry_points()
    source = _SOURCES.get(name)
    if source is None or (kind is not None and source.kind != kind):
        choices = (
            ", ".join(known(kind)) or "none registered (is prefalign installed with `pip install -e .`?)"
        )
        unavailable = f" (not loaded: {'; '.join(_UNAVAILABLE)})" if _UNAVAILABLE else ""
        raise ConfigError(f"config key '{key}': unknown source '{name}'; known: {choices}{unavailable}")
    return source


def ground_truth(name: str, kind: str, policy, **options) -> dict:
    """The world's evaluation of `policy` when `name` is a source with an evaluator (its reference is
    loaded afresh), else {}: what `prefalign eval` adds to held-out metrics for a run started in a world."""
    if not is_source(name):
        return {}
    source = get(name, kind)
    if source.evaluate is None:
        return {}
    reference = source.load()
    return source.evaluate(policy, reference[0] if isinstance(reference, tuple) else reference, **options)


def cache_root() -> Path:
    """Where worlds cache the models they train once: `$PREFALIGN_CACHE`, default `~/.cache/prefalign`."""
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign")
