"""merge_proposal_parts reads the per-rank part files one record at a time: the proposal files it
feeds are the same bytes as from all records in memory, and the merge holds a few numbers per image."""

from __future__ import annotations

import math
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from lightning_rpn.evaluation.proposal_files import (
    merge_proposal_parts,
    write_coco_proposals,
    write_detectron2_proposals,
)


def _write_parts(folder: Path, images: int, proposals: int) -> list[Path]:
    """Two ranks of a DistributedSampler over ``images`` images (rank 1 pads with image 0); every 7th
    image has no dataset index, every 3rd no logits; ids alternate int / str."""
    rng = np.random.default_rng(0)
    parts = [folder / "rank0.pkl", folder / "rank1.pkl"]
    handles = [path.open("wb") for path in parts]
    for position, image in enumerate([*range(images), 0]):
        boxes = rng.uniform(0, 100, (proposals, 4)).astype(np.float32)
        boxes[:, 2:] += boxes[:, :2]
        logits = np.sort(rng.normal(size=proposals).astype(np.float32))[::-1].copy()
        scores = (1 / (1 + np.exp(-logits))).astype(np.float32)
        index = None if image % 7 == 5 else image
        image_id = f"im{image}" if image % 2 else image
        pickle.dump((index, image_id, boxes, scores, logits if image % 3 else None), handles[position % 2],
                    protocol=pickle.HIGHEST_PROTOCOL)
    for handle in handles:
        handle.close()
    return parts


def _all_records_in_memory(parts: list[Path]) -> list[dict[str, Any]]:
    """The merge as it was: every record loaded, first copy of an id kept, indexed ones first."""
    seen: dict[Any, tuple[float, int, dict[str, Any]]] = {}
    arrival = 0
    for path in parts:
        with path.open("rb") as handle:
            while True:
                try:
                    index, image_id, boxes, scores, logits = pickle.load(handle)
                except EOFError:
                    break
                if image_id not in seen:
                    record = {"image_id": image_id, "boxes": boxes, "scores": scores, "objectness_logits": logits}
                    seen[image_id] = (math.inf if index is None else float(index), arrival, record)
                arrival += 1
    return [record for _, _, record in sorted(seen.values(), key=lambda item: item[:2])]


def test_streamed_merge_writes_the_same_files_as_all_records_in_memory(tmp_path: Path) -> None:
    parts = _write_parts(tmp_path, images=12, proposals=5)
    merged = merge_proposal_parts(parts)
    expected = _all_records_in_memory(parts)
    assert len(merged) == 12
    assert [r["image_id"] for r in merged] == [r["image_id"] for r in expected]
    assert merged[0]["image_id"] == 0 and merged[-1]["image_id"] == expected[-1]["image_id"]
    assert [r["image_id"] for r in merged[1:3]] == [r["image_id"] for r in expected[1:3]]
    for name, write in (("coco.json", write_coco_proposals), ("d2.pkl", write_detectron2_proposals)):
        streamed, loaded = write(tmp_path / f"streamed_{name}", merged), write(tmp_path / f"loaded_{name}", expected)
        assert streamed.read_bytes() == loaded.read_bytes()
    # the result can be read again (ProposalWriter writes each format from it)
    assert [r["image_id"] for r in merged] == [r["image_id"] for r in expected]


def test_merge_and_coco_write_hold_one_image_at_a_time(tmp_path: Path) -> None:
    # 150 images x 1000 proposals: 3.6 MB of boxes, scores and logits in the part files
    parts = _write_parts(tmp_path, images=150, proposals=1000)
    part_bytes = sum(path.stat().st_size for path in parts)
    tracemalloc.start()
    try:
        merged = merge_proposal_parts(parts)
        write_coco_proposals(tmp_path / "coco.json", merged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < part_bytes / 8, f"merge + COCO write peaked at {peak} bytes for {part_bytes} bytes of parts"
