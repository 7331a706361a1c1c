"""The module paths from before the layer folders (issue 15) keep importing.

Configs (``class_path: lightning_rpn.callbacks.RecallTable``), checkpoints (their resolved
config) and user code name modules such as ``lightning_rpn.module``; :data:`MOVED` maps each
old path to its new home. An import finder, installed by ``lightning_rpn/__init__.py``, serves
an old path as the new module itself (the same object, so classes are identical and
``isinstance`` holds), without a file per old name. ``lightning_rpn.proposal_io``, split in
two, is served as a module holding the public names of both halves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

__all__ = ["MOVED", "install"]

_CORE = ("anchors", "backbones", "box_coder", "boxes", "cascade", "config", "cpu_kernels", "head", "loss",
         "matching", "proposals", "quality", "rpn", "sampling", "targets", "windows")

MOVED: dict[str, tuple[str, ...]] = {
    **{f"lightning_rpn.{name}": (f"lightning_rpn.core.{name}",) for name in _CORE},
    "lightning_rpn.metrics": ("lightning_rpn.evaluation.metrics",),
    "lightning_rpn.proposal_io": ("lightning_rpn.evaluation.proposal_files", "lightning_rpn.training.proposal_writer"),
    "lightning_rpn.module": ("lightning_rpn.training.module",),
    "lightning_rpn.callbacks": ("lightning_rpn.training.callbacks",),
    "lightning_rpn.data.datamodule": ("lightning_rpn.training.datamodule",),
    "lightning_rpn.torchvision_reference": ("lightning_rpn.training.torchvision_reference",),
    "lightning_rpn.anchor_analysis": ("lightning_rpn.tools.anchor_analysis",),
    "lightning_rpn.export": ("lightning_rpn.tools.export",),
    "lightning_rpn.torchvision_adapter": ("lightning_rpn.tools.torchvision_adapter",),
    "lightning_rpn.config_files": ("lightning_rpn.tools.config_files",),
}
"""Old module path -> the module(s) now holding its names."""


def _merged(name: str, targets: Sequence[str]) -> types.ModuleType:
    """A module named ``name`` holding the public names of ``targets`` (their ``__all__``)."""
    module = types.ModuleType(name, f"Old path of {', '.join(targets)}.")
    exported: list[str] = []
    for target in targets:
        real = importlib.import_module(target)
        for attribute in getattr(real, "__all__", ()):
            setattr(module, attribute, getattr(real, attribute))
            exported.append(attribute)
    module.__all__ = exported
    return module


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = MOVED[spec.name]
        if len(targets) == 1:
            return importlib.import_module(targets[0])
        return _merged(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the new module was executed when it was imported."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    _loader = _MovedLoader()

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self._loader)


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
