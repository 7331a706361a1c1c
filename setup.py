"""Build step for the wheel: ship the top-level ``configs/`` (their single source) as ``lightning_rpn/configs/``.

Everything else is declared in ``pyproject.toml``. Editable installs skip the copy: they read
``configs/`` in the source tree (``lightning_rpn.config_files.config_dir``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/*.yaml`` into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "lightning_rpn" / "configs"
        self.mkpath(str(target))
        for config in sorted(Path("configs").glob("*.yaml")):
            self.copy_file(str(config), str(target / config.name))


setup(cmdclass={"build_py": BuildPyWithConfigs})
