"""A checkpoint loads only into the network it was trained as: each difference named."""

from __future__ import annotations

from argparse import Namespace

import pytest
from torch import nn

from lightning_rpn.training.checkpoint_agreement import check_checkpoint_agrees

SAVED = {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32]], "aspect_ratios": [[0.5, 1.0, 2.0]],
         "box_coder_weights": [1.0, 1.0, 1.0, 1.0], "head": "rpn", "lr": 0.002}


def test_equal_settings_agree_whatever_their_container() -> None:
    current = {**SAVED, "anchor_sizes": ((16.0,), (32.0,)), "aspect_ratios": ((0.5, 1, 2),),
               "box_coder_weights": (1, 1, 1, 1), "lr": 0.01}  # lr does not define the weights
    check_checkpoint_agrees(SAVED, current)
    backbone = {"class_path": "my.Backbone", "init_args": {"width": 8}}
    check_checkpoint_agrees({"backbone": backbone}, {"backbone": Namespace(class_path="my.Backbone",
                                                                           init_args=Namespace(width=8))})


def test_every_difference_is_named_with_both_values() -> None:
    current = {**SAVED, "anchor_sizes": ((64,), (128,)), "head": "cascade"}
    with pytest.raises(ValueError, match=r"the checkpoint run/last.ckpt was trained as another network .*"
                                         r"anchor_sizes: checkpoint \[\[16\], \[32\]\], this run \(\(64,\), \(128,\)\); "
                                         r"head: checkpoint 'rpn', this run 'cascade'\)"):
        check_checkpoint_agrees(SAVED, current, "run/last.ckpt")


def test_what_the_checkpoint_does_not_record_as_data_is_not_compared() -> None:
    check_checkpoint_agrees({"lr": 1.0}, {"anchor_sizes": ((64,),)})  # an older checkpoint
    check_checkpoint_agrees({"backbone": nn.Conv2d(3, 8, 3)}, {"backbone": "<built in Python>x.Probe"})
