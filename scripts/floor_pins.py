"""Print pyproject.toml's declared floors as exact pins (`name==X` for every `name>=X`), for scripts/floors.sh.

    python scripts/floor_pins.py [EXTRA ...]   # the dependencies, plus those of the named extras

torch is left out (scripts/floors.sh links .venv's torch in). A requirement without a `>=` floor is an error:
every declared package must say which versions it works with.
"""

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def requirements(project: dict, extras: list[str]) -> list[str]:
    out = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for item in project["optional-dependencies"][extra]:
            inner = re.fullmatch(r"prefalign\[([\w,]+)\]", item)
            if inner:
                todo += inner.group(1).split(",")
            else:
                out.append(item)
    return out


def pins(requirements: list[str]) -> list[str]:
    out = {}
    for item in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([\w.]+)", item)
        if not match:
            raise SystemExit(f"error: {item!r} has no '>=' floor")
        name, floor = match.groups()
        if name.lower() not in SKIP:
            out[name.lower()] = f"{name}=={floor}"
    return sorted(out.values())


if __name__ == "__main__":
    project = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text())["project"]
    print("\n".join(pins(requirements(project, sys.argv[1:]))))
