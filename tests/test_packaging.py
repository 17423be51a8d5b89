"""Honest packaging: every imported package is declared, the extras fail with one line naming themselves, and
the behaviours that set the version floors (scripts/floors.sh runs this file on exactly the floors)."""

import ast
import importlib.util
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import torch
import yaml

from prefalign.core import extras

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}


def declared(extra: str | None = None) -> set[str]:
    items = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {re.split(r"[<>=\[ ]", item)[0].lower().replace("_", "-") for item in items}


def third_party_imports() -> dict[str, str]:
    """{top-level import name: first module importing it} over src/, standard library left out."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "src" / "prefalign").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("prefalign", "__future__"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared_and_domain_packages_are_extras():
    everything = declared() | {d for extra in PROJECT["optional-dependencies"] for d in declared(extra)}
    missing = {
        name: where
        for name, where in third_party_imports().items()
        if DISTRIBUTIONS.get(name, name).lower().replace("_", "-") not in everything
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert not declared() & {"diffusers", "pillow", "torchdiffeq", "scikit-learn", "matplotlib", "pot", "trl"}
    for extra, names in extras.EXTRAS.items():  # core/extras.py and pyproject.toml name the same packages
        wanted = {DISTRIBUTIONS.get(n, n).lower() for n in names}
        listed = declared(extra) | {
            d for inner in re.findall(r"prefalign\[([\w,]+)\]", " ".join(PROJECT["optional-dependencies"][extra]))
            for e in inner.split(",") for d in declared(e)
        }  # fmt: skip
        assert wanted <= listed, (extra, wanted - listed)


def test_the_floor_pins_cover_every_declared_package():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "floor_pins.py"), "demos"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in out}
    assert pinned == (
        declared() | declared("diffusion") | declared("flow") | declared("em") | {"matplotlib"}
    ) - {"torch"}


@pytest.fixture
def absent(monkeypatch):
    """absent(*names): importlib finds none of these import names (as if their packages were not installed)."""

    def hide(*names):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))

    return hide


def test_a_missing_extra_is_one_line_naming_it(absent, tmp_path):
    from typer.testing import CliRunner

    from prefalign import runner
    from prefalign.cli import app

    absent("diffusers")
    with pytest.raises(extras.MissingExtra) as error:
        runner.method_module("diffusion_dpo")
    assert str(error.value) == (
        "method 'diffusion_dpo' needs the optional packages of prefalign[diffusion] (not installed: diffusers); "
        "install them with: pip install 'prefalign[diffusion]'"
    )
    runner.method_module("dpo")  # the LM methods need none
    absent("matplotlib")
    result = CliRunner().invoke(app, ["demo", "dpo", "--quick", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "prefalign demo dpo needs the optional packages of prefalign[demos]" in result.output
    assert not (tmp_path / "d").exists()


def test_em_and_flow_options_name_their_extra(absent):
    from prefalign.methods import pfm
    from prefalign.methods.em_dpo.em import EMConfig

    absent("sklearn", "torchdiffeq")
    with pytest.raises(extras.MissingExtra, match=r"em.init: kmeans needs .*prefalign\[em\]"):
        EMConfig(init="kmeans").validate()
    EMConfig(init="dirichlet").validate()
    with pytest.raises(extras.MissingExtra, match=r"flow.solver: dopri5 needs .*prefalign\[flow\]"):
        pfm.integrate(lambda t, y, c: y, torch.zeros(1, 2), method="dopri5")


def test_dtype_bfloat16_loads_bfloat16_weights(tmp_path, tiny_lm):
    """transformers < 4.56 ignores `dtype=` in from_pretrained (4.53-4.55 load float32 silently): the floor."""
    from prefalign.core.models import ModelConfig, load_base_model

    model = load_base_model(ModelConfig(name_or_path=str(tiny_lm), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_shipped_fsdp2_config_builds_an_fsdp2_plugin():
    """accelerate 1.6 refuses FSDP2 with FULL_STATE_DICT (configs/accelerate/fsdp.yaml), older ones have no FSDP2."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    settings = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=settings["fsdp_version"],
        reshard_after_forward=settings["fsdp_reshard_after_forward"],
        state_dict_type=settings["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=settings["fsdp_cpu_ram_efficient_loading"],
    )
    assert plugin.fsdp_version == 2


def test_installed_versions_meet_the_declared_floors():
    from packaging.version import Version

    low = []
    for item in PROJECT["dependencies"]:
        name, floor = re.fullmatch(r"([\w.-]+)>=([\w.]+)", item).groups()
        if Version(metadata.version(name)) < Version(floor):
            low.append(f"{name} {metadata.version(name)} < {floor}")
    assert not low
