"""Optional dependencies: which `pip install 'prefalign[EXTRA]'` brings which packages, and one error line
naming the extra when a feature needs a package that is not installed.

A language-model user's install (`pip install prefalign`) holds only what the LM methods need; the domain
packages are extras (`pyproject.toml` lists the same names):

    diffusion   diffusers, pillow          Diffusion-DPO, SSPO, image data
    flow        torchdiffeq                PFM's adaptive solver (flow.solver: dopri5)
    em          scikit-learn               EM-DPO's k-means / whitened starts and its recovery diagnostics
    demos       all of the above + matplotlib: `prefalign demo`, the built-in digits worlds, report figures
    deepspeed   deepspeed                  accelerate's DeepSpeed plugin (docs/distributed.md)
    bench       trl                        benchmarks/dpo_vs_trl.py
"""

from __future__ import annotations

import importlib.util

from prefalign.core.errors import ConfigError

# extra -> the import names it provides (pillow imports as PIL, scikit-learn as sklearn)
EXTRAS: dict[str, tuple[str, ...]] = {
    "diffusion": ("diffusers", "PIL"),
    "flow": ("torchdiffeq",),
    "em": ("sklearn",),
    "demos": ("diffusers", "PIL", "torchdiffeq", "sklearn", "matplotlib"),
    "deepspeed": ("deepspeed",),
    "bench": ("trl",),
}


class MissingExtra(ConfigError):
    """A feature needs an optional package that is not installed; the message names the extra to install."""


def missing(extra: str) -> list[str]:
    """The import names of `extra` that are not installed (found without importing them)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def message(extra: str, what: str, absent: list[str]) -> str:
    return (
        f"{what} needs the optional packages of prefalign[{extra}] (not installed: {', '.join(absent)}); "
        f"install them with: pip install 'prefalign[{extra}]'"
    )


def require(extra: str, what: str) -> None:
    """Raise `MissingExtra` (one line: what needs it, which packages are absent, the pip command) unless every
    package of `extra` is installed. Call it before the work (and before importing the packages)."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(message(extra, what, absent))


def from_import_error(error: ModuleNotFoundError, extra: str, what: str) -> MissingExtra | None:
    """The `MissingExtra` for an import that failed on one of `extra`'s packages; None for any other module
    (a broken install, a typo: those keep their traceback)."""
    top = (error.name or "").split(".")[0]
    return MissingExtra(message(extra, what, [top])) if top in EXTRAS[extra] else None
