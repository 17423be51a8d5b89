"""The layers of src/prefalign import downward only, with no cycles and no internal imports hidden in
functions; old import paths still name the same module objects."""

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prefalign"
# lowest first; a module may import its own layer and the layers before it
LAYERS = ["core", "losses", "methods", "runner", "worlds", "demos", "cli"]
# the package root re-exports the runner on demand (lazily, or every `import prefalign.core.x` would load
# the runner); the compat finder resolves old names at run time. Both are documented in their files.
EXEMPT = {"prefalign", "prefalign._compat", "prefalign.__main__"}
# the command line is the top layer (its imports point down by definition); it imports the runner inside the
# commands that need it so that `prefalign --help` starts without torch (tests/test_cli.py times it)
LAZY_IMPORTS = {"prefalign.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def internal_imports(path: Path):
    """(imported prefalign module, line, inside a function?) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name.startswith("prefalign"):
                yield resolve(name), node.lineno, id(node) in nested


def resolve(name: str) -> str:
    """The module a dotted name refers to (`prefalign.core.config.build` -> `prefalign.core.config`)."""
    parts = name.split(".")
    while parts:
        candidate = SRC.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return name


FILES = sorted(SRC.rglob("*.py"))
GRAPH = {module_name(p): list(internal_imports(p)) for p in FILES}


def test_every_module_has_a_layer():
    unplaced = [m for m in GRAPH if m not in EXEMPT and layer(m) is None]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def upward_imports(graph) -> list[str]:
    return [
        f"{m} (layer {LAYERS[layer(m)]}) imports {target} (layer {LAYERS[layer(target)]}) at line {line}"
        for m, edges in graph.items()
        if m not in EXEMPT
        for target, line, _ in edges
        if layer(target) is not None and layer(target) > layer(m)
    ]


def test_imports_only_go_downward():
    upward = upward_imports(GRAPH)
    assert not upward, "\n".join(upward)


def test_methods_never_import_another_method():
    def method_of(name):
        parts = name.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "methods" else None

    crossing = [
        f"{m} imports {target}"
        for m, edges in GRAPH.items()
        for target, _, _ in edges
        if method_of(m) and method_of(target) and method_of(m) != method_of(target)
    ]
    assert not crossing, crossing


def test_no_internal_import_hides_in_a_function():
    hidden = [
        f"{m}: line {line} imports {target}"
        for m, edges in GRAPH.items()
        if m not in EXEMPT | LAZY_IMPORTS
        for target, line, inside in edges
        if inside
    ]
    assert not hidden, "\n".join(hidden)


def find_cycles(edges: dict) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in e if t in GRAPH and t != m} for m, e in GRAPH.items() if m not in EXEMPT}
    cycles = find_cycles(edges)
    assert not cycles, cycles


def test_the_checks_can_fail():
    """A core module importing a method, and a two-module cycle, are both reported."""
    fake = {"prefalign.core.errors": [(resolve("prefalign.methods.dpo.Config"), 3, False)]}
    assert upward_imports(fake) == [
        "prefalign.core.errors (layer core) imports prefalign.methods.dpo (layer methods) at line 3"
    ]
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == ["a -> b -> a"]


@pytest.mark.parametrize(
    "old, new",
    [
        ("prefalign.lm.dpo", "prefalign.methods.dpo"),
        ("prefalign.lm.logprobs", "prefalign.core.logprobs"),
        ("prefalign.lm.em_dpo", "prefalign.methods.em_dpo.em"),
        ("prefalign.lm.aggregate", "prefalign.methods.em_dpo.aggregate"),
        ("prefalign.config", "prefalign.core.config"),
        ("prefalign.data", "prefalign.core.data"),
        ("prefalign.diffusion.diffusion_dpo", "prefalign.methods.diffusion_dpo"),
    ],
)
def test_old_import_paths_are_the_same_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_public_names_keep_working():
    from prefalign.config import build  # noqa: F401
    from prefalign.data import load_preferences  # noqa: F401
    from prefalign.lm.aggregate import min_max_regret, regret_matrix, solve_lp, solve_omw  # noqa: F401
    from prefalign.lm.em_dpo import e_step  # noqa: F401
    from prefalign.lm.logprobs import check_packing, collate, collate_packed, encode_records, sequence_logps  # noqa: F401

    from prefalign.losses import dpo_loss, plackett_luce_loss  # noqa: F401
