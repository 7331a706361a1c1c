"""RPNModule: steps on tiny synthetic batches, predictions in original coordinates, checkpoints."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_rpn.core.backbones import infer_strides
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.transforms import ResizePolicy
from lightning_rpn.training.module import RPNModule, to_original_coordinates
from lightning_rpn.training.optim import LRSchedule

from helpers.model import collate_for, quiet_trainer, synthetic_samples, tiny_model, training_batches



def test_exposes_what_the_data_pipeline_reads() -> None:
    model = tiny_model()
    assert model.anchor_generator.strides == model.backbone.strides == (4, 8, 16, 32)
    assert model.size_divisibility == 32
    assert model.target_config.batch_size_per_image == 256
    assert model.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert model.rpn.anchor_generator is model.anchor_generator


def test_worker_targets_and_in_model_targets_give_the_same_loss() -> None:
    model = tiny_model().eval()  # eval: BatchNorm statistics do not move between the calls
    samples = synthetic_samples()
    with_targets = collate_for(model, assign_targets=True)(samples)
    without = collate_for(model, assign_targets=False)(samples)
    assert with_targets.anchor_targets is not None and without.anchor_targets is None
    _, from_workers = model(with_targets, need_proposals=False)
    _, in_model = model(without, need_proposals=False)
    assert set(from_workers) == {"loss_rpn_cls", "loss_rpn_reg"}
    for key in from_workers:
        torch.testing.assert_close(from_workers[key], in_model[key])


def test_training_step_returns_a_loss_that_trains(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_model(optimizer="adamw", lr=1e-3, lr_schedule="cosine", warmup_steps=0)
    batch = collate_for(model)(synthetic_samples())

    def total_loss() -> float:
        model.eval()
        with torch.no_grad():
            _, losses = model(batch, need_proposals=False)
        return float(sum(losses.values()))

    first = total_loss()
    trainer = quiet_trainer(tmp_path, max_steps=8, limit_val_batches=0)
    trainer.fit(model, DataLoader([batch] * 8, batch_size=None))
    assert total_loss() < first
    assert {"train/loss", "train/loss_rpn_cls", "train/loss_rpn_reg"} <= set(trainer.callback_metrics)


def test_non_finite_loss_names_the_image_ids() -> None:
    model = tiny_model()
    batch = collate_for(model)(synthetic_samples(2))
    batch.image_ids = ["cat.jpg", "dog.jpg"]
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"images \['cat.jpg', 'dog.jpg'\].*non-finite.*model.lr"):
        model.training_step(batch, 0)


def test_validation_logs_recall_and_fills_last_recall(tmp_path) -> None:
    model = tiny_model()
    batch = collate_for(model)(synthetic_samples())
    trainer = quiet_trainer(tmp_path)
    (metrics,) = trainer.validate(model, DataLoader([batch, batch], batch_size=None), verbose=False)
    assert {"val/loss", "val/loss_rpn_cls", "val/AR@100", "val/AR@10", "val/recall@0.50@100"} <= set(metrics)
    assert model.last_recall["AR@100"] == pytest.approx(metrics["val/AR@100"])
    assert 0.0 <= model.last_recall["AR@100"] <= 1.0
    assert model.last_recall["AR@10"] <= model.last_recall["AR@100"]
    assert set(model.last_recall_curves) == {"recall_vs_iou", "recall_vs_proposals"}
    assert int(model.val_recall.num_boxes.sum()) == 0  # reset after the epoch
    (tested,) = trainer.test(model, DataLoader([batch], batch_size=None), verbose=False)
    assert "test/AR@100" in tested and "test/loss" in tested


def test_validation_step_returns_proposals_sorted_and_inside_the_image() -> None:
    model = tiny_model().eval()
    batch = collate_for(model)(synthetic_samples(2))
    with torch.no_grad():
        output = model.validation_step(batch, 0)
    assert len(output["proposals"]) == 2
    for (boxes, scores), (height, width) in zip(output["proposals"], batch.image_sizes):
        assert 0 < boxes.shape[0] <= 100 and boxes.shape == (scores.shape[0], 4)
        assert torch.all(scores[:-1] >= scores[1:])
        assert boxes[:, [0, 2]].max() <= width and boxes[:, [1, 3]].max() <= height


def test_predict_step_maps_boxes_to_original_coordinates() -> None:
    model = tiny_model().eval()
    batch = collate_for(model, assign_targets=False)(synthetic_samples(2))
    batch.original_sizes = [(2 * h, 3 * w) for h, w in batch.image_sizes]  # as if downscaled
    batch.image_ids = [11, 12]
    with torch.no_grad():
        proposals, _ = model(batch, with_targets=False)
        predictions = model.predict_step(batch, 0)
    assert [p["image_id"] for p in predictions] == [11, 12]
    for (boxes, scores), prediction, (height, width) in zip(proposals, predictions, batch.image_sizes):
        expected = boxes * torch.tensor([3.0, 2.0, 3.0, 2.0])
        torch.testing.assert_close(prediction["boxes"], expected)
        torch.testing.assert_close(prediction["scores"], scores)
        assert prediction["boxes"][:, [0, 2]].max() <= 3 * width


def test_to_original_coordinates_scales_and_clips() -> None:
    boxes = torch.tensor([[10.0, 5.0, 50.0, 40.0], [-4.0, -2.0, 70.0, 45.0]])
    out = to_original_coordinates(boxes, image_size=(40, 60), original_size=(80, 90))
    torch.testing.assert_close(out, torch.tensor([[15.0, 10.0, 75.0, 80.0], [0.0, 0.0, 90.0, 80.0]]))


def test_predict_images_resizes_like_evaluation_and_returns_original_coordinates(tmp_path) -> None:
    from PIL import Image

    model = tiny_model()
    sample = synthetic_samples(1)[0]
    path = tmp_path / "shape.png"
    Image.fromarray(sample.image).save(path)
    height, width = sample.image_size
    policy = ResizePolicy("shortest_edge", min_sizes=(2 * min(height, width),), max_size=1000)
    from_path, from_tensor = model.predict_images(
        [path, torch.from_numpy(sample.image).permute(2, 0, 1)], resize=policy, batch_size=2
    )
    assert model.training  # mode restored
    torch.testing.assert_close(from_path["boxes"], from_tensor["boxes"])
    boxes = from_path["boxes"]
    assert boxes.shape[0] > 0
    assert boxes[:, [0, 2]].max() <= width and boxes[:, [1, 3]].max() <= height
    # without a resize policy the image keeps its size: same as predict_step on its own batch
    model.eval()
    (plain,) = model.predict_images([sample.image])
    with torch.no_grad():
        (expected,) = model.predict_step(collate_for(model, assign_targets=False)([sample]), 0)
    torch.testing.assert_close(plain["boxes"], expected["boxes"])


def test_predict_images_restores_each_submodule_mode_and_takes_bfloat16() -> None:
    model = tiny_model()
    model.backbone.eval()  # frozen by the caller: its batch-norm statistics must not move
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    image = torch.rand(3, 48, 64)
    model.predict_images(image.to(torch.bfloat16))
    assert model.training and not model.backbone.training and not any(m.training for m in norms)
    assert model.rpn.training


def test_anchor_levels_must_match_the_backbone() -> None:
    with pytest.raises(ValueError, match=r"model.anchor_sizes.*strides \(4, 8, 16, 32\).*3 levels"):
        RPNModule(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,)))


class _TwoLevel(nn.Module):
    """A user's own backbone: strides 8 and 16, 24 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Sequential(nn.Conv2d(3, 24, 3, stride=8, padding=1), nn.ReLU())
        self.c4 = nn.Conv2d(24, 24, 3, stride=2, padding=1)
        self.out_channels = 24
        self.size_divisibility = 16
        self.strides = infer_strides(self)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.c3(images)
        return [c3, self.c4(c3)]


