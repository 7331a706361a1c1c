"""Benchmarks measure the checkout they are run from, not the environment's installed package."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path for path in (REPO / "bench").glob("*.py") if not path.name.startswith("_"))  # not the helpers


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a module, nested ones included, in line order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return sorted(found)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_benchmark_imports_the_checkout_before_the_package(script: Path) -> None:
    imports = _imports(ast.parse(script.read_text()))
    first_package = next((line for line, name in imports if name.split(".")[0] == "lightning_rpn"), None)
    checkout = next((line for line, name in imports if name == "_checkout"), None)
    assert checkout is not None, f"{script.name} does not import _checkout"
    assert first_package is None or checkout < first_package


def test_a_benchmark_in_another_checkout_imports_that_checkouts_package(tmp_path) -> None:
    # a second checkout (as a `git worktree` of an older commit would be) with a marked package
    copy = tmp_path / "checkout"
    (copy / "bench").mkdir(parents=True)
    shutil.copy2(REPO / "bench" / "_checkout.py", copy / "bench" / "_checkout.py")
    (copy / "lightning_rpn").mkdir()
    (copy / "lightning_rpn" / "__init__.py").write_text("MARK = 'the copy'\n")
    probe = copy / "bench" / "probe.py"
    probe.write_text("import _checkout\nimport lightning_rpn\nprint(lightning_rpn.__file__, lightning_rpn.MARK)\n")
    result = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(copy / "lightning_rpn" / "__init__.py"), "the", "copy"]
