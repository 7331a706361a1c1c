"""The built-in configs travel with the package: a clone and an editable install read configs/,
a wheel carries a copy; ``--config NAME``, ``configs list`` and ``configs copy``; ``py.typed``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from lightning_rpn import cli
from lightning_rpn.tools.config_files import config_dir, config_names, config_path, copy_config, resolve_config_args

from helpers.cli import in_background

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))


def test_a_clone_or_editable_install_reads_the_top_level_configs() -> None:
    assert config_dir() == REPO / "configs" and config_names() == CONFIGS and "shapes" in CONFIGS
    assert config_path("shapes") == config_path("shapes.yaml") == REPO / "configs" / "shapes.yaml"
    with pytest.raises(ValueError, match=r"no built-in config named 'nope'; built-in configs: .*shapes"):
        config_path("nope")
    with pytest.raises(ValueError, match="no built-in config"):
        config_path("../configs/shapes")


def test_config_names_resolve_unless_a_file_of_that_name_exists(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside the clone: no configs/ folder here
    shapes = str(REPO / "configs" / "shapes.yaml")
    assert resolve_config_args(["fit", "--config", "shapes"]) == ["fit", "--config", shapes]
    assert resolve_config_args(["fit", "--config=shapes.yaml"]) == ["fit", f"--config={shapes}"]
    assert resolve_config_args(["fit", "--config", "configs/shapes.yaml"]) == ["fit", "--config", shapes]
    assert resolve_config_args(["fit", "--config", "mine.yaml", "--x", "shapes"]) == [
        "fit", "--config", "mine.yaml", "--x", "shapes"]  # not a built-in name: for the CLI to report
    (tmp_path / "shapes.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_args(["fit", "--config", "shapes.yaml"]) == ["fit", "--config", "shapes.yaml"]


def test_configs_list_and_copy(tmp_path, capsys) -> None:
    assert cli.main(["configs", "list"]) == 0
    assert capsys.readouterr().out.split() == CONFIGS
    assert cli.main(["configs", "copy", "shapes", str(tmp_path)]) == 0
    copied = tmp_path / "shapes.yaml"
    assert capsys.readouterr().out.strip() == str(copied)
    assert copied.read_bytes() == (REPO / "configs" / "shapes.yaml").read_bytes()
    copied.write_text("# edited\n")
    assert cli.main(["configs", "copy", "shapes", str(copied)]) == 1  # a user's file is kept
    assert "exists" in capsys.readouterr().err and copied.read_text() == "# edited\n"
    assert cli.main(["configs", "copy", "shapes", str(copied), "--force"]) == 0
    assert copied.read_bytes() == (REPO / "configs" / "shapes.yaml").read_bytes()
    assert cli.main(["configs", "copy", "nope"]) == 1
    assert "no built-in config named 'nope'" in capsys.readouterr().err
    assert copy_config("voc_vgg16_c4", tmp_path / "sub" / "voc.yaml").read_bytes() == (
        REPO / "configs" / "voc_vgg16_c4.yaml").read_bytes()


def _run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` without this process's ``PYTHONPATH`` (a fresh environment sees only its own
    packages) and W&B service (see ``cli_environment``)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "WANDB_SERVICE")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def _copy_sources(target: Path) -> Path:
    """What a build reads from this checkout, copied (so no build/ folder is left here or reused)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("lightning_rpn", "configs"):
        shutil.copytree(REPO / name, target / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, target / name)
    return target


def _fresh_env(root: Path) -> Path:
    """A new virtual environment whose dependencies come from this one's site-packages (``.pth``)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], root)
    python = root / "env" / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip_install(python: Path, *args: str) -> None:
    """pip for ``python``'s environment, without network, dependencies or build isolation."""
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-build-isolation", "-q", *args], python.parent)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of this checkout's sources."""
    out = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(out / "source")
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(out)], out)
    (path,) = out.glob("lightning_rpn-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (not editable)."""
    python = _fresh_env(tmp_path_factory.mktemp("venv"))
    _pip_install(python, str(wheel))
    return python.parents[1]


def test_the_wheel_carries_the_configs_and_py_typed(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "lightning_rpn/py.typed" in names
        for name in CONFIGS:
            packaged = archive.read(f"lightning_rpn/configs/{name}.yaml")
            assert packaged == (REPO / "configs" / f"{name}.yaml").read_bytes(), name


def test_the_installed_wheel_finds_its_configs_outside_a_clone(venv: Path, tmp_path: Path) -> None:
    python, command = str(venv / "bin" / "python"), str(venv / "bin" / "lightning-rpn")
    # independent commands (each imports the package afresh), side by side
    where, listed, _, *printed = [run.result() for run in [
        in_background(_run, [python, "-c", "import lightning_rpn.tools.config_files as c; "
                                           "print(c.__file__); print(c.config_dir())"], tmp_path),
        in_background(_run, [command, "configs", "list"], tmp_path),
        in_background(_run, [command, "configs", "copy", "shapes", "mine.yaml"], tmp_path),
        # the name, and the README's clone path
        *(in_background(_run, [command, "fit", "--config", config, "--print_config"], tmp_path)
          for config in ("shapes", "configs/shapes.yaml")),
    ]]
    where = where.stdout.split()
    assert all(str(venv) in path for path in where), where  # the wheel's package and its configs copy
    assert (Path(where[1]).parent / "py.typed").is_file()
    assert listed.stdout.split() == CONFIGS
    assert (tmp_path / "mine.yaml").read_bytes() == (REPO / "configs" / "shapes.yaml").read_bytes()
    for config, output in zip(("shapes", "configs/shapes.yaml"), printed):
        assert "tiny_fpn" in output.stdout and "max_epochs: 8" in output.stdout, config


def test_an_editable_install_reads_the_source_configs(tmp_path: Path) -> None:
    source = _copy_sources(tmp_path / "source")
    python = _fresh_env(tmp_path)
    _pip_install(python, "-e", str(source))
    code = "import lightning_rpn.tools.config_files as c; print(c.config_dir()); print(*c.config_names())"
    folder, *names = _run([str(python), "-c", code], tmp_path).stdout.split()
    assert folder == str(source / "configs") and names == CONFIGS


def test_the_oldest_tested_versions_are_the_declared_floors() -> None:
    # `make test-oldest` runs the suite on tests/oldest-versions.txt: each direct dependency
    # there must be the floor that pyproject.toml declares, or the check tests something else
    tomllib = pytest.importorskip("tomllib")
    declared = {}
    for spec in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(spec)
        floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        declared[canonicalize_name(requirement.name)] = floors[0] if floors else None
    pinned = {}
    for line in (REPO / "tests" / "oldest-versions.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = Version(version)
    direct = {name: version for name, version in pinned.items() if name in declared}
    assert set(direct) >= {"lightning", "jsonargparse", "torchmetrics", "albumentations"}
    assert {name: declared[name] for name in direct} == direct