def test_custom_backbone_module_trains() -> None:
    model = RPNModule(backbone=_TwoLevel(), anchor_sizes=((24,), (48,)), aspect_ratios=((1.0,),))
    assert model.hparams.backbone == f"custom: {__name__}._TwoLevel"  # the class, not the module
    assert model.size_divisibility == 16 and model.anchor_generator.strides == (8, 16)
    batch = collate_for(model)(synthetic_samples(2))
    loss = model.training_step(batch, 0)
    loss.backward()
    assert model.backbone.c3[0].weight.grad is not None


def test_named_backbone_options_are_rejected_for_a_custom_backbone() -> None:
    with pytest.raises(ValueError, match="'trainable_layers': 2.*named backbones only.*_TwoLevel"):
        RPNModule(backbone=_TwoLevel(), anchor_sizes=((24,), (48,)), trainable_layers=2)


def test_custom_backbone_without_the_interface_is_rejected() -> None:
    with pytest.raises(TypeError, match="RPNModule\\(backbone=...\\).*Conv2d.size_divisibility must be int"):
        RPNModule(backbone=nn.Conv2d(3, 8, 3))


def test_load_from_checkpoint_rebuilds_the_model(tmp_path) -> None:
    model = tiny_model(objectness="softmax", head_conv_depth=2, lr=0.005)
    batch = collate_for(model)(synthetic_samples(2))
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, DataLoader([batch] * 2, batch_size=None))
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    loaded = RPNModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.objectness == "softmax" and loaded.hparams.head_conv_depth == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected, _ = model(batch, with_targets=False)
        got, _ = loaded(batch, with_targets=False)
    torch.testing.assert_close(got[0][0], expected[0][0])


