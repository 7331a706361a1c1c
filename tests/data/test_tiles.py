"""Tiled training data: window draws (images, positions, boxes, visibility), determinism, cache, windowed reads,
data module."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_rpn.core.config import SettingError
from lightning_rpn.core.windows import window_starts
from lightning_rpn.data import annotated
from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.image_io import load_rgb_image, raster_layout, read_image_size, verify_image
from lightning_rpn.data.problems import DataError, Problem
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.scenes import DenseScenes
from lightning_rpn.data.tiles import (
    ImageCache, TileConfig, TiledDataset, WindowSampler, boxes_no_window_keeps, cut_window,
)
from lightning_rpn.training.datamodule import RPNDataModule
from helpers.rpn_probes import in_model_anchor_labels


class Images(Dataset):
    """Blank images of the given ``(h, w)`` sizes with the given boxes; counts its loads."""

    def __init__(self, sizes: list[tuple[int, int]], boxes: list[list[list[float]]]) -> None:
        self.sizes, self.boxes, self.loads = sizes, boxes, Counter()

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> DetectionSample:
        self.loads[index] += 1
        h, w = self.sizes[index]
        image = np.full((h, w, 3), index, dtype=np.uint8)
        return DetectionSample(image=image, boxes=np.asarray(self.boxes[index], np.float32).reshape(-1, 4),
                               image_id=index, source=f"images/{index}")


def _sample(boxes: list[list[float]], crowd: list[list[float]] = ()) -> DetectionSample:
    return DetectionSample(image=np.zeros((100, 200, 3), np.uint8), boxes=np.asarray(boxes, np.float32),
                           crowd_boxes=np.asarray(crowd, np.float32).reshape(-1, 4), image_id=7, source="x.png")


def test_config_errors_name_the_key() -> None:
    # SettingErrors: the CLI prints each as one line (a bad value was a 59-line traceback, exit 1)
    with pytest.raises(SettingError, match=r"data.tiles: unknown key\(s\) \['sise'\]"):
        TileConfig.from_mapping({"sise": 256, "per_epoch": 4})
    with pytest.raises(SettingError, match="data.tiles needs per_epoch"):
        TileConfig.from_mapping({"size": 256})
    with pytest.raises(SettingError, match=r"data.tiles.overlap=256 must be null or an int in \[0, size=256\)"):
        TileConfig(size=256, per_epoch=4, overlap=256)
    with pytest.raises(SettingError, match="data.tiles.weighting='files'"):
        TileConfig(size=256, per_epoch=4, weighting="files")  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="data.tiles.box_probability=2"):
        TileConfig(size=256, per_epoch=4, box_probability=2)
    with pytest.raises(SettingError, match="data.tiles.size"):
        RPNDataModule(tiles={"size": 8, "per_epoch": 4})


def test_cut_boxes_follow_min_visibility_and_are_counted() -> None:
    sample = _sample([[10, 10, 30, 30],     # inside
                      [90, 10, 130, 30],    # 25% inside: removed at 0.3, counted
                      [80, 40, 120, 60],    # half inside: kept, clipped
                      [150, 10, 190, 30]],  # wholly outside: left out, not counted
                     crowd=[[95, 0, 150, 50]])
    window = cut_window(sample, (0, 0, 100, 100), min_visibility=0.3)
    np.testing.assert_array_equal(window.boxes, [[10, 10, 30, 30], [80, 40, 100, 60]])
    np.testing.assert_array_equal(window.crowd_boxes, [[95, 0, 100, 50]])
    assert window.removed_boxes == 1 and window.image_size == (100, 100) == window.original_size
    assert window.image_id == "7@0,0,100,100" and "window (x0, y0, x1, y1) = (0, 0, 100, 100)" in window.source
    # in window pixels
    shifted = cut_window(sample, (50, 0, 150, 100), min_visibility=0.3)
    np.testing.assert_array_equal(shifted.boxes, [[40, 10, 80, 30], [30, 40, 70, 60]])
    assert shifted.removed_boxes == 0


def test_windows_are_deterministic_per_seed_epoch_and_index_in_any_worker() -> None:
    scenes = DenseScenes(3, size=160, density=400.0, min_object_size=10, max_object_size=24)
    config = TileConfig(size=64, per_epoch=6)
    first, again = TiledDataset(scenes, config, seed=1), TiledDataset(scenes, config, seed=1)
    draws = [first.window(i) for i in range(12)]  # epochs 0 and 1
    assert draws == [again.window(i) for i in range(12)]
    assert draws[:6] != draws[6:], "a new epoch draws new windows"
    assert draws != [TiledDataset(scenes, config, seed=2).window(i) for i in range(12)]
    sampler = WindowSampler(config.per_epoch)
    sampler.set_epoch(1)
    assert list(sampler) == list(range(6, 12)) and len(sampler) == 6
    assert list(sampler) == list(range(12, 18))  # a pass that no set_epoch came before: the next epoch
    sampler.set_epoch(1)
    ranks = [WindowSampler(6, num_replicas=4, rank=r) for r in range(4)]  # DDP: equal shares, all windows
    assert [list(r) for r in ranks] == [[0, 4], [1, 5], [2, 0], [3, 1]]
    loader = DataLoader(first, sampler=sampler, batch_size=2, num_workers=2, collate_fn=list)
    items = [item for batch in loader for item in batch]
    for index, item in zip(range(6, 12), items):
        expected = first[index]
        assert item.image_id == expected.image_id
        np.testing.assert_array_equal(item.image, expected.image)
        np.testing.assert_array_equal(item.boxes, expected.boxes)


def test_weighting_by_area_boxes_or_uniform() -> None:
    images = Images([(64, 64), (128, 128), (64, 64)], [[[1, 1, 9, 9]], [[1, 1, 9, 9]], []])
    def drawn(weighting: str) -> Counter:
        tiled = TiledDataset(images, TileConfig(size=32, per_epoch=2000, weighting=weighting))  # type: ignore[arg-type]
        return Counter(tiled.window(i)[0] for i in range(2000))
    area = drawn("area")  # 1 : 4 : 1
    assert 0.60 < area[1] / 2000 < 0.73 and 0.12 < area[0] / 2000 < 0.21
    boxes = drawn("boxes")  # the empty image is never drawn
    assert boxes[2] == 0 and 0.4 < boxes[0] / 2000 < 0.6
    uniform = drawn("uniform")
    assert all(0.28 < uniform[i] / 2000 < 0.39 for i in range(3))
    with pytest.raises(ValueError, match="weighting='boxes': split 'train' has no boxes"):
        TiledDataset(Images([(64, 64)], [[]]), TileConfig(size=32, per_epoch=2, weighting="boxes")).window(0)


def test_weights_of_images_the_annotation_gives_no_size_come_from_file_headers(tmp_path: Path, monkeypatch) -> None:
    """Area and box-count weights read each file's header, not its pixels (a whole decode of every
    image, orthophotos included, before the first window); boxes are counted as decoding checks them."""
    sizes = [(90, 120), (200, 150), (64, 64)]
    images, annotations = [], []
    for index, (h, w) in enumerate(sizes):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / f"{index}.png")
        images.append({"id": index + 1, "file_name": f"{index}.png"})  # no height / width
        for bbox in ([2, 2, 20, 20], [5, 5, 10, 10], [300, 300, 10, 10])[: index + 1]:  # image 3's last: outside
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "bbox": bbox, "category_id": 1})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": [{"id": 1, "name": "object"}]}))
    coco = COCODetection(tmp_path, tmp_path / "ann.json", on_bad_annotation="skip")
    assert not any(record.checked for record in coco.records)
    monkeypatch.setattr(annotated, "load_rgb_image", _no_decoding)
    area = TiledDataset(coco, TileConfig(size=32, per_epoch=4, weighting="area")).image_weights()
    np.testing.assert_allclose(area, np.array([h * w for h, w in sizes]) / sum(h * w for h, w in sizes))
    boxes = TiledDataset(coco, TileConfig(size=32, per_epoch=4, weighting="boxes")).image_weights()
    np.testing.assert_allclose(boxes, [0.2, 0.4, 0.4])  # 1, 2, 2: the box outside image 3 is skipped
    monkeypatch.undo()
    decoded = [len(coco[i].boxes) for i in range(3)]
    assert decoded == [1, 2, 2], "the same counts as the decode"


def test_boxes_no_window_can_keep_are_named_once_with_their_image() -> None:
    boxes = np.array([[0, 0, 160, 160], [0, 0, 90, 90], [0, 0, 250, 30], [0, 0, 200, 30], [5, 5, 5, 40]], np.float32)
    assert boxes_no_window_keeps(boxes, (256, 256), 64, 0.3).tolist() == [True, False, True, False, False]
    assert not boxes_no_window_keeps(boxes[:2], (256, 256), 64, 0.0).any()  # min_visibility 0 keeps any part
    assert not boxes_no_window_keeps(boxes[1:2], (100, 100), 128, 0.9).any()  # the image is one window
    images = Images([(256, 256), (256, 256)], [[[10, 10, 170, 170], [200, 200, 220, 220]], [[10, 10, 100, 100]]])
    tiled = TiledDataset(images, TileConfig(size=64, per_epoch=40, box_probability=1.0), min_visibility=0.3)
    items = [tiled[i] for i in range(40)]
    assert {item.image_id.split("@")[0] for item in items} == {"0", "1"}
    problems = [p for item in items for p in item.problems]  # the image's first window in this process
    assert [(p.kind, p.action, p.file, p.image_id) for p in problems] == [
        ("box_larger_than_window", "skipped", "images/0", 0)]
    assert "1 of its 2 boxes are larger than a window (data.tiles.size=64)" in problems[0].detail
    assert "data.tiles.size >= 160 hold them whole" in problems[0].detail
    big = [item for item in items
           if item.image_id.startswith("0@") and (item.boxes[:, 2:] - item.boxes[:, :2] > 20).any()]
    assert not big and sum(item.removed_boxes for item in items) > 0, "never trained: what the problem says"

    dm = RPNDataModule(dataset="scenes", scene_options={"size": 128, "density": 300.0, "min_object_size": 60,
                                                        "max_object_size": 64},
                       synthetic_train_images=1, synthetic_val_images=1, batch_size=4, num_workers=0,
                       tiles={"size": 32, "per_epoch": 8}, train_transforms=[], min_visibility=0.5)
    dm.setup("fit")
    with pytest.warns(UserWarning, match=r"scenes://.*image 0: 3 of its 5 boxes are larger than a window") as caught:
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)
    assert sum("larger than a window" in str(w.message) for w in caught) == 1, "warned once"
    assert "box_larger_than_window (skipped)" in dm.report()


def test_box_windows_hold_a_whole_box_and_grid_windows_sit_on_the_grid() -> None:
    boxes = [[[200, 40, 230, 70], [20, 300, 60, 330]]]
    images = Images([(400, 400)], boxes)
    tiled = TiledDataset(images, TileConfig(size=100, per_epoch=50, box_probability=1.0))
    for i in range(50):
        _, (x0, y0, x1, y1) = tiled.window(i)
        assert (x1 - x0, y1 - y0) == (100, 100)
        assert any(x0 <= b[0] and b[2] <= x1 and y0 <= b[1] and b[3] <= y1 for b in boxes[0])
        assert len(tiled[i].boxes) >= 1
    grid = TiledDataset(images, TileConfig(size=100, per_epoch=50, overlap=20, box_probability=0.0))
    starts = set(window_starts(400, 100, 20))
    assert starts == {0, 80, 160, 240, 300}
    positions = {grid.window(i)[1][:2] for i in range(50)}
    assert all(x in starts and y in starts for x, y in positions) and len(positions) > 5
    small = TiledDataset(Images([(40, 50)], [[]]), TileConfig(size=100, per_epoch=2))
    assert small[0].image_size == (40, 50), "an image smaller than the window is one window"


def test_images_are_decoded_once_per_process_within_the_cache_budget() -> None:
    images = Images([(64, 64)] * 3, [[]] * 3)
    tiled = TiledDataset(images, TileConfig(size=32, per_epoch=60, weighting="uniform"))
    for i in range(60):
        tiled[i]
    assert max(images.loads.values()) == 1
    tight = Images([(64, 64)] * 3, [[]] * 3)  # budget below one image: decoded whenever the image changes
    tiled = TiledDataset(tight, TileConfig(size=32, per_epoch=20, weighting="uniform", cache_mb=0.001))
    drawn = [tiled.window(i)[0] for i in range(20)]
    tight.loads.clear()
    for i in range(20):
        tiled[i]
    changes = 1 + sum(a != b for a, b in zip(drawn, drawn[1:]))
    assert changes - 1 <= sum(tight.loads.values()) <= changes and changes > 3  # the last drawn may still be held
    cache = ImageCache(max_bytes=2 * 64 * 64 * 3)
    for key in (0, 1, 0, 2):  # 1 is the least recently used when 2 arrives
        cache.put(key, images[key]) if cache.get(key) is None else None
    assert cache.get(1) is None and cache.get(0) is not None and cache.get(2) is not None
    assert cache.bytes == 2 * 64 * 64 * 3 and len(cache) == 2


def test_an_images_load_problems_come_with_its_first_window_only() -> None:
    class WithProblems(Images):
        def __getitem__(self, index: int) -> DetectionSample:
            sample = super().__getitem__(index)
            sample.problems = [Problem("box_outside", "clipped", f"box of image {index}", "a.json", index)]
            return sample

    images = WithProblems([(64, 64), (64, 64)], [[[1, 1, 9, 9]], [[40, 40, 60, 60]]])
    tiled = TiledDataset(images, TileConfig(size=32, per_epoch=40, box_probability=1.0, weighting="uniform"))
    counts = Counter(p.image_id for i in range(40) for p in tiled[i].problems)
    assert counts == {0: 1, 1: 1}


def test_datamodule_epochs_are_windows_with_their_own_sampling_keys() -> None:
    dm = RPNDataModule(dataset="scenes", scene_options={"size": 192, "density": 300.0, "max_object_size": 30},
                       synthetic_train_images=2, synthetic_val_images=1, batch_size=4, num_workers=0,
                       tiles={"size": 64, "per_epoch": 8, "box_probability": 0.5}, train_transforms=[],
                       min_visibility=0.5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WindowSampler)
    epoch0 = list(loader)
    assert len(epoch0) == 2 and all(tuple(b.images.shape[-2:]) == (64, 64) for b in epoch0)
    keys = [k for b in epoch0 for k in b.sampling_keys]
    assert keys == list(range(8))
    loader.sampler.set_epoch(3)
    epoch3 = list(loader)
    assert [k for b in epoch3 for k in b.sampling_keys] == list(range(24, 32))
    assert not torch.equal(epoch0[0].images, epoch3[0].images)
    for batch in epoch0:
        dm.accounting.add_batch("train", batch)
    assert dm.accounting.removed_boxes["train"] == sum(b.removed_boxes for b in epoch0) > 0
    assert len(dm.datasets["val"]) == 1, "validation stays on whole scenes"


def test_window_targets_are_the_same_in_the_workers_and_in_the_model() -> None:
    from lightning_rpn.training.module import RPNModule

    torch.manual_seed(0)
    model = RPNModule(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,))).train()
    dm = RPNDataModule(dataset="scenes", scene_options={"size": 192, "max_object_size": 30},
                       synthetic_train_images=2, batch_size=2, num_workers=0, train_transforms=[],
                       tiles={"size": 64, "per_epoch": 4}, anchor_generator=model.anchor_generator,
                       target_config=model.target_config, box_coder=model.box_coder, sampling_seed=model.rpn.seed)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    dm.collate.set_epoch(2)
    batch = next(iter(loader))
    assert batch.sampling_keys == [8, 9] and batch.sampling_epoch == 2
    assert torch.equal(in_model_anchor_labels(model, batch, sampling_epoch=2), batch.anchor_labels.to(torch.int64))


def _raster_files(root: Path, image: np.ndarray) -> dict[str, Path]:
    """``image`` saved in every format, with a width (61) whose BMP rows are padded."""
    files = {"npy": root / "a.npy", "gray.npy": root / "g.npy"}
    np.save(files["npy"], image)
    np.save(files["gray.npy"], np.ascontiguousarray(image[:, :, 1]))
    for name, suffix, mode, options in (("tif", "tif", "RGB", {}), ("gray.tif", "tif", "L", {}),
                                        ("ppm", "ppm", "RGB", {}), ("pgm", "pgm", "L", {}), ("bmp", "bmp", "RGB", {}),
                                        ("png", "png", "RGB", {}), ("jpg", "jpg", "RGB", {}),
                                        ("deflate.tif", "tif", "RGB", {"compression": "tiff_deflate"})):
        files[name] = root / f"{name.replace('.', '_')}.{suffix}"
        pixels = image if mode == "RGB" else image[:, :, 1]
        Image.fromarray(np.ascontiguousarray(pixels)).save(files[name], **options)
    return files


def test_uncompressed_files_are_read_by_window_with_the_pixels_of_the_whole_decode(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    files = _raster_files(tmp_path, image)
    window = (7, 3, 50, 41)
    for name, path in files.items():
        layout = raster_layout(path)
        assert (layout is None) == (name in ("png", "jpg", "deflate.tif")), name
        whole = load_rgb_image(path)
        assert read_image_size(path) == verify_image(path) == (45, 61)
        if layout is not None:
            np.testing.assert_array_equal(layout.read(window), whole[3:41, 7:50], err_msg=name)
            assert layout.read(window).flags.c_contiguous and layout.read(window).flags.writeable
            assert layout.bottom_up == (name == "bmp")
            assert layout.stride == {"bmp": 184, "gray.tif": 61, "pgm": 61, "gray.npy": 61}.get(name, 183)  # BMP: 4-byte rows
    np.testing.assert_array_equal(load_rgb_image(files["npy"]), image)
    with pytest.raises(ValueError, match=r"window \(0, 0, 62, 10\) is not inside the 61x45"):
        raster_layout(files["npy"]).read((0, 0, 62, 10))
    short = tmp_path / "short.npy"
    short.write_bytes(files["npy"].read_bytes()[:-5])
    assert raster_layout(short) is None and raster_layout(tmp_path / "missing.tif") is None
    with pytest.raises(DataError, match="truncated or unreadable"):
        load_rgb_image(short)
    np.save(tmp_path / "f.npy", image.astype(np.float32))
    with pytest.raises(DataError, match=r"\.npy image has shape \(45, 61, 3\), dtype float32; expected"):
        read_image_size(tmp_path / "f.npy")


@pytest.mark.parametrize("suffix", ["npy", "tif", "bmp"])
def test_windows_read_from_a_file_map_equal_the_decoded_windows(tmp_path: Path, suffix: str, monkeypatch) -> None:
    scenes = DenseScenes(2, size=160, density=400.0, min_object_size=10, max_object_size=24, split="maps")
    images, annotations = [], []
    for index in range(2):
        scene = scenes[index]
        name = f"scene{index}.{suffix}"
        if suffix == "npy":
            np.save(tmp_path / name, scene.image)
        else:
            Image.fromarray(scene.image).save(tmp_path / name)
        images.append({"id": index + 1, "file_name": name, "height": 160, "width": 160})
        for box in scene.boxes:
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "category_id": 1, "iscrowd": int(len(annotations) % 17 == 0)})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": [{"id": 1, "name": "object"}]}))
    coco = COCODetection(tmp_path, tmp_path / "ann.json")

    def draws(window_reads: str, cache_mb: float = 1024.0) -> list[DetectionSample]:
        config = TileConfig(size=64, per_epoch=8, box_probability=0.5, window_reads=window_reads, cache_mb=cache_mb)
        tiled = TiledDataset(coco, config, min_visibility=0.4, seed=3)  # type: ignore[arg-type]
        return [tiled[i] for i in range(16)]  # epochs 0 and 1

    decoded = draws("never")
    monkeypatch.setattr(annotated, "load_rgb_image", _no_decoding)
    for mapped in (draws("always"), draws("auto", cache_mb=0.05)):  # 0.05 MB < one 160 x 160 x 3 image
        for a, b in zip(decoded, mapped, strict=True):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.crowd_boxes, b.crowd_boxes)
            assert (a.image_id, a.source, a.original_size, a.removed_boxes, a.problems) == \
                   (b.image_id, b.source, b.original_size, b.removed_boxes, b.problems)
            assert type(b.image) is np.ndarray and b.image.flags.writeable  # a copy, not the file map
    assert sum(len(s.boxes) for s in decoded) > 0 and sum(s.removed_boxes for s in decoded) > 0
    assert len({s.image_id for s in decoded}) > 8
    with pytest.raises(AssertionError, match="decoded"):
        draws("auto")  # within the budget: decoded (and cached)
    with pytest.raises(ValueError, match="data.tiles.window_reads='sometimes' is not one of auto, always, never"):
        TileConfig(size=64, per_epoch=8, window_reads="sometimes")  # type: ignore[arg-type]


def _no_decoding(path, **kwargs):
    raise AssertionError(f"{path} was decoded whole")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_resumed_inside_an_epoch_trains_the_rest_of_its_windows(tmp_path: Path, workers: int) -> None:
    """With workers, Lightning makes the loader's iterator (and the workers take their first indices)
    before it sets the resumed epoch: the windows still come from the checkpoint's epoch and position."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from helpers.model import quiet_trainer, tiny_model

    class Keys(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[list[int]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append(list(batch.sampling_keys))

    def fit(max_steps: int, ckpt_path: str | None = None, save: bool = False) -> list[list[int]]:
        keys = Keys()
        callbacks = [keys] + ([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)] if save else [])
        dm = RPNDataModule(dataset="scenes", scene_options={"size": 128, "density": 300.0, "max_object_size": 30},
                           synthetic_train_images=2, synthetic_val_images=1, batch_size=2, num_workers=workers,
                           tiles={"size": 64, "per_epoch": 8}, train_transforms=[])
        trainer = quiet_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, callbacks=callbacks,
                                enable_checkpointing=save)
        trainer.fit(tiny_model(), dm, ckpt_path=ckpt_path)
        return keys.seen

    uninterrupted = [[2 * k, 2 * k + 1] for k in range(8)]  # epoch 0: windows 0-7 in four batches; epoch 1: 8-15
    assert fit(5, save=True) == uninterrupted[:5]  # checkpoints after every batch
    for step in (1, 4, 5):  # inside epoch 0, after its last batch, inside epoch 1
        resumed = fit(8, ckpt_path=str(next(tmp_path.glob(f"*step={step}.ckpt"))))
        assert resumed == uninterrupted[step:], step  # was windows 0-5 of epoch 0 again with a worker
