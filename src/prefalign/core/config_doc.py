"""Every key of a config, described: `prefalign config METHOD` (type, default, meaning) and `prefalign init
METHOD` (a commented starter YAML).

The meaning of a key is the comment written beside its field in the config dataclass, read once from the
source, so the code stays the one place a key is documented:

    beta: float | None = None  # β: inverse temperature of the implicit reward   <- trailing comment
    # padding-free batches: ...                                                  <- comment lines right
    packing: bool = True                                                         <- above a field
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import math
import textwrap
import tokenize
import types as _types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

# keys every method's Config has without a comment of its own
FALLBACK = {"method": "the method this config trains (`prefalign config METHOD` lists another's keys)"}


@dataclasses.dataclass
class KeyDoc:
    key: str  # dotted: train.learning_rate
    type: str  # as written for a user: float | None, 'error' | 'skip'
    default: Any  # the value a Config() has
    meaning: str  # the field's comment ('' when it has none)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} of a dataclass, read from its source (trailing comment of the field's
    line, or the comment lines right above it; both joined when both exist)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where no source is kept (e.g. an interactive session)
        return {}
    out: dict[str, str] = {}
    depth, above, logical = 0, [], []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NL and not logical:  # a blank or comment-only line between statements
            if tok.line.strip() == "":
                above = []
        elif tok.type == tokenize.COMMENT and not logical:
            if depth == 1:
                above.append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NEWLINE:
            names = [t for t in logical if t.type not in (tokenize.COMMENT, tokenize.NL)]
            if depth == 1 and len(names) > 1 and names[0].type == tokenize.NAME and names[1].string == ":":
                trailing = [t.string.lstrip("#").strip() for t in logical if t.type == tokenize.COMMENT]
                text = " ".join(above + trailing).strip()
                if text:
                    out[names[0].string] = text
            above, logical = [], []
        elif tok.type != tokenize.ENDMARKER:
            logical.append(tok)
    return out


def type_text(tp: Any) -> str:
    """A type as a user reads it: `float | None`, `'error' | 'skip'`, `list[str]`."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, _types.UnionType):
        return " | ".join("None" if a is type(None) else type_text(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def describe(cls: type, prefix: str = "", instance: Any = None, skip=()) -> list[KeyDoc]:
    """Every leaf key of the config class `cls` (nested sections flattened to dotted keys), with the
    default of `instance` (default: `cls()`); keys in `skip` (old names kept for renames) left out."""
    instance = cls() if instance is None else instance
    hints, comments = get_type_hints(cls), field_comments(cls)
    docs = []
    for f in dataclasses.fields(cls):
        if not f.init or prefix + f.name in skip:
            continue
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            docs += describe(hints[f.name], f"{prefix}{f.name}.", value, skip)
        else:
            meaning = comments.get(f.name) or FALLBACK.get(prefix + f.name, "")
            docs.append(KeyDoc(prefix + f.name, type_text(hints[f.name]), value, meaning))
    return docs


def section_docs(cls: type) -> dict[str, str]:
    """{section name: the first line of its dataclass docstring, or its field comment}."""
    hints, comments = get_type_hints(cls), field_comments(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = inspect.getdoc(tp) or ""
            generated = doc.startswith(tp.__name__ + "(")  # dataclasses make up a signature docstring
            out[f.name] = comments.get(f.name) or ("" if generated else doc.splitlines()[0])
    return out


def yaml_value(value: Any) -> str:
    """A value in YAML that PyYAML reads back as the same value (floats keep a dot: 5.0e-05, not 5e-05,
    which YAML 1.1 reads as a string)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return {"inf": ".inf", "-inf": "-.inf"}.get(repr(value), ".nan")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return (mantissa if "." in mantissa else mantissa + ".0") + (e + exponent if e else "")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if isinstance(value, str):  # plain when YAML reads it back as this string, quoted otherwise
        plain = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
        return plain if yaml.safe_load(plain) == value and "\n" not in plain else json.dumps(value)
    return str(value)


def key_table(cls: type, skip=()) -> str:
    """`prefalign config METHOD`: one line per key — key, type, default, meaning."""
    docs = describe(cls, skip=skip)
    width_key = max(len(d.key) for d in docs)
    width_type = min(28, max(len(d.type) for d in docs))
    lines = []
    for d in docs:
        lines.append(
            f"{d.key:<{width_key}}  {d.type:<{width_type}}  {yaml_value(d.default):<10}  {d.meaning}".rstrip()
        )
    return "\n".join(lines)


def starter_yaml(cls: type, header: str, required: dict[str, tuple[Any, str]], skip=()) -> str:
    """A commented YAML config of every key at its default; `required` = {dotted key: (placeholder value,
    comment)} for keys a user must fill in (the file still builds as written)."""
    sections = section_docs(cls)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def emit(klass, instance, indent: str, prefix: str):
        hints, comments = get_type_hints(klass), field_comments(klass)
        for f in dataclasses.fields(klass):
            if not f.init:
                continue
            value, key = getattr(instance, f.name), prefix + f.name
            if key in skip:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                note = sections.get(f.name, "") if not prefix else comments.get(f.name, "")
                lines.append(f"{indent}{f.name}:" + (f"  # {note}" if note else ""))
                emit(hints[f.name], value, indent + "  ", key + ".")
                continue
            note = comments.get(f.name) or FALLBACK.get(key, "")
            if key in required:
                value, note = required[key][0], f"REQUIRED: {required[key][1]}"
            text = f"{indent}{f.name}: {yaml_value(value)}"
            lines.append(f"{text:<44}  # {note}" if note else text)

    emit(cls, cls(), "", "")
    return "\n".join(lines) + "\n"