def test_sgd_multistep_schedule_with_warmup(tmp_path) -> None:
    schedule = LRSchedule(
        warmup_steps=10, warmup_factor=0.001, kind="multistep", milestones=(20, 30), gamma=0.1,
        total_steps=0, min_factor=0.0,
    )
    assert schedule(0) == pytest.approx(0.001)
    assert schedule(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [schedule(s) for s in (10, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cosine = LRSchedule(0, 1.0, "cosine", (), 0.1, total_steps=100, min_factor=0.1)
    assert [cosine(s) for s in (0, 50, 100, 150)] == pytest.approx([1.0, 0.55, 0.1, 0.1])

    model = tiny_model(lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.trainer = quiet_trainer(tmp_path, max_steps=5)
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert config["lr_scheduler"]["interval"] == "step"
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 1e-4]
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    (no_decay,) = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert {id(p) for p in no_decay["params"]} == norm_params
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.02 * 0.001)  # warm-up start


def test_batch_must_be_padded_to_the_size_divisibility() -> None:
    model = tiny_model()
    batch = RPNBatch(
        images=torch.zeros(1, 3, 40, 64, dtype=torch.uint8),
        image_sizes=[(40, 64)],
        original_sizes=[(40, 64)],
        image_ids=["odd"],
        gt_boxes=[torch.zeros(0, 4)],
        crowd_boxes=[torch.zeros(0, 4)],
    )
    with pytest.raises(ValueError, match="40x64, not a multiple of the backbone's size_divisibility 32"):
        model.predict_step(batch, 0)


def test_channels_last_gives_the_contiguous_results_and_loads_its_checkpoints(tmp_path) -> None:
    torch.manual_seed(0)
    fast = tiny_model(backbone="resnet18_fpn", anchor_sizes=((32,), (64,), (128,), (256,), (512,)))
    torch.manual_seed(0)
    plain = tiny_model(backbone="resnet18_fpn", anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
                       channels_last=False)
    conv = fast.backbone.stages[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.backbone.stages[0][0].weight.is_contiguous()
    batch = collate_for(fast)(synthetic_samples(2))
    assert fast.normalize(batch.images).is_contiguous(memory_format=torch.channels_last)
    fast.eval()
    plain.eval()
    with torch.no_grad():
        (fast_boxes, fast_scores), fast_losses = (lambda p, l: (p[0], l))(*fast(batch))
        (plain_boxes, plain_scores), plain_losses = (lambda p, l: (p[0], l))(*plain(batch))
    for key in plain_losses:
        torch.testing.assert_close(fast_losses[key], plain_losses[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_scores[:50], plain_scores[:50], rtol=1e-4, atol=1e-5)
    path = tmp_path / "fast.pt"
    torch.save(fast.state_dict(), path)
    plain.load_state_dict(torch.load(path, weights_only=True))
    assert plain.backbone.stages[0][0].weight.is_contiguous()  # loading keeps the module's format
    torch.testing.assert_close(plain.backbone.stages[0][0].weight, conv)


@pytest.mark.parametrize("worker_targets", [True, False], ids=["worker-targets", "in-model-targets"])
def test_declared_strides_that_disagree_with_the_feature_maps_are_an_error(worker_targets: bool) -> None:
    from helpers.backbone_probes import ProbeFPN

    model = tiny_model(backbone=ProbeFPN(declared_strides=[8, 16, 32, 64]))
    batch = collate_for(model, assign_targets=worker_targets)(synthetic_samples(2))
    with pytest.raises(ValueError, match=r"ProbeFPN declares strides \(8, 16, 32, 64\), but level 0 "
                                         r"measures stride 4, not 8"):
        model.training_step(batch, 0)
    honest = tiny_model(backbone=ProbeFPN())
    honest.training_step(collate_for(honest)(synthetic_samples(2)), 0)
    assert honest._strides_checked  # measured once, on the first batch


def test_a_checkpoint_of_a_python_built_backbone_asks_for_it(tmp_path) -> None:
    from helpers.backbone_probes import ProbeFPN

    model = tiny_model(backbone=ProbeFPN(width=6))
    batch = collate_for(model)(synthetic_samples(2))
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, DataLoader([batch], batch_size=None))
    path = tmp_path / "custom.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"backbone was a helpers.backbone_probes.ProbeFPN built in Python.*"
                                         r"load_from_checkpoint\(path, backbone=ProbeFPN\(...\)\)"):
        RPNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    loaded = RPNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True,
                                            backbone=ProbeFPN(width=6))
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_a_batch_that_is_no_rpn_batch_is_a_type_error_naming_the_way() -> None:
    model = tiny_model()
    with pytest.raises(TypeError, match=r"a batch must be an RPNBatch .*got tuple; .*RPNCollate"):
        model((torch.zeros(2, 3, 64, 64), [{"boxes": torch.zeros(0, 4)}] * 2))


def test_float_images_on_the_unit_scale_are_warned_of_once() -> None:
    # ToTensor's [0, 1] floats were read as 0-255: near-black images, silently
    model = tiny_model().eval()
    batch = collate_for(model, assign_targets=False)(synthetic_samples(2))
    unit = batch.images.float() / 255
    with pytest.warns(UserWarning, match=r"float images of this batch all lie in \[0, 1\].*scale them by 255"):
        model.normalize(unit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.normalize(unit)  # once
        tiny_model().normalize(batch.images.float())  # 0-255 floats: fine


def test_validate_after_fit_on_the_same_trainer_gives_no_callback_override_warning(tmp_path, caplog) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0)
    batches = DataLoader(training_batches(model)[:1], batch_size=None)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1)
    trainer.fit(model, batches, batches)
    with caplog.at_level(logging.INFO):
        trainer.validate(model, batches, verbose=False)
    assert "configure_callbacks" not in caplog.text
    assert sum(type(c).__name__ == "NonFiniteLossPolicy" for c in trainer.callbacks) == 1


def test_the_cascade_refuses_box_loss_settings_it_would_ignore() -> None:
    # its box losses are IoU losses: model.box_loss / smooth_l1_beta were accepted and did nothing
    one_anchor = dict(head="cascade", anchor_sizes=[[16], [32], [64], [128]], aspect_ratios=[[1.0]])
    with pytest.raises(ValueError, match=r"does not support \{'model.box_loss': 'giou', 'model.smooth_l1_beta': 0.5\}"):
        tiny_model(**one_anchor, box_loss="giou", smooth_l1_beta=0.5)
    assert tiny_model(**one_anchor).rpn is not None  # the defaults build
