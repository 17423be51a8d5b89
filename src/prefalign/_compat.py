"""Old import paths (before the `core/ losses/ methods/` layout) keep working: each names the SAME module
object as its new home, so `prefalign.lm.dpo.make_step = ...` patches what the runner calls.

Installed by `prefalign/__init__.py` as a meta-path finder; it imports nothing until an old name is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

ALIASES = {
    "prefalign.config": "prefalign.core.config",
    "prefalign.data": "prefalign.core.data",
    "prefalign.data_files": "prefalign.core.data_files",
    "prefalign.train": "prefalign.core.train",
    "prefalign.evaluate": "prefalign.core.report",
    "prefalign.lm.logprobs": "prefalign.core.logprobs",
    "prefalign.lm.models": "prefalign.core.models",
    "prefalign.lm.reference": "prefalign.core.reference",
    "prefalign.lm.dpo_losses": "prefalign.losses.lm",
    "prefalign.lm.dpo": "prefalign.methods.dpo",
    "prefalign.lm.mpo": "prefalign.methods.mpo",
    "prefalign.lm.em_dpo": "prefalign.methods.em_dpo.em",
    "prefalign.lm.em_init": "prefalign.methods.em_dpo.init",
    "prefalign.lm.aggregate": "prefalign.methods.em_dpo.aggregate",
    "prefalign.flow.pfm": "prefalign.methods.pfm",
    "prefalign.diffusion.common": "prefalign.core.diffusion",
    "prefalign.diffusion.diffusion_dpo": "prefalign.methods.diffusion_dpo",
    "prefalign.diffusion.sspo": "prefalign.methods.sspo",
}
PACKAGES = {"prefalign.lm", "prefalign.flow", "prefalign.diffusion"}  # old folders: empty namespaces now


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str | None):
        self.target = target

    def create_module(self, spec):
        if self.target is None:
            return None  # a plain empty package module
        return importlib.import_module(self.target)

    def exec_module(self, module):
        if self.target is None:
            module.__path__ = []


class AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in ALIASES:
            return importlib.util.spec_from_loader(fullname, _Alias(ALIASES[fullname]))
        if fullname in PACKAGES:
            return importlib.util.spec_from_loader(fullname, _Alias(None), is_package=True)
        return None


def install() -> None:
    if not any(isinstance(finder, AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(AliasFinder())
