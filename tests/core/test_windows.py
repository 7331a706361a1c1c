"""Sliding-window proposals: the grid, the merge across windows, whole-scene recall, the module paths, memory.

Most tests use an *oracle network*: a ``propose`` function that reads where its window lies from
the pixels (the test image encodes each pixel's coordinates) and returns the known boxes as
the window shows them (clipped to it). The windows, offsets, merge and top-k are then checked
against exact expectations, free of what an untrained network would propose.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lightning_rpn.core.boxes import box_iou
from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.scenes import DenseScenes
from lightning_rpn.data.tiles import cut_window
from lightning_rpn.evaluation.metrics import ProposalRecall
from lightning_rpn.training.module import RPNModule
from lightning_rpn.core.windows import (
    SlidingWindowConfig,
    WindowTargets,
    mean_window_losses,
    merge_window_proposals,
    sliding_window_proposals,
    window_grid,
    window_starts,
)

TINY = dict(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)),
            pre_nms_top_n_test=300, post_nms_top_n_test=200)


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` whose pixel ``(y, x)`` holds ``(x % 256, y % 256, x // 256 + 16 * (y // 256))``."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs % 256, ys % 256, xs // 256 + 16 * (ys // 256)]).to(torch.uint8)


def oracle(gt_boxes: torch.Tensor, min_visible: float = 0.2):
    """A ``propose`` function: the gt boxes as each window shows them, logits falling with the box index."""
    calls: list[int] = []

    def propose(images: torch.Tensor, sizes: list[tuple[int, int]], windows: list | None = None) -> list:
        calls.append(images.shape[0])
        out = []
        for index, (image, (h, w)) in enumerate(zip(images, sizes)):
            code = image[:, 0, 0].long()
            x0, y0 = int(code[0] + 256 * (code[2] % 16)), int(code[1] + 256 * (code[2] // 16))
            if windows is not None:  # sliding_window_proposals says where each window lies
                assert windows[index] == (x0, y0, x0 + w, y0 + h)
            clipped = gt_boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            clipped = torch.minimum(clipped.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
            area = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1)
            full = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(1)
            keep = torch.nonzero(area >= min_visible * full).squeeze(1)
            logits = -keep.float() / len(gt_boxes)
            out.append((clipped[keep], logits.sigmoid(), logits))
        return out

    propose.calls = calls  # type: ignore[attr-defined]
    return propose


def test_grid_covers_the_image_with_the_overlap() -> None:
    assert window_starts(280, 160, 40) == [0, 120]
    assert window_starts(300, 160, 40) == [0, 120, 140]
    assert window_starts(100, 160, 40) == [0]
    windows = window_grid((200, 300), 160, 40)
    assert len(windows) == 6 and windows[0] == (0, 0, 160, 160) and windows[-1] == (140, 40, 300, 200)
    covered = np.zeros((200, 300), bool)
    for x0, y0, x1, y1 in windows:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    with pytest.raises(ValueError, match=r"model.sliding_window: unknown key\(s\) \['window'\]"):
        SlidingWindowConfig.from_mapping({"window": 3})
    with pytest.raises(ValueError, match=r"model.sliding_window.overlap=512 must be an int in \[0, size=512\)"):
        SlidingWindowConfig.from_mapping({"size": 512, "overlap": 512})
    with pytest.raises(ValueError, match="model.sliding_window.top_k=0 must be null or a positive int"):
        SlidingWindowConfig.from_mapping({"top_k": 0})
    with pytest.raises(ValueError, match="model.sliding_window.merge_metric='nms'"):
        RPNModule(**TINY, sliding_window={"merge_metric": "nms"})


def test_a_propose_without_logits_is_told_what_to_return_and_runs_without_autograd() -> None:
    """An RPN called without proposal_logits gives (boxes, scores): a bare unpacking error before."""
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    with_logits = oracle(box)

    def two_tensors(images, sizes, windows=None):
        return [(boxes, scores) for boxes, scores, _ in with_logits(images, sizes)]

    weight = torch.nn.Parameter(torch.ones(()))

    def through_a_network(images, sizes, windows=None):  # its network runs without autograd here
        return [(boxes * weight, scores * weight, logits) for boxes, scores, logits in with_logits(images, sizes)]

    boxes, scores, _ = sliding_window_proposals(coordinate_image(160, 160), through_a_network,
                                                SlidingWindowConfig(160, 40), 100, 0.7)
    assert len(boxes) == 1 and not boxes.requires_grad and not scores.requires_grad
    with pytest.raises(ValueError, match=r"propose returned 2 tensors for a window, expected \(boxes \[P, 4\], "
                                         r"scores \[P\], logits \[P\]\): an RPN gives them with proposal_logits=True"):
        sliding_window_proposals(coordinate_image(160, 160), two_tensors, SlidingWindowConfig(160, 40), 100, 0.7)


def test_a_box_straddling_two_windows_comes_out_once_as_on_the_whole_image() -> None:
    # windows x in [0, 160) and [120, 280): the box is whole in the first, cut at x=120 in the second
    box = torch.tensor([[100.0, 40.0, 150.0, 90.0], [200.0, 100.0, 240.0, 150.0]])
    image = coordinate_image(160, 280)
    whole = oracle(box)(image[None], [(160, 280)])[0][0]
    config = SlidingWindowConfig(size=160, overlap=40, window_batch=1, merge_metric="ios")
    propose = oracle(box.flip(0))  # the cut part of the straddling box gets the higher logit
    boxes, scores, logits = sliding_window_proposals(image, propose, config, top_k=100, nms_thresh=0.7)
    assert propose.calls == [1, 1]
    assert boxes.shape == (2, 4) and torch.all(logits[:-1] >= logits[1:])
    iou = box_iou(boxes, whole)
    assert iou.max(dim=0).values.min() >= 0.9 and (iou > 0.5).sum() == 2, "each box once"
    torch.testing.assert_close(boxes[torch.argmax(iou[:, 0])], box[0])  # the interior version, exactly
    # IoU alone keeps the cut part too (IoU 30/50 = 0.6 < 0.7): that is what "ios" is for
    iou_boxes, _, _ = sliding_window_proposals(image, propose, SlidingWindowConfig(160, 40), 100, 0.7)
    assert len(iou_boxes) == 3
    # identical duplicates from two windows (the box whole in both) merge under either metric
    inner = torch.tensor([[125.0, 40.0, 155.0, 90.0]])
    dup, _, _ = sliding_window_proposals(image, oracle(inner), SlidingWindowConfig(160, 40), 100, 0.7)
    torch.testing.assert_close(dup, inner)


def test_a_mapping_config_is_the_yaml_one_and_progress_follows_the_window_batches() -> None:
    """``{"size": .., "overlap": ..}`` (the YAML's mapping) was an AttributeError ('dict' object has no
    attribute 'size'); ``progress`` hears the windows done after each window batch."""
    box = torch.tensor([[100.0, 40.0, 150.0, 90.0], [200.0, 100.0, 240.0, 150.0]])
    image = coordinate_image(200, 300)  # 2 rows x 3 columns of 160-px windows
    reference = sliding_window_proposals(image, oracle(box), SlidingWindowConfig(160, 40, window_batch=3), 100, 0.7)
    told: list[tuple[int, int]] = []
    mapped = sliding_window_proposals(image, oracle(box), {"size": 160, "overlap": 40, "window_batch": 3}, 100, 0.7,
                                      progress=lambda done, total: told.append((done, total)))
    for got, expected in zip(mapped, reference):
        torch.testing.assert_close(got, expected)
    assert told == [(3, 6), (6, 6)]
    with pytest.raises(ValueError, match=r"model.sliding_window.overlap=160 must be an int in \[0, size=160\)"):
        sliding_window_proposals(image, oracle(box), {"size": 160, "overlap": 160}, 100, 0.7)
    with pytest.raises(ValueError, match=r"model.sliding_window: unknown key\(s\) \['stride'\]"):
        sliding_window_proposals(image, oracle(box), {"stride": 100}, 100, 0.7)


def test_merge_keeps_same_window_pairs_and_prefers_interior() -> None:
    windows = [(0, 0, 100, 100), (60, 0, 160, 100)]
    same = torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0]])  # IoU 0.9, one window
    keep = merge_window_proposals([same, torch.zeros(0, 4)], [torch.tensor([1.0, 0.5]), torch.zeros(0)],
                                  windows, (100, 160), thresh=0.7)
    assert keep.tolist() == [0, 1], "the window's own NMS already ran: same-window pairs stay"
    cut = torch.tensor([[70.0, 10.0, 100.0, 40.0]])      # touches x=100, the first window's inner edge
    interior = torch.tensor([[70.0, 10.0, 101.0, 40.0]])  # the same object, whole in the second window
    keep = merge_window_proposals([cut, interior], [torch.tensor([5.0]), torch.tensor([-5.0])],
                                  windows, (100, 160), thresh=0.7)
    assert keep.tolist() == [1], "the interior proposal wins despite its lower logit"


@pytest.mark.parametrize("metric", ["iou", "ios"])
def test_whole_scene_recall_on_a_generated_scene(metric: str) -> None:
    scene = DenseScenes(1, size=480, objects="roofs", density=700.0, min_object_size=12, max_object_size=40,
                        split="windows")[0]
    gt = torch.from_numpy(scene.boxes)
    assert len(gt) > 100
    image = coordinate_image(480, 480)
    config = SlidingWindowConfig(size=128, overlap=48, window_batch=8, merge_metric=metric)  # type: ignore[arg-type]
    boxes, _, _ = sliding_window_proposals(image, oracle(gt), config, top_k=1000, nms_thresh=0.7)
    recall = ProposalRecall(max_proposals=(1000,))
    recall.update([boxes], [gt])
    whole = ProposalRecall(max_proposals=(1000,))
    whole.update([oracle(gt)(image[None], [(480, 480)])[0][0]], [gt])
    assert float(whole.compute()["AR@1000"]) == pytest.approx(1.0)
    result = recall.compute()
    assert float(result["recall@0.50@1000"]) >= 0.99 and float(result["AR@1000"]) >= 0.97
    duplicates = len(boxes) - len(gt)
    assert duplicates <= (0.02 * len(gt) if metric == "ios" else 0.5 * len(gt))


def test_module_proposes_on_windows_in_predict_images_and_validation() -> None:
    torch.manual_seed(0)
    model = RPNModule(**TINY, sliding_window={"size": 128, "overlap": 32, "window_batch": 3}).eval()
    scene = DenseScenes(1, size=300, density=300.0, max_object_size=30, split="windows")[0]
    result = model.predict_images(scene.image)
    assert set(result) == {"boxes", "scores", "objectness_logits"} and 0 < len(result["boxes"]) <= 200
    assert float(result["boxes"][:, 2].max()) <= 300 and float(result["boxes"][:, 0].min()) >= 0
    assert torch.all(result["objectness_logits"][:-1] >= result["objectness_logits"][1:])
    model.sliding_window = SlidingWindowConfig(size=128, overlap=32, window_batch=3, top_k=50)
    capped = model.predict_images(scene.image)  # the image's top-k after the merge: the best 50
    torch.testing.assert_close(capped["boxes"], result["boxes"][:50])
    reference = RPNModule(**TINY).eval()
    reference.load_state_dict(model.state_dict())
    # one window as large as the image gives the whole-image proposals
    model.sliding_window = SlidingWindowConfig(size=320, overlap=0)
    single = model.predict_images(scene.image)
    for key in single:
        torch.testing.assert_close(single[key], reference.predict_images(scene.image)[key])



def test_window_targets_clip_gt_boxes_per_window_and_key_each_window() -> None:
    gt = torch.tensor([[10.0, 10, 30, 30], [90, 10, 130, 30], [80, 40, 120, 60]])
    crowd = torch.tensor([[95.0, 0, 150, 50]])
    targets, ids, keys = WindowTargets(gt, crowd, "scene", 7, min_visibility=0.3).for_windows(
        [(0, 0, 100, 100), (100, 0, 200, 100)])
    # window 1: box 1 keeps 25% (< 0.3): dropped; window 2: box 1 keeps 75%, box 2 half
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[10.0, 10, 30, 30], [80, 40, 100, 60]]))
    torch.testing.assert_close(targets[1]["boxes"], torch.tensor([[0.0, 10, 30, 30], [0, 40, 20, 60]]))
    torch.testing.assert_close(targets[0]["crowd_boxes"], torch.tensor([[95.0, 0, 100, 50]]))
    torch.testing.assert_close(targets[1]["crowd_boxes"], torch.tensor([[0.0, 0, 50, 50]]))
    assert ids == ["scene@0,0,100,100", "scene@100,0,200,100"] and keys == ["7@0,0,100,100", "7@100,0,200,100"]
    parts = [(3, {"loss_rpn_cls": torch.tensor(1.0)}), (1, {"loss_rpn_cls": torch.tensor(5.0)})]
    assert float(mean_window_losses(parts)["loss_rpn_cls"]) == pytest.approx(2.0)  # weighted by windows
    with pytest.raises(ValueError, match="at least one window batch"):
        mean_window_losses([])


def test_window_losses_are_the_training_losses_of_the_cut_windows() -> None:
    """Validation on windows logs the loss a training batch of the same windows would have:
    the boxes cut by ``cut_window`` (the tiled training path), matched and sampled in the model
    with each window's key, averaged over the window batches by their window counts."""
    torch.manual_seed(0)
    config = SlidingWindowConfig(size=128, overlap=32, window_batch=2)
    model = RPNModule(**TINY, sliding_window=config).eval()
    with torch.no_grad():  # logits that differ between anchors, so the sampled anchors matter
        for parameter in model.rpn.head.parameters():
            parameter.normal_(0.0, 0.3)
    scene = DenseScenes(1, size=200, density=300.0, max_object_size=30, split="window-losses")[0]
    collate = RPNCollate(model.anchor_generator, model.target_config, model.box_coder, model.size_divisibility,
                         assign_targets=False)
    batch = collate([scene])
    targets = [WindowTargets(batch.gt_boxes[0], batch.crowd_boxes[0], "s", 5, min_visibility=0.3)]
    with torch.no_grad():
        model._window_proposals(batch, targets)
    got = mean_window_losses(targets[0].losses)
    windows = window_grid((200, 200), 128, 32)  # 4 windows: 2 batches of 2
    expected = []
    for start in (0, 2):
        chunk = windows[start : start + 2]
        samples = [cut_window(DetectionSample(scene.image, scene.boxes, "s", "scene"), w, 0.3) for w in chunk]
        window_batch = collate(samples)
        window_batch.sampling_keys = [f"5@{x0},{y0},{x1},{y1}" for x0, y0, x1, y1 in chunk]
        with torch.no_grad():
            _, losses = model(window_batch, need_proposals=False)
        expected.append(losses)
    assert len(targets[0].losses) == 2 and [count for count, _ in targets[0].losses] == [2, 2]
    for key in ("loss_rpn_cls", "loss_rpn_reg"):
        torch.testing.assert_close(got[key], (expected[0][key] + expected[1][key]) / 2)
        assert float(got[key]) > 0


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    def peak_kb():  # VmHWM: this process's own peak (ru_maxrss starts at the forking parent's)
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    from lightning_rpn.training.module import RPNModule
    from lightning_rpn.data.transforms import ResizePolicy
    side = int(sys.argv[1])
    model = RPNModule(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)), post_nms_top_n_test=1000,
                      sliding_window={"size": 256, "overlap": 32, "window_batch": 2}).eval()
    image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8)
    model.predict_images(image[:, :256, :256], resize=ResizePolicy())  # warm-up: allocator pools, kernels
    before = peak_kb()
    out = model.predict_images(image, resize=ResizePolicy())
    after = peak_kb()
    print(json.dumps({"peak_increase_mb": (after - before) / 1024, "proposals": len(out["boxes"])}))
""")


def test_predict_images_memory_is_bounded_by_the_window_batch() -> None:
    side = 2048  # 12 MB of pixels; whole at once it peaks 300 MB above them (bench_large_images.py)
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(side)], capture_output=True, text=True,
                            timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["proposals"] == 1000
    # the image copies (HWC array, padded batch) are ~25 MB; windows of 2 x 256^2 need little more
    assert measured["peak_increase_mb"] < 150, measured


def test_windows_and_tiles_do_not_import_lightning() -> None:
    code = ("import sys\nfrom lightning_rpn import SlidingWindowConfig, sliding_window_proposals\n"
            "from lightning_rpn.data.tiles import TiledDataset\n"
            "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
