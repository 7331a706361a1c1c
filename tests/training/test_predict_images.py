"""RPNModule.predict_images: every image form a user passes, one image or many, the training resize."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import lightning_rpn.training.predict as predict_module
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import ResizePolicy
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.module import RPNModule

TINY = dict(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)), warmup_steps=2,
            pre_nms_top_n_test=300, post_nms_top_n_test=100)


@pytest.fixture(scope="module")
def model() -> RPNModule:
    torch.manual_seed(0)
    return RPNModule(**TINY).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return SyntheticShapes(1, min_size=56, max_size=72, max_shapes=3, split="predict-images")[0].image


def _same(a: dict, b: dict) -> None:
    assert set(a) == {"boxes", "scores", "objectness_logits"} and a["boxes"].shape[0] > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_every_image_form_gives_the_same_proposals(model: RPNModule, image: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "shape.png"
    Image.fromarray(image).save(path)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    forms = {
        "str path": str(path),  # was read one character at a time
        "Path": path,
        "PIL": Image.fromarray(image),  # was refused
        "PIL RGBA": Image.fromarray(image).convert("RGBA"),
        "uint8 tensor": chw,
        "float tensor 0..1": chw.float() / 255,  # torchvision's input; was refused
        "float64 tensor": chw.double() / 255,
        "uint8 array": image,
        "float array 0..1": image.astype(np.float32) / 255,
        "RGBA array": np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2),
    }
    reference = model.predict_images(image)  # one item: one result
    assert isinstance(reference, dict)
    for name, form in forms.items():
        result = model.predict_images(form)
        assert isinstance(result, dict), name
        _same(result, reference)
    listed = model.predict_images(list(forms.values()), batch_size=3)
    assert isinstance(listed, list) and len(listed) == len(forms)
    for result in listed:
        _same(result, reference)
    batched = model.predict_images(torch.stack([chw.float() / 255] * 2))  # [B, 3, H, W]
    assert len(batched) == 2
    _same(batched[1], reference)


def test_grayscale_images_are_replicated_to_rgb(model: RPNModule, image: np.ndarray) -> None:
    gray = image[:, :, 0]
    expected = model.predict_images(np.repeat(gray[:, :, None], 3, axis=2))
    for form in (gray, torch.from_numpy(gray)[None], Image.fromarray(gray)):
        _same(model.predict_images(form), expected)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.rand(3, 40, 40) * 255, ValueError, r"image 0 is a float \[C, H, W\] image with values in \[.*\]; "
                                                  r"float images must be in 0..1"),
        (np.zeros((40, 40, 2), np.uint8), ValueError, r"image 0 has shape \(40, 40, 2\); expected H x W x C"),
        (torch.zeros(40, 40, 3, dtype=torch.uint8), ValueError, r"shape \(40, 40, 3\); expected \[C, H, W\]"),
        (np.zeros((40, 40, 3), np.int32), TypeError, r"dtype int32; expected uint8 \(0..255\) or float \(0..1\)"),
        (3.5, TypeError, "image 0 is a float; expected a path, a PIL image"),
    ],
)
def test_bad_images_are_named(model: RPNModule, bad: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        model.predict_images([bad])


def test_missing_file_is_named(model: RPNModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        model.predict_images(str(tmp_path / "nope.jpg"))


def test_default_resize_is_the_training_datas_also_after_loading(image: np.ndarray, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = RPNModule(**TINY)
    assert model.resize_policy is None
    data = RPNDataModule(synthetic_train_images=2, synthetic_val_images=1, synthetic_min_size=48,
                         synthetic_max_size=64, batch_size=2, num_workers=0, resize="fixed", fixed_size=[96, 96])
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    fixed = ResizePolicy("fixed", fixed_size=(96, 96))
    assert model.resize_policy == fixed
    default = model.predict_images(image)
    _same(default, model.predict_images(image, resize=fixed))
    unresized = model.predict_images(image, resize=ResizePolicy())
    assert not torch.equal(default["boxes"], unresized["boxes"])

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = RPNModule.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)
    assert loaded.resize_policy == fixed
    _same(loaded.predict_images(image), default)


def test_images_are_decoded_a_batch_at_a_time(model: RPNModule, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory follows the batch, not the list: every image was decoded before the first
    prediction (+80 MB per 6000 x 4000 image in the list); the proposals stay the same."""
    images = [item.image for item in SyntheticShapes(5, min_size=64, max_size=64, max_shapes=3, split="lazy")]
    expected = [model.predict_images(image) for image in images]
    decoded: list[int] = []
    decoded_at_step: list[list[int]] = []
    decode, step = predict_module.as_hwc_uint8, model.predict_step

    def counted_decode(image, index, *caller):
        decoded.append(index)
        return decode(image, index, *caller)

    def noted_step(batch, batch_idx):
        decoded_at_step.append(list(decoded))
        return step(batch, batch_idx)

    monkeypatch.setattr(predict_module, "as_hwc_uint8", counted_decode)
    monkeypatch.setattr(model, "predict_step", noted_step)
    results = model.predict_images(images, batch_size=2)
    assert decoded_at_step == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert len(results) == 5
    for result, alone in zip(results, expected):
        _same(result, alone)
