"""The shipped configs parse and instantiate, and state the recipes they claim."""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from lightning_rpn import cli
from lightning_rpn.cli import RPNLightningCLI, wandb_credentials_available
from lightning_rpn.training.callbacks import LastCheckpoint, RecallTable, TextProgress
from lightning_rpn.training.proposal_writer import ProposalWriter

from helpers.cli import TINY_CONFIG

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when both ``args`` and pytest's own argv are present."""
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])


def build(config: str, tmp_path: Path, *overrides: str) -> RPNLightningCLI:
    """Instantiate model, data and trainer of ``config`` without running anything."""
    return RPNLightningCLI(
        args=["--config", str(CONFIGS / config), "--trainer.logger", "false", *overrides],
        run=False,
        save_config_callback=None,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RPNLightningCLI]:
    """Every config built once, without pretrained weights and with a data root (the COCO and VOC
    configs need one): the tests below only read what was built (a ResNet-50 or VGG-16 each)."""
    root = tmp_path_factory.mktemp("data_root")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-rpn"])
        patch.setattr(cli, "_stdout_is_live", lambda: True)  # as in a terminal (pytest captures stdout)
        return {path.name: build(path.name, root, "--model.weights", "null", "--data.root", str(root))
                for path in sorted(CONFIGS.glob("*.yaml"))}


def test_building_a_config_that_logs_to_wandb_makes_no_folder(tmp_path: Path, monkeypatch) -> None:
    # the W&B logger's save_dir was made as the classes were built: check-data, analyze-anchors and
    # a parsed config left an empty runs/<job>/ in the working folder
    monkeypatch.chdir(tmp_path)
    RPNLightningCLI(args=["--config", str(CONFIGS / "shapes.yaml")], run=False, save_config_callback=None)
    assert not (tmp_path / "runs").exists()


def test_shapes_config_is_the_small_cpu_job(tmp_path: Path) -> None:
    cli = build("shapes.yaml", tmp_path)
    assert cli.model.hparams.backbone == "tiny_fpn"
    assert cli.datamodule.dataset == "synthetic"
    callbacks = cli.trainer.callbacks
    assert any(isinstance(c, RecallTable) for c in callbacks)
    assert any(isinstance(c, ProposalWriter) for c in callbacks)
    best, last = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert best.monitor == "val/AR@100" and not best.save_last
    assert isinstance(last, LastCheckpoint) and last.dirpath == best.dirpath


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_config_writes_predict_proposals_into_its_run_folder(config: str, built: dict) -> None:
    # the dense-scene configs had no ProposalWriter: predict wrote nothing and said nothing
    (writer,) = [c for c in built[config].trainer.callbacks if isinstance(c, ProposalWriter)]
    assert writer.output_dir.parts[:2] == ("runs", config.removesuffix(".yaml"))
    assert writer.top_k >= max(built[config].model.hparams.recall_max_proposals)


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_config_shows_the_losses_in_the_rich_progress_bar(config: str, built: dict) -> None:
    assert isinstance(built[config].trainer.progress_bar_callback, RichProgressBar)


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_the_progress_bar_names_the_step_budget_not_a_negative_last_epoch(config: str, built: dict) -> None:
    # Lightning's RichProgressBar wrote "Epoch 149/-2" for a run budgeted in steps (max_epochs -1)
    trainer = built[config].trainer
    bar = trainer.progress_bar_callback
    bar.setup(trainer, built[config].model, "fit")
    description = bar._get_train_description(149)
    if trainer.max_epochs is None:  # max_steps alone: Lightning writes no last epoch
        assert description.strip() == "Epoch 149"
    elif trainer.max_epochs < 0:
        assert description.strip() == f"Epoch 149 (max_steps {trainer.max_steps})"
    else:
        assert description.strip() == f"Epoch 149/{trainer.max_epochs - 1}"


def test_off_a_terminal_the_rich_progress_bar_gives_way_to_progress_lines(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "_stdout_is_live", lambda: False)
    built_off_terminal = build("shapes.yaml", tmp_path)
    progress = built_off_terminal.trainer.progress_bar_callback
    assert isinstance(progress, TextProgress) and progress.interval_s == cli.TEXT_PROGRESS_INTERVAL_S
    assert not any(isinstance(c, RichProgressBar) for c in built_off_terminal.trainer.callbacks)
    assert "stdout is not a terminal, so progress is printed as a line every 30 s" in capsys.readouterr().err
    # the progress bar turned off wins: no bar of either kind
    off = build("shapes.yaml", tmp_path, "--trainer.enable_progress_bar", "false")
    assert off.trainer.progress_bar_callback is None
    # no progress bar in the config, or no config at all: progress lines, not Lightning's default bar
    bare = RPNLightningCLI(args=["--model.backbone", "tiny_fpn", "--model.weights", "null", "--model.anchor_sizes",
                                 "[[16], [32], [64], [128]]", "--trainer.logger", "false"],
                           run=False, save_config_callback=None)
    assert isinstance(bare.trainer.progress_bar_callback, TextProgress)


def test_stdout_is_live_follows_rich(monkeypatch) -> None:
    for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert not cli._stdout_is_live()  # pytest's captured stdout
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich's own override of its terminal test
    assert cli._stdout_is_live()
    monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot redraw a line
    assert not cli._stdout_is_live()


