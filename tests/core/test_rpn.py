"""RPN end to end: train / eval settings, losses, precomputed vs in-model targets, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import lightning_rpn.core.proposer as proposer_module
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.config import ProposalConfig
from lightning_rpn.core.head import RPNHead
from lightning_rpn.core.loss import rpn_loss
from lightning_rpn.core.proposals import generate_proposals
from lightning_rpn.core.proposer import ProposalInputs
from lightning_rpn.core.rpn import RPN
from lightning_rpn.core.targets import AnchorTargetConfig, assign_anchor_targets, sample_generator


IMAGE_SIZES = [(64, 64), (56, 60)]
IMAGE_IDS = ["img-a", 17]


def _generator(anchor_stride: int = 1) -> AnchorGenerator:
    return AnchorGenerator(((16,), (32,)), (0.5, 1.0, 2.0), (4, 8), anchor_stride=anchor_stride)


def _rpn(**kwargs) -> RPN:
    settings = dict(
        in_channels=8,
        pre_nms_top_n_train=200,
        post_nms_top_n_train=60,
        pre_nms_top_n_test=100,
        post_nms_top_n_test=25,
        target_config=AnchorTargetConfig(batch_size_per_image=64),
        seed=7,
    )
    settings.update(kwargs)
    return RPN(settings.pop("anchor_generator", _generator()), **settings)


def _features() -> list[torch.Tensor]:
    return [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]])},
        {"boxes": torch.tensor([[10.0, 10.0, 26.0, 22.0]])},
    ]


def test_train_mode_losses_and_proposals() -> None:
    rpn = _rpn().train()
    proposals, losses = rpn(_features(), IMAGE_SIZES, _targets(), image_ids=IMAGE_IDS)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_reg"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
    assert rpn.head.cls_logits.weight.grad is not None
    assert len(proposals) == 2
    for (boxes, scores), (h, w) in zip(proposals, IMAGE_SIZES):
        assert boxes.shape == (60, 4) and scores.shape == (60,)
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()


def test_eval_mode_uses_test_settings_and_still_returns_losses() -> None:
    rpn = _rpn().eval()
    features = _features()
    proposals, losses = rpn(features, IMAGE_SIZES, _targets())
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_reg"}
    assert [b.shape[0] for b, _ in proposals] == [25, 25]
    # The same as running the pieces by hand with the test settings.
    objectness, deltas = rpn.head(features)
    anchors = rpn.anchor_generator([f.shape[-2:] for f in features])
    expected = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, 100, 25)
    for (boxes, scores), (exp_boxes, exp_scores) in zip(proposals, expected):
        assert torch.equal(boxes, exp_boxes) and torch.equal(scores, exp_scores)
    proposals, losses = rpn(features, IMAGE_SIZES)
    assert losses == {} and len(proposals) == 2


def test_training_mode_without_targets_warns_that_no_losses_come_back() -> None:
    rpn = _rpn().train()
    with pytest.warns(UserWarning, match="training mode but got no targets"):
        proposals, losses = rpn(_features(), IMAGE_SIZES)
    assert losses == {} and len(proposals) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():  # proposals only: no warning
            rpn(_features(), IMAGE_SIZES)
        rpn.eval()(_features(), IMAGE_SIZES)
        rpn.train().requires_grad_(False)(_features(), IMAGE_SIZES)  # a frozen RPN giving proposals: trains nothing


def test_precomputed_targets_equal_in_model_targets() -> None:
    rpn = _rpn().train()
    features = _features()
    shapes = [f.shape[-2:] for f in features]
    anchors = torch.cat(rpn.anchor_generator(shapes))
    # What the data pipeline does in its workers: same function, same per-image generator.
    labels, deltas = zip(
        *(
            assign_anchor_targets(
                anchors, t["boxes"], size, rpn.target_config, rpn.box_coder, generator=sample_generator(7, image_id)
            )
            for t, size, image_id in zip(_targets(), IMAGE_SIZES, IMAGE_IDS)
        )
    )
    precomputed = (torch.stack(labels), torch.stack(deltas))
    assert (precomputed[0] == 1).any() and (precomputed[0] == 0).any()
    _, from_pipeline = rpn(features, IMAGE_SIZES, anchor_targets=precomputed, need_proposals=False)
    _, in_model = rpn(features, IMAGE_SIZES, _targets(), image_ids=IMAGE_IDS, sampling_epoch=0, need_proposals=False)
    for key in ("loss_rpn_cls", "loss_rpn_reg"):
        assert torch.equal(from_pipeline[key], in_model[key])
    # A different seed samples differently.
    _, other_seed = _rpn(seed=8)(features, IMAGE_SIZES, _targets(), image_ids=IMAGE_IDS, sampling_epoch=0,
                                 need_proposals=False)
    assert not torch.equal(other_seed["loss_rpn_cls"], in_model["loss_rpn_cls"])


def test_without_a_sampling_epoch_every_call_samples_afresh_from_the_global_generator() -> None:
    # a training loop of the user's own passes no epoch: it drew the same anchors at every step
    rpn = _rpn().train()
    features = _features()

    def cls_losses() -> list[float]:
        return [float(rpn(features, IMAGE_SIZES, _targets(), need_proposals=False)[1]["loss_rpn_cls"]) for _ in range(3)]

    torch.manual_seed(0)
    first = cls_losses()
    torch.manual_seed(0)
    assert cls_losses() == first  # repeatable under torch.manual_seed, as torchvision's sampler
    assert len(set(first)) == 3  # a new sample at every call


def test_anchor_targets_shape_mismatch_names_both_counts() -> None:
    rpn = _rpn()
    num = 3 * (16 * 16 + 8 * 8)
    bad = (torch.zeros(2, num - 3, dtype=torch.int64), torch.zeros(2, num - 3, 4))
    with pytest.raises(ValueError, match=rf"N={num - 3}.*N={num}"):
        rpn(_features(), IMAGE_SIZES, anchor_targets=bad)


@pytest.mark.parametrize(
    "bad_box, message",
    [([5.0, 5.0, 3.0, 9.0], "empty"), ([1.0, float("nan"), 8.0, 9.0], "non-finite")],
)
def test_bad_gt_boxes_name_the_image(bad_box: list[float], message: str) -> None:
    targets = _targets()
    targets[1]["boxes"] = torch.tensor([[10.0, 10.0, 26.0, 22.0], bad_box])
    with pytest.raises(ValueError, match=rf"targets\[1\] \(image_id=17\).*box 1.*{message}"):
        _rpn()(_features(), IMAGE_SIZES, targets, image_ids=IMAGE_IDS)


@pytest.mark.parametrize("outside", [[70.0, 10.0, 90.0, 30.0], [-20.0, 5.0, 0.0, 30.0], [10.0, 56.0, 20.0, 60.0]])
def test_gt_box_wholly_outside_its_image_is_named(outside: list[float]) -> None:
    """Image 1 is 56 x 60 (h x w): boxes beyond x = 60 or y = 56, or left of x = 0, cover none of it."""
    targets = _targets()
    targets[1]["boxes"] = torch.tensor([[10.0, 10.0, 26.0, 22.0], outside])
    with pytest.raises(ValueError, match=r"targets\[1\] \(image_id=17\): gt box 1 = .* wholly outside its 56x60"):
        _rpn()(_features(), IMAGE_SIZES, targets, image_ids=IMAGE_IDS)
    targets[1]["boxes"] = torch.tensor([[50.0, 40.0, 70.0, 70.0]])  # partly inside: fine
    _rpn()(_features(), IMAGE_SIZES, targets, image_ids=IMAGE_IDS)


def test_plain_box_tensors_as_targets_are_a_type_error_naming_the_format() -> None:
    # match_anchors and ProposalRecall take [G, 4] tensors; the RPN's bare AttributeError named nothing
    boxes = [target["boxes"] for target in _targets()]
    with pytest.raises(TypeError, match=r"targets\[0\] \(image_id='img-a'\): expected a dict \{'boxes': Tensor\[G, 4\]\}"
                                        r".*got a tensor of shape \(2, 4\); for plain box tensors pass"):
        _rpn()(_features(), IMAGE_SIZES, boxes, image_ids=IMAGE_IDS)


def test_an_image_size_beyond_what_the_features_cover_is_named() -> None:
    # 16 x 16 features at stride 4 cover 64 x 64 px: a 640 x 480 image was accepted and clipped to
    with pytest.raises(ValueError, match=r"image_sizes\[1\] is \(640, 480\) \(h, w\), larger than the \(64, 64\) px"):
        _rpn().eval()(_features(), [IMAGE_SIZES[0], (640, 480)])
    _rpn().eval()(_features(), [(64, 64), (64, 64)])  # the whole canvas: fine
    # less than a stride beyond: what a backbone pooling with floor rounding gives an unpadded image
    # (VGG16: 600 px -> 37 cells of 16), which torchvision's RPN takes; it was refused
    _rpn().eval()(_features(), [(67, 60), (64, 67)])
    with pytest.raises(ValueError, match=r"image_sizes\[0\] is \(68, 60\).*an image of up to \(67, 67\) px gives"):
        _rpn().eval()(_features(), [(68, 60), (64, 64)])


def test_need_proposals_false_skips_proposal_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("generate_proposals must not run")

    monkeypatch.setattr(proposer_module, "generate_proposals", fail)
    proposals, losses = _rpn().train()(_features(), IMAGE_SIZES, _targets(), need_proposals=False)
    assert proposals == [] and set(losses) == {"loss_rpn_cls", "loss_rpn_reg"}


def test_softmax_head_paper_loss_dict_features_and_anchor_stride() -> None:
    rpn = _rpn(
        anchor_generator=_generator(anchor_stride=2), objectness="softmax", loss_normalization="paper", box_loss="giou"
    ).eval()
    features = dict(zip(["p2", "p3"], _features()))
    proposals, losses = rpn(features, IMAGE_SIZES, _targets())
    assert [b.shape[0] for b, _ in proposals] == [25, 25]
    assert all(((s > 0) & (s <= 1)).all() for _, s in proposals)
    # Paper normalisation with N_reg = anchor locations (8x8 + 4x4 after anchor_stride 2) x 2 images.
    objectness, deltas = rpn.head(list(features.values()))
    anchors = rpn.anchor_generator([f.shape[-2:] for f in features.values()])
    labels, targets = rpn._assign_targets(
        ProposalInputs(list(features.values()), IMAGE_SIZES, _targets(), None, None, None, 0, True, False)
    )
    expected = rpn_loss(
        objectness, deltas, labels, targets, normalization="paper", box_loss="giou",
        anchors=anchors, box_coder=rpn.box_coder, num_anchor_locations=64 + 16,
    )
    assert torch.equal(losses["loss_rpn_reg"], expected["loss_rpn_reg"])


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="num_anchors"):
        RPN(_generator(), head=RPNHead(8, 2))
    with pytest.raises(ValueError, match="objectness"):
        RPN(_generator(), head=RPNHead(8, 3, objectness="softmax"))
    with pytest.raises(ValueError, match="anchor_stride"):
        RPN(_generator(anchor_stride=2), head=RPNHead(8, 3))
    with pytest.raises(ValueError, match="box_loss"):
        RPN(_generator(), box_loss="ciou")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generator has 2"):
        _rpn()(_features()[:1], IMAGE_SIZES)
    rpn = _rpn()
    assert rpn.anchor_generator is not None and rpn.box_coder is not None
    assert rpn.target_config.batch_size_per_image == 64 and isinstance(rpn.head, RPNHead)


def test_short_training_run_lowers_losses() -> None:
    rpn = _rpn().train()
    features = [f.detach() for f in _features()]
    optimiser = torch.optim.Adam(rpn.parameters(), lr=1e-2)
    history = []
    for _ in range(60):
        _, losses = rpn(features, IMAGE_SIZES, _targets(), image_ids=IMAGE_IDS, need_proposals=False)
        optimiser.zero_grad()
        (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
        optimiser.step()
        history.append([v.item() for v in losses.values()])
    assert history[-1][0] < 0.5 * history[0][0] and history[-1][1] < 0.5 * history[0][1]


def test_bf16_autocast_gives_fp32_losses_and_proposals() -> None:
    rpn = _rpn().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proposals, losses = rpn(_features(), IMAGE_SIZES, _targets())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert all(b.dtype == s.dtype == torch.float32 and b.shape[0] == 60 for b, s in proposals)


def test_proposal_settings_become_one_config_and_the_attributes_proposals_read() -> None:
    rpn = RPN(_generator(), in_channels=8, pre_nms_top_n_test=50, post_nms_top_n_test=20, nms_thresh=0.5)
    assert rpn.proposal_config == ProposalConfig(pre_nms_top_n_test=50, post_nms_top_n_test=20, nms_thresh=0.5)
    assert (rpn.pre_nms_top_n, rpn.post_nms_top_n, rpn.nms_thresh, rpn.min_size, rpn.score_thresh) == (
        {"train": 2000, "test": 50}, {"train": 1000, "test": 20}, 0.5, ProposalConfig.min_size, 0.0
    )
    with pytest.raises(ValueError, match="RPN: ProposalConfig: nms_thresh must be in"):
        _rpn(nms_thresh=1.5)


def test_proposal_config_follows_settings_changed_on_the_network() -> None:
    rpn = RPN(_generator(), in_channels=8, nms_thresh=0.5)
    rpn.nms_thresh = 0.6
    rpn.post_nms_top_n["test"] = 7
    assert rpn.proposal_config == ProposalConfig(nms_thresh=0.6, post_nms_top_n_test=7)
