"""The layers of ``lightning_rpn/`` import downwards only, and the lower ones never import Lightning.

core (pure torch) <- data <- evaluation <- training (Lightning) <- tools <- cli; every import
statement of every module is read (function-level ones included).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_rpn"
LAYERS = ("core", "data", "evaluation", "training", "tools")
NO_LIGHTNING = {"core", "data", "evaluation"}
# core modules: torch-side libraries only
CORE_FORBIDDEN = ("lightning", "pytorch_lightning", "torchmetrics", "wandb", "jsonargparse")


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules that ``path`` imports."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
    return names


def _layer(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 and parts[0] in LAYERS else None


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer(path)
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = []
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "lightning_rpn":
            target = name.split(".")[1] if "." in name else ""
            if target not in allowed and not target.startswith("_"):
                wrong.append(f"{name} (layer {target or 'package root'})")
        elif layer in NO_LIGHTNING and top in ("lightning", "pytorch_lightning"):
            wrong.append(name)
        elif layer == "core" and top in CORE_FORBIDDEN:
            wrong.append(name)
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) may import {sorted(allowed)} only: {wrong}"


def test_every_module_is_in_a_layer() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    # the private helpers every layer may import (old module paths, lazy names, file checks) and the CLI
    assert top == ["__init__.py", "_compat.py", "_files.py", "_lazy.py", "cli.py"]


def test_lower_layers_import_without_lightning() -> None:
    modules = [f"lightning_rpn.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}"
               for p in MODULES if _layer(p) in NO_LIGHTNING and p.name != "__init__.py"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_old_module_paths_are_the_new_modules() -> None:
    import importlib

    from lightning_rpn._compat import MOVED

    for old, new in MOVED.items():
        module = importlib.import_module(old)
        if len(new) == 1:
            assert module is importlib.import_module(new[0]), old
        else:
            for target in new:
                for name in importlib.import_module(target).__all__:
                    assert getattr(module, name) is getattr(importlib.import_module(target), name), (old, name)
