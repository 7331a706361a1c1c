"""``--config NAME`` and ``configs copy``: a user's edited copy of a built-in config is what
``--config NAME`` runs (with a notice), ``-c`` takes names too, and a destination written as a
folder is one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lightning_rpn import cli
from lightning_rpn.tools.config_files import config_path, config_problem, resolve_config_args


@pytest.fixture
def outside_the_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder is ``tmp_path``, which has no ``configs/`` folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])
    return tmp_path


def test_an_edited_copy_wins_over_the_built_in_name_with_a_notice(
    outside_the_clone: Path, capsys: pytest.CaptureFixture
) -> None:
    # the README's workflow: copy, edit, run by name; the built-in ran, unedited, without a word
    assert cli.main(["configs", "copy", "shapes"]) == 0
    copied = outside_the_clone / "shapes.yaml"
    copied.write_text(copied.read_text().replace("max_epochs: 8", "max_epochs: 3"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", "shapes", "--print_config"])
    out = capsys.readouterr()
    assert "max_epochs: 3" in out.out
    assert out.err.count("\n") == 1 and "--config shapes: reading the local file shapes.yaml" in out.err
    assert str(config_path("shapes")) in out.err  # names the built-in it did not read


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_a_local_name_resolves_to_its_file(outside_the_clone: Path, suffix: str) -> None:
    (outside_the_clone / f"mine{suffix}").write_text("seed_everything: 1\n")
    notices: list[str] = []
    assert resolve_config_args(["fit", "-c", "mine"], notices.append) == ["fit", "-c", f"mine{suffix}"]
    assert notices == [f"--config mine: reading the local file mine{suffix}"]  # no built-in of that name


def test_the_short_flag_takes_built_in_names(outside_the_clone: Path) -> None:
    shapes = str(config_path("shapes"))
    assert resolve_config_args(["fit", "-c", "shapes"]) == ["fit", "-c", shapes]
    assert resolve_config_args(["validate", "-c", "shapes.yaml"]) == ["validate", "-c", shapes]


def test_a_run_config_before_the_subcommand_is_refused_naming_where_it_goes(
    outside_the_clone: Path, capsys: pytest.CaptureFixture
) -> None:
    # `lightning-rpn -c shapes fit --print_config` printed the defaults (resnet50_fpn, no epochs)
    # and a run failed on the config's first key
    for args in (["-c", "shapes", "fit", "--print_config"], ["--config=shapes", "validate"]):
        assert cli.main(args) == cli.USAGE_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--config shapes comes before the subcommand" in err
        assert f"`lightning-rpn {args[-2] if len(args) == 4 else 'validate'} --config shapes`" in err
    # an empty mapping holds nothing: not "the settings of a run"
    (outside_the_clone / "nothing.yaml").write_text("{}\n")
    assert "this one holds no setting (`{}`): give it after the subcommand" in config_problem(["-c", "nothing.yaml", "fit"])
    assert "holds the settings of a run" in config_problem(["-c", "shapes", "fit"])
    # a config with a section per subcommand is LightningCLI's, and runs
    (outside_the_clone / "both.yaml").write_text("fit:\n  trainer:\n    max_steps: 3\n")
    with pytest.raises(SystemExit):
        cli.main(["-c", "both.yaml", "fit", "--config", "shapes", "--print_config"])
    assert "max_steps: 3" in capsys.readouterr().out
    # after any subcommand the config is the subcommand's own
    for args in (["fit", "-c", "shapes"], ["check-data", "--config", "shapes"], ["configs", "copy", "shapes"]):
        assert config_problem(args) is None


def test_an_empty_config_file_is_named(outside_the_clone: Path, capsys: pytest.CaptureFixture) -> None:
    # `fit --config shapes --print_config > shapes.yaml` creates ./shapes.yaml empty before it runs, which
    # then shadows the built-in: jsonargparse said only "error: Unexpected config:"
    (outside_the_clone / "shapes.yaml").write_text("")
    assert cli.main(["fit", "--config", "shapes", "--print_config"]) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert err == ("lightning-rpn: --config shapes: shapes.yaml is empty (a `--print_config > shapes.yaml` creates "
                   "it empty before the command reads it: print to another file name)\n")


def test_copy_into_a_folder_written_with_a_trailing_slash(outside_the_clone: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    # `configs copy shapes out/` wrote a file named `out`
    assert cli.main(["configs", "copy", "shapes", "out/"]) == 0
    assert (outside_the_clone / "out").is_dir()
    assert (outside_the_clone / "out" / "shapes.yaml").read_bytes() == config_path("shapes").read_bytes()
    assert capsys.readouterr().out.strip() == str(Path("out") / "shapes.yaml")
    (outside_the_clone / "afile").write_text("mine\n")
    assert cli.main(["configs", "copy", "shapes", "afile/"]) == 1
    assert "'afile' is a file, not a folder" in capsys.readouterr().err
    assert (outside_the_clone / "afile").read_text() == "mine\n"


def test_a_folder_named_like_a_built_in_config_is_not_read_as_one(outside_the_clone: Path) -> None:
    (outside_the_clone / "scenes").mkdir()  # a data folder: `--config scenes` failed "Path is not a file"
    assert resolve_config_args(["check-data", "--config", "scenes"]) == ["check-data", "--config",
                                                                          str(config_path("scenes"))]


def test_copy_to_a_destination_that_cannot_be_written_is_one_line(outside_the_clone: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    (outside_the_clone / "afile").write_text("mine\n")
    # a path through a file (NotADirectoryError), as a read-only folder (PermissionError) fails
    assert cli.main(["configs", "copy", "shapes", "afile/deeper/x.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-rpn configs copy: cannot write 'afile/deeper/x.yaml' (") and err.count("\n") == 1


@pytest.mark.timeout(20)
def test_a_config_that_is_no_regular_file_is_left_to_the_cli(outside_the_clone: Path) -> None:
    # a pipe (`--config <(...)`) read here first reached the CLI empty (opening this one would block)
    os.mkfifo(outside_the_clone / "pipe.yaml")
    assert config_problem(["fit", "--config", str(outside_the_clone / "pipe.yaml")]) is None
    # "." and "" have no name to add .yaml to: a ValueError traceback before
    for value in (".", "", "/"):
        assert config_problem(["fit", "--config", value]) is None
        assert resolve_config_args(["fit", "--config", value]) == ["fit", "--config", value]
