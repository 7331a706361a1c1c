"""Mixed precision: bf16 autocast on CPU through the RPN, and ``--trainer.precision bf16-mixed``.

Loss and coder unit tests (test_loss.py, test_box_coder.py) cover the pieces; here the whole
RPN path under autocast: the head runs in bf16, while IoU, matching, box coding, the loss
reductions and the proposals stay in fp32.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

import lightning_rpn.core.proposer
import lightning_rpn.core.rpn
import lightning_rpn.core.targets
from lightning_rpn.core.box_coder import BoxCoder
from helpers.cli import TINY_CONFIG, assert_ok, run_cli
from helpers.model import WatchStep, training_batches
from helpers.model import collate_for, quiet_trainer, synthetic_samples, tiny_model


def _spy(monkeypatch, owner, name: str, calls: list) -> None:
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((name, args, result))
        return result

    monkeypatch.setattr(owner, name, spy)


def _dtypes(value) -> list[torch.dtype]:
    if isinstance(value, torch.Tensor):
        return [value.dtype] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [d for v in value.values() for d in _dtypes(v)]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _dtypes(v)]
    return []


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
def test_rpn_under_bf16_autocast_keeps_geometry_and_losses_in_fp32(monkeypatch, objectness) -> None:
    model = tiny_model(objectness=objectness)
    batch = collate_for(model, assign_targets=False)(synthetic_samples(2))  # in-model matching
    calls: list = []
    _spy(monkeypatch, lightning_rpn.core.targets, "match_anchors_batched", calls)
    _spy(monkeypatch, BoxCoder, "encode", calls)
    _spy(monkeypatch, BoxCoder, "decode", calls)
    _spy(monkeypatch, lightning_rpn.core.rpn, "rpn_loss", calls)
    _spy(monkeypatch, lightning_rpn.core.proposer, "generate_proposals", calls)  # where RPN calls it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        _, losses = model(batch, need_proposals=False)
        loss = losses["loss_rpn_cls"] + losses["loss_rpn_reg"]
        model.eval()
        proposals, _ = model(batch)
    loss.backward()

    seen = {name for name, _, _ in calls}
    assert seen == {"match_anchors_batched", "encode", "decode", "rpn_loss", "generate_proposals"}
    loss_inputs = next(args for name, args, _ in calls if name == "rpn_loss")
    assert torch.bfloat16 in _dtypes(loss_inputs)  # the head really ran in bf16
    for name, args, result in calls:
        if name == "match_anchors_batched":  # IoU of fp32 boxes (its results are labels)
            assert set(_dtypes(args)) == {torch.float32}, f"{name} matched {_dtypes(args)}"
        else:
            assert set(_dtypes(result)) == {torch.float32}, f"{name} returned {_dtypes(result)}"
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert all(boxes.dtype == scores.dtype == torch.float32 for boxes, scores in proposals)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_fit_with_bf16_mixed_precision_through_the_cli(tmp_path: Path) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(precision="bf16-mixed", logger=False)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:2]  # checkpoint, recall table
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(["fit", "--config", "config.yaml"], tmp_path)
    assert_ok(result)
    assert "Proposal recall (end of fit, epoch 0, step 2)" in result.stdout  # the validated epoch, not the next
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    weights = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)  # fp32 master weights


@pytest.mark.parametrize("fault", ["nan-gradient", "nan-loss-skipped"])
def test_fp16_grad_scaler_and_non_finite_steps_leave_the_weights_untouched(tmp_path, fault) -> None:
    """fp16 AMP (the GPU path, here with a CPU GradScaler): the scaler owns inf/NaN gradients."""
    skip = fault == "nan-loss-skipped"
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0, nonfinite_loss="skip" if skip else "raise")
    watch = WatchStep(1, nan_gradient=not skip)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[watch], plugins=[plugin])
    trainer.fit(model, DataLoader(training_batches(model, bad_index=1 if skip else None), batch_size=None))
    assert all(torch.equal(value, watch.after[name]) for name, value in watch.before.items())
    assert trainer.global_step == 4 and model.skipped_nonfinite_batches == int(skip)


def test_16_mixed_on_the_cpu_runs_as_bf16_mixed(tmp_path) -> None:
    """What the README says of ``--trainer.precision 16-mixed`` without a GPU: Lightning warns and
    runs bf16 autocast instead (fp16 AMP with a gradient scaler is the GPU path, tested above
    through a CPU ``GradScaler``)."""
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0)
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="16-mixed")
    plugin = trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed" and plugin.scaler is None
    trainer.fit(model, DataLoader(training_batches(model), batch_size=None))
    assert trainer.global_step == 2


def test_true_half_precision_trains_and_predicts(tmp_path) -> None:
    # the images were cast to float32 against half weights: "Input type (torch.FloatTensor) and weight
    # type (CPUBFloat16Type) should be the same"
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="bf16-true")
    trainer.fit(model, DataLoader(training_batches(model), batch_size=None))
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for dtype in (torch.bfloat16, torch.float16):
        (found,) = tiny_model().to(dtype).eval().predict_images([torch.zeros(40, 60, 3, dtype=torch.uint8).numpy()])
        assert found["boxes"].shape[1] == 4 and found["boxes"].dtype == found["scores"].dtype == torch.float32
