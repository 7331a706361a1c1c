"""Windowed reads of one large image: peak memory and time, read by window vs decoded whole.

One generated ``--side`` x ``--side`` RGB image (smooth gradients plus noise, so PNG and JPEG
compress it as they would a photo) is written as ``.npy``, uncompressed TIFF, BMP, PNG, JPEG
and deflate-compressed TIFF. Each case runs in a fresh process that reads ``--windows`` random
``--window``-px windows (the same ones in every case) and reports its peak resident memory
(``VmHWM``) above what it held before the first read, and the mean time per window:

- ``whole``: ``load_rgb_image`` once (the decoded image, as the tile cache holds it), then crops;
- ``pil-crop``: ``Image.open(path).crop(window)``, what PIL does for a crop (does it decode less?);
- ``map``: ``raster_layout(path).read(window)`` (``None`` for formats without a raw layout);
- ``tiles-whole`` / ``tiles-map``: the user path, ``TiledDataset`` over a one-image COCO split
  with ``window_reads: never`` (``cache_mb`` above the image: decoded once, cached) and
  ``auto`` (``cache_mb: 256``, below the image: read by window).

    .venv/bin/python bench/bench_window_reads.py [--side 10000] [--window 512] [--windows 20]
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {"npy": "image.npy", "tiff": "image.tif", "bmp": "image.bmp", "png": "image.png", "jpeg": "image.jpg",
           "tiff-deflate": "image_deflate.tif"}


def _peak_kb() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def _windows(side: int, window: int, count: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(0)
    starts = rng.integers(0, side - window, size=(count, 2))
    return [(int(x), int(y), int(x) + window, int(y) + window) for x, y in starts]


def _write(folder: Path, side: int) -> None:
    """The test image in every format, and a one-image COCO split over the ``.npy`` and TIFF files."""
    rows = np.arange(side, dtype=np.float32)[:, None]
    cols = np.arange(side, dtype=np.float32)[None, :]
    rng = np.random.default_rng(1)
    image = np.empty((side, side, 3), dtype=np.uint8)
    for channel, period in enumerate((700.0, 1100.0, 1900.0)):
        smooth = 127 + 60 * np.sin(rows / period) + 60 * np.cos(cols / (period * 0.7))
        image[:, :, channel] = np.clip(smooth + rng.normal(0, 8, (side, side)), 0, 255).astype(np.uint8)
    np.save(folder / FORMATS["npy"], image)
    pil = Image.fromarray(image)
    pil.save(folder / FORMATS["tiff"])
    pil.save(folder / FORMATS["bmp"])
    pil.save(folder / FORMATS["png"], compress_level=1)
    pil.save(folder / FORMATS["jpeg"], quality=90)
    pil.save(folder / FORMATS["tiff-deflate"], compression="tiff_deflate")
    for name in ("npy", "tiff"):
        entry = {"id": 1, "file_name": FORMATS[name], "height": side, "width": side}
        annotations = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 40, 40]}]
        (folder / f"coco_{name}.json").write_text(json.dumps(
            {"images": [entry], "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}))


def _case(folder: Path, fmt: str, method: str, side: int, window: int, count: int) -> dict[str, float]:
    """Run in a child process: one format, one reading method."""
    from lightning_rpn.data.coco import COCODetection
    from lightning_rpn.data.image_io import load_rgb_image, raster_layout, to_rgb_uint8
    from lightning_rpn.data.tiles import TileConfig, TiledDataset

    path = folder / FORMATS[fmt]
    windows = _windows(side, window, count)
    if method.startswith("tiles"):
        mapped = method == "tiles-map"
        config = TileConfig(size=window, per_epoch=count, box_probability=0.0,
                            window_reads="auto" if mapped else "never", cache_mb=256.0 if mapped else 4096.0)
        tiled = TiledDataset(COCODetection(folder, folder / f"coco_{fmt}.json"), config)
        read = lambda i: tiled[i].image  # noqa: E731 - one reader per case
    elif method == "whole":
        decoded: list[np.ndarray] = []

        def read(i: int) -> np.ndarray:  # decoded once, then cropped (what the tile cache does)
            if not decoded:
                decoded.append(load_rgb_image(path))
            x0, y0, x1, y1 = windows[i]
            return np.array(decoded[0][y0:y1, x0:x1])
    elif method == "pil-crop":
        def read(i: int) -> np.ndarray:
            with Image.open(path) as image:
                return to_rgb_uint8(image.crop(windows[i]))
    else:
        layout = raster_layout(path)
        if layout is None:
            return {"peak_mb": float("nan"), "ms_per_window": float("nan"), "supported": False}
        read = lambda i: layout.read(windows[i])  # noqa: E731
    before = _rss_kb()
    start = time.perf_counter()
    pixels = [read(i).sum(dtype=np.int64) for i in range(count)]  # keep nothing but a checksum
    elapsed = time.perf_counter() - start
    return {"peak_mb": (_peak_kb() - before) / 1024, "ms_per_window": 1000 * elapsed / count,
            "checksum": int(sum(pixels)), "supported": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=10000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--case", nargs=3, metavar=("FOLDER", "FORMAT", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        folder, fmt, method = args.case
        print(json.dumps(_case(Path(folder), fmt, method, args.side, args.window, args.windows)))
        return
    image_mb = args.side * args.side * 3 / 2**20
    print(f"image {args.side}x{args.side} RGB = {image_mb:.0f} MB decoded; {args.windows} windows of {args.window} px")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write(folder, args.side)
        cases = [(fmt, method) for fmt in FORMATS for method in ("whole", "pil-crop", "map")]
        cases += [(fmt, method) for fmt in ("npy", "tiff") for method in ("tiles-whole", "tiles-map")]
        results = []
        for fmt, method in cases:
            if fmt == "npy" and method == "pil-crop":
                continue  # not a PIL format
            command = [sys.executable, __file__, "--side", str(args.side), "--window", str(args.window),
                       "--windows", str(args.windows), "--case", tmp, fmt, method]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            size_mb = (folder / FORMATS[fmt]).stat().st_size / 2**20
            results.append({"format": fmt, "method": method, "file_mb": round(size_mb, 1), **result})
            shown = "no raw layout" if not result["supported"] else (
                f"peak {result['peak_mb']:8.1f} MB above start, {result['ms_per_window']:7.1f} ms/window")
            print(f"{fmt:13s} {method:12s} file {size_mb:7.1f} MB  {shown}", flush=True)
        checks = {r["checksum"] for r in results if r["supported"] and not r["method"].startswith("tiles")
                  and r["format"] in ("npy", "tiff", "bmp", "png", "tiff-deflate")}
        print(f"lossless formats give the same pixels in every case: {len(checks) == 1}")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
