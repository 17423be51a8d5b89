"""Typed configs: YAML + `--set key=value` overrides -> dataclasses, checked before any work.

Every method defines a `Config` dataclass. `build(Config, mapping)` rejects unknown keys (naming them and
suggesting the closest valid one) and wrong types (naming the key, the expected type and the value).
Nested dataclasses are written as nested mappings or dotted keys: `--set train.learning_rate=1e-5`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from prefalign.core.errors import ConfigError


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `key.sub=value` strings; values are parsed as YAML scalars (`1e-5`, `true`, `[1, 2]`)."""
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(
            f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': expected one of {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a config class as a dotted path (`train.learning_rate`), nested sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys += dotted_keys(tp, f"{prefix}{f.name}.")
    return keys


# TRL / transformers TrainingArguments / LLaMA-Factory names -> ours: only a hint in the error, never accepted
FOREIGN_KEYS = {
    "per_device_train_batch_size": "train.batch_size", "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs",
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every", "save_steps": "train.save_every",
    "save_total_limit": "train.keep_checkpoints", "lr_scheduler_type": "train.lr_scheduler",
    "bf16": "train.mixed_precision", "fp16": "train.mixed_precision", "loss_type": "loss.name",
    "torch_dtype": "model.dtype", "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout", "lora_target": "model.lora.target_modules",
    "dataset": "data.train", "dataset_name": "data.train", "interleave_probs": "data.train (weights)",
    "cutoff_len": "data.max_length", "stage": "method", "pref_beta": "loss.beta", "pref_loss": "loss.name",
}  # fmt: skip


def _suggest(key: str, prefix: str, names: list[str], root: type | None) -> str:
    """' (did you mean 'x'?)' for an unknown key: a sibling with a close name, or, from the top level, any
    nested key whose dotted or underscored spelling is close (`model_name_or_path` -> `model.name_or_path`),
    or our name for a TRL / LLaMA-Factory key (`per_device_train_batch_size` -> `train.batch_size`)."""
    if str(key) in FOREIGN_KEYS:
        return f" (did you mean '{FOREIGN_KEYS[str(key)]}'?)"
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    if root is not None:
        paths = [p for p in dotted_keys(root) if "." in p]
        spelled = {p.replace(".", "_"): p for p in paths} | {p.rsplit(".", 1)[1]: p for p in paths}
        close = difflib.get_close_matches(str(key), list(spelled), n=1, cutoff=0.85)
        if close:
            return f" (did you mean '{spelled[close[0]]}'?)"
    return ""


def build(cls: type, data: dict | None, prefix: str = ""):
    """Instantiate dataclass `cls` from a mapping, checking keys and types (ConfigError names the key)."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        hint = _suggest(key, prefix, names, cls if not prefix else None)
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; valid keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {e}") from None
    for name in names:  # sections left at their defaults are checked too (given ones were, when built)
        value = getattr(obj, name)
        if name not in data and dataclasses.is_dataclass(value):
            _validate_tree(value)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def _validate_tree(obj) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


# ---------------------------------------------------------------- renamed keys


def _pop_path(data: dict, path: str):
    """Remove `path` from nested dicts (and sections it leaves empty); its value, or _MISSING."""
    *parents, leaf = path.split(".")
    nodes = [data]
    for part in parents:
        child = nodes[-1].get(part)
        if not isinstance(child, dict):
            return _MISSING
        nodes.append(child)
    value = nodes[-1].pop(leaf, _MISSING)
    for part, (parent, child) in reversed(list(zip(parents, zip(nodes, nodes[1:])))):
        if not child:
            del parent[part]
    return value


def _set_path(data: dict, path: str, value) -> None:
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{path}': '{part}' is not a section")
    if leaf in node and node[leaf] != value:
        raise ConfigError(f"config key '{path}' is given twice (once under an old name); keep '{path}'")
    node[leaf] = value


_MISSING = object()


def apply_renames(data: dict, renames: dict, where: str = "config") -> dict:
    """Move old keys to their new place, saying so once per key on stderr.

    `renames` maps an old dotted key to a new dotted key, or to a function `value -> {new key: value}` when
    the value changes shape too (`model.lora_rank: 8` -> `model.lora.enabled: true, model.lora.r: 8`); a
    function returning None leaves the key as it is (the old name with a value of the new shape).
    Nested dicts are copied, so the caller's mapping is left alone."""
    data = copy.deepcopy(data)
    for old, new in renames.items():
        value = _pop_path(data, old)
        if value is _MISSING:
            continue
        moved = new(value) if callable(new) else {new: value}
        if moved is None:  # the key is spelled the old way, but its value is already the new shape
            _set_path(data, old, value)
            continue
        for key, item in moved.items():
            _set_path(data, key, item)
        print(
            f"deprecated: {where} key '{old}' is now '{', '.join(moved)}'; update your config",
            file=sys.stderr,
        )
    return data


# ---------------------------------------------------------------- losses built from config


def loss_options(fn) -> dict[str, Any]:
    """The options of a loss function: its parameters with a scalar default (bool, int, float, str);
    tensors come without a default, optional tensors (masks) default to None."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if isinstance(p.default, (bool, int, float, str))
    }


def build_loss(section, registry: dict, consumed: tuple[str, ...] = ()):
    """-> (name, fn, options) for a `loss:` config section, checked against the loss's own signature.

    `section` is a dataclass with `name` and every option any loss of `registry` ({name: fn}) takes, each
    defaulting to None (= the loss function's own default). An option set in the config that the chosen loss
    does not take is a ConfigError naming the key and the loss, so a setting can never be silently ignored.
    `consumed` names options the method itself uses (e.g. `average_logps`: how log-probs are computed)."""
    name = section.name
    if name not in registry:
        raise ConfigError(f"config key 'loss.name': unknown loss '{name}'; choose one of {sorted(registry)}")
    fn = registry[name]
    takes = loss_options(fn)
    given = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "name"}
    given = {k: v for k, v in given.items() if v is not None}
    extra = [key for key in given if key not in takes and key not in consumed]
    if extra:  # every such key in one message, so one edit fixes the config
        options = ", ".join(sorted(set(takes) | set(consumed))) or "none"
        keys = ", ".join(f"'loss.{key}'" for key in extra)
        has_no = " or ".join(f"'{key}'" for key in extra)
        drop = " ".join(f"--set loss.{key}=null" for key in extra)
        error = ConfigError(
            f"config key {keys}: loss '{name}' has no option {has_no} (its options: {options}); "
            f"remove {'them' if len(extra) > 1 else 'it'} from the config or add {drop}"
        )
        error.options_not_taken = {key: given[key] for key in extra}  # for runner.load_config
        raise error
    return name, fn, {k: v for k, v in given.items() if k in takes}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def fields_of(cls) -> dict[str, typing.Any]:
    return {f.name: f for f in dataclasses.fields(cls)}
