"""Time reading a COCO instances file at train2017's scale: ``COCODetection`` against pycocotools.

A generated file (seeded) with as many images and box annotations as COCO train2017 (118,287
images, 860,001 annotations by default; no segmentations, so the JSON is smaller than COCO's and
its decoding, common to both, faster), every box inside its image. Both read the same file in
one process, each once per repeat, the order alternating:

- pycocotools: ``COCO(path)``: JSON decoding and its indexes (what torchvision's
  ``CocoDetection`` does first);
- ours: ``COCODetection(images_root, path)``: JSON decoding, then every image entry and
  annotation checked (ids, categories, bbox, iscrowd), every box checked against its image size
  and converted to float32 xyxy (what ``fit`` / ``validate`` / ``check-data`` do at setup; no
  image file is opened).

Prints the seconds of each (the best of the repeats) and the ratio ours / pycocotools.

Run: ``python bench/bench_coco_load.py [--images 118287] [--annotations 860001] [--repeats 2]``
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import contextlib
import io
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pycocotools.coco import COCO

from lightning_rpn.data.coco import COCODetection

IMAGE_W, IMAGE_H = 640, 480


def write_instances(path: Path, images: int, annotations: int, seed: int) -> None:
    """A COCO instances file of ``images`` 640x480 entries and ``annotations`` boxes inside them."""
    draw = random.Random(seed)
    entries = [{"id": i, "file_name": f"{i:012d}.jpg", "width": IMAGE_W, "height": IMAGE_H} for i in range(images)]
    boxes = []
    for index in range(annotations):
        x, y = draw.uniform(0, IMAGE_W - 4), draw.uniform(0, IMAGE_H - 4)
        w, h = draw.uniform(2, IMAGE_W - x), draw.uniform(2, IMAGE_H - y)
        boxes.append({"id": index, "image_id": draw.randrange(images), "category_id": 1 + index % 80,
                      "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
                      "iscrowd": 0})
    categories = [{"id": c, "name": f"category {c}"} for c in range(1, 81)]
    path.write_text(json.dumps({"images": entries, "annotations": boxes, "categories": categories}))


def seconds(load: Callable[[], object]) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        load()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--annotations", type=int, default=860_001)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.images, args.annotations, args.repeats) < 1:
        parser.error("--images, --annotations and --repeats must be at least 1")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "instances.json"
        write_instances(path, args.images, args.annotations, args.seed)
        print(f"{args.images} images, {args.annotations} annotations, {path.stat().st_size / 1e6:.0f} MB of JSON")
        loaders = {"pycocotools COCO(path)": lambda: COCO(str(path)),
                   "ours COCODetection(root, path)": lambda: COCODetection(Path(folder) / "images", path)}
        best = {name: float("inf") for name in loaders}
        for repeat in range(args.repeats):
            for name in list(loaders)[:: 1 if repeat % 2 == 0 else -1]:
                best[name] = min(best[name], seconds(loaders[name]))
    for name, value in best.items():
        print(f"{name:32s} {value:6.2f} s")
    ours, theirs = best["ours COCODetection(root, path)"], best["pycocotools COCO(path)"]
    print(f"ours / pycocotools: {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