def test_coco_config_is_detectron2_rpn_r50_fpn_1x(built: dict) -> None:
    cli = built["coco_r50_fpn_1x.yaml"]
    hp = cli.model.hparams
    assert cli.model.backbone.strides == (4, 8, 16, 32, 64)
    assert cli.model.anchor_generator.sizes == ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    assert cli.model.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)
    assert (hp.pre_nms_top_n_train, hp.post_nms_top_n_train) == (2000, 1000)
    assert (hp.pre_nms_top_n_test, hp.post_nms_top_n_test, hp.nms_thresh) == (1000, 1000, 0.7)
    assert cli.model.target_config.batch_size_per_image == 256
    assert (hp.optimizer, hp.lr, hp.box_loss) == ("sgd", 0.02, "l1")
    assert tuple(hp.milestones) == (60000, 80000) and cli.trainer.max_steps == 90000
    assert cli.datamodule.batch_size == 16
    policy = cli.datamodule.resize_policy
    assert (policy.mode, policy.min_sizes, policy.max_size) == (
        "shortest_edge", (640, 672, 704, 736, 768, 800), 1333,
    )


def test_scenes_config_is_the_dense_protocol_with_our_optimiser(built: dict) -> None:
    """The reported real-data protocol (issue 12) but for the optimiser: AdamW lr 0.002, chosen
    over the protocol's SGD lr 0.02 by bench/bench_quality.py (README, "Proposal quality")."""
    cli = built["scenes.yaml"]
    hp = cli.model.hparams
    assert (hp.backbone, hp.weights, cli.model.backbone.strides) == ("resnet18_fpn", None, (4, 8, 16, 32, 64))
    assert cli.model.anchor_generator.sizes == ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    assert cli.model.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)
    assert cli.model.target_config.batch_size_per_image == 256
    assert (hp.optimizer, hp.lr, hp.weight_decay, hp.lr_schedule) == ("adamw", 0.002, 1e-4, "cosine")
    assert (cli.trainer.max_steps, hp.warmup_steps, cli.trainer.gradient_clip_val) == (300, 30, 10.0)
    assert cli.datamodule.batch_size == 4


def test_coco_config_names_real_torchvision_weights() -> None:
    import torchvision

    text = (CONFIGS / "coco_r50_fpn_1x.yaml").read_text()
    assert "weights: ResNet50_Weights.IMAGENET1K_V1" in text
    assert torchvision.models.get_weight("ResNet50_Weights.IMAGENET1K_V1") is not None


def test_voc_config_is_the_papers_vgg16_rpn(built: dict) -> None:
    cli = built["voc_vgg16_c4.yaml"]
    model = cli.model
    assert model.backbone.strides == (16,) and model.backbone.out_channels == 512
    assert model.anchor_generator.num_anchors_per_location() == 9
    assert model.hparams.loss_normalization == "paper" and model.rpn.objectness == "softmax"
    assert model.rpn.head.cls_logits.out_channels == 18  # 2k logits


def test_wandb_credentials_come_from_env_or_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.com login u password p\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not wandb_credentials_available()
    netrc_file.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert wandb_credentials_available()
    # `wandb login` writes its entry for the installed wandb's default host (0.31: not api.wandb.ai)
    import wandb
    from urllib.parse import urlparse

    host = urlparse(wandb.Settings().base_url).hostname
    netrc_file.write_text(f"machine {host} login user password 0123456789abcdef\n")
    assert wandb_credentials_available()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a server of one's own: its entry only
    assert not wandb_credentials_available()
    netrc_file.write_text("machine wandb.example.org login user password 0123456789abcdef\n")
    assert wandb_credentials_available()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_available()


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_generated_data_configs_log_within_an_epoch(config: str) -> None:
    """Lightning warns when an epoch has fewer steps than ``log_every_n_steps``; the generated
    sets' sizes are in the config, so the shipped ones are checked here."""
    settings = yaml.safe_load((CONFIGS / config).read_text())
    data = settings["data"]
    if data["dataset"] not in ("synthetic", "scenes"):
        pytest.skip("an epoch's length depends on the user's data")
    tiles = data.get("tiles")
    items = tiles["per_epoch"] if tiles else data["synthetic_train_images"]
    assert math.ceil(items / data["batch_size"]) >= settings["trainer"]["log_every_n_steps"]


@pytest.mark.parametrize("logger", ["false", "lightning.pytorch.loggers.CSVLogger", "default"])
def test_wandb_goes_offline_only_for_a_run_that_logs_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture, logger: str) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])
    args = ["--config", str(CONFIGS / "shapes.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    args += [] if logger == "default" else ["--trainer.logger", logger]  # shapes.yaml's logger: W&B
    RPNLightningCLI(args=args, run=False, save_config_callback=None)
    notice = "no W&B credentials" in capsys.readouterr().err
    assert notice == (logger == "default") and (os.environ.get("WANDB_MODE") == "offline") == notice


def test_fit_without_a_val_split_trains_and_ends_without_validating(tmp_path: Path, monkeypatch, capsys) -> None:
    # Lightning loaded the val loader (our DataError: no val split) at the start of fit, and the CLI
    # validated the final weights on it after a fit that had not validated
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["logger"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Total length of `list` across ranks is zero")
        run = RPNLightningCLI(args=["fit", "--config", "config.yaml", "--data.val_split", "null"])
    assert run.trainer.global_step == 2 and (tmp_path / "run/checkpoints/last.ckpt").is_file()
    assert "validating the final weights" not in capsys.readouterr().err


def test_check_data_on_a_cascade_config_says_the_coverage_is_not_its_ceiling(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    status = cli.check_data(["--config", str(CONFIGS / "shapes_cascade.yaml"), "--data.synthetic_train_images", "4",
                             "--data.synthetic_val_images", "2", "--trainer.logger", "false"])
    assert status == 0
    assert "note on the coverage: model.head is 'cascade'" in " ".join(capsys.readouterr().out.split())
