"""A checkpoint loads only into the network it was trained as: each difference named."""

from __future__ import annotations

from argparse import Namespace

import pytest
from torch import nn

from lightning_rpn.training.checkpoint_agreement import check_checkpoint_agrees, check_resume_agrees

SAVED = {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32]], "aspect_ratios": [[0.5, 1.0, 2.0]],
         "box_coder_weights": [1.0, 1.0, 1.0, 1.0], "head": "rpn", "lr": 0.002}


def test_equal_settings_agree_whatever_their_container() -> None:
    current = {**SAVED, "anchor_sizes": ((16.0,), (32.0,)), "aspect_ratios": ((0.5, 1, 2),),
               "box_coder_weights": (1, 1, 1, 1), "lr": 0.01}  # lr does not define the weights
    check_checkpoint_agrees(SAVED, current)
    backbone = {"class_path": "my.Backbone", "init_args": {"width": 8}}
    check_checkpoint_agrees({"backbone": backbone}, {"backbone": Namespace(class_path="my.Backbone",
                                                                           init_args=Namespace(width=8))})


def test_anchor_lists_agree_in_every_spelling_of_the_same_anchors() -> None:
    """A flat list, it nested once and it once per level put the same anchors on every level."""
    flat = {"aspect_ratios": [0.5, 1.0, 2.0], "anchor_sizes": [16, 32]}
    for current in ({"aspect_ratios": [[0.5, 1.0, 2.0]], "anchor_sizes": [[16, 32]]},
                    {"aspect_ratios": ((0.5, 1, 2),) * 5, "anchor_sizes": ((16, 32),) * 5}):
        check_checkpoint_agrees(flat, current)
        check_checkpoint_agrees(current, flat)
    with pytest.raises(ValueError, match=r"anchor_sizes: checkpoint \[16, 32\], this run \[\[16\], \[32\]\]"):
        check_checkpoint_agrees(flat, {"anchor_sizes": [[16], [32]]})  # one size per level: other anchors


def test_every_difference_is_named_with_both_values() -> None:
    current = {**SAVED, "anchor_sizes": ((64,), (128,)), "head": "cascade"}
    with pytest.raises(ValueError, match=r"the checkpoint run/last.ckpt was trained as another network .*"
                                         r"anchor_sizes: checkpoint \[\[16\], \[32\]\], this run \(\(64,\), \(128,\)\); "
                                         r"head: checkpoint 'rpn', this run 'cascade'\)"):
        check_checkpoint_agrees(SAVED, current, "run/last.ckpt")


def test_what_the_checkpoint_does_not_record_as_data_is_not_compared() -> None:
    check_checkpoint_agrees({"lr": 1.0}, {"anchor_sizes": ((64,),)})  # an older checkpoint
    check_checkpoint_agrees({"backbone": nn.Conv2d(3, 8, 3)}, {"backbone": "<built in Python>x.Probe"})


def test_quality_is_compared_as_the_model_reads_it() -> None:
    check_checkpoint_agrees({"quality": "centerness+iou"}, {"quality": "centerness + iou"})
    with pytest.raises(ValueError, match=r"quality: checkpoint 'centerness\+iou', this run 'iou\+centerness'"):
        check_checkpoint_agrees({"quality": "centerness+iou"}, {"quality": "iou+centerness"})  # the head's order
    with pytest.raises(ValueError, match=r"quality: checkpoint None, this run 'iou'"):
        check_checkpoint_agrees({"quality": None}, {"quality": "iou"})


def test_ranking_by_the_objectness_of_a_model_that_never_trained_it_is_refused() -> None:
    trained_without = {"quality": "centerness+iou", "proposal_score": "quality"}
    for ranking in ("objectness", "geometric_mean"):
        with pytest.raises(ValueError, match=rf"proposal_score: checkpoint 'quality', whose objectness branch never "
                                             rf"trained, this run '{ranking}'"):
            check_checkpoint_agrees(trained_without, {**trained_without, "proposal_score": ranking})
    check_checkpoint_agrees(trained_without, trained_without)
    # a model that trained its objectness may be ranked by its quality branches alone, or by both
    check_checkpoint_agrees({**trained_without, "proposal_score": "geometric_mean"}, trained_without)


PRETRAINED = {"backbone": "resnet18_fpn", "weights": "ResNet18_Weights.IMAGENET1K_V1", "frozen_bn": None,
              "trainable_layers": None}


def test_a_resume_with_other_trainable_backbone_parameters_names_the_settings() -> None:
    with pytest.raises(ValueError, match=r"fit cannot resume the checkpoint run/last.ckpt with other trainable "
                                         r"parameters .*\(weights: checkpoint 'ResNet18_Weights.IMAGENET1K_V1', this run "
                                         r"None; so the backbone's batch norm: checkpoint FrozenBatchNorm2d, this run "
                                         r"BatchNorm2d; trainable backbone stages of 5: checkpoint 3, this run 5\)"):
        check_resume_agrees(PRETRAINED, {**PRETRAINED, "weights": None}, 5, "run/last.ckpt")
    with pytest.raises(ValueError, match=r"\(frozen_bn: checkpoint None, this run False; so the backbone's batch "
                                         r"norm: checkpoint FrozenBatchNorm2d, this run BatchNorm2d\)"):
        check_resume_agrees(PRETRAINED, {**PRETRAINED, "frozen_bn": False}, 5)
    with pytest.raises(ValueError, match=r"\(trainable_layers: checkpoint None, this run 5; so trainable backbone "
                                         r"stages of 5: checkpoint 3, this run 5\)"):
        check_resume_agrees(PRETRAINED, {**PRETRAINED, "trainable_layers": 5}, 5)


def test_backbone_settings_that_train_the_same_parameters_resume() -> None:
    # other weights, the same batch norm and stages: the checkpoint's weights replace them anyway
    check_resume_agrees(PRETRAINED, {**PRETRAINED, "weights": "r18.pth", "trainable_layers": 3, "frozen_bn": True}, 5)
    vgg = {"backbone": "vgg16_c4", "weights": "VGG16_Weights.IMAGENET1K_V1", "frozen_bn": None, "trainable_layers": 5}
    check_resume_agrees(vgg, {**vgg, "weights": None, "trainable_layers": None}, 5)  # no batch norm, all train
    custom = {"class_path": "my.Backbone", "init_args": {"width": 8}}
    check_resume_agrees({**PRETRAINED, "backbone": custom}, {**PRETRAINED, "backbone": custom, "weights": None}, 5)
    check_resume_agrees({"backbone": "resnet18_fpn"}, {**PRETRAINED, "weights": None}, 5)  # not recorded


def test_head_channels_none_agrees_with_the_backbone_width_it_means() -> None:
    # head_conv_channels null and 32 (tiny_fpn's out_channels) build the same head: refused as another network
    from helpers.model import tiny_model

    saved = {"hyper_parameters": dict(tiny_model(head_conv_channels=None).hparams)}
    tiny_model(head_conv_channels=32).on_load_checkpoint(saved)
    with pytest.raises(ValueError, match=r"head_conv_channels: checkpoint 32, this run 16"):
        tiny_model(head_conv_channels=16).on_load_checkpoint(saved)
