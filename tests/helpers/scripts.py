"""Load a script of the repository (an example, a benchmark) as a module, to test its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_script(relative_path: str, name: str) -> ModuleType:
    """The module of ``REPO / relative_path``, executed under ``name`` with the script's folder on
    ``sys.path``, as ``python relative_path`` has it (benchmarks import ``bench/_checkout.py``)."""
    folder = str((REPO / relative_path).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
