"""The data module's anchor setup, declared once on the model: taken from it, a disagreement named.

The worker-side targets need what the model's RPN uses: the anchor generator, the target
config, the box coder, the size divisibility and the sampling seed. :func:`agree_with_model`
takes each from the model; a value the data module was given as well must agree (equal anchors,
equal settings, a multiple of the model's size divisibility), else a ``ValueError`` names both.
:class:`AnchorSetting` keeps what the user gave apart from what is in use, so that a data module
reused for another model resolves from the user's values, never from the previous model's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.proposer import RegionProposer
from lightning_rpn.core.targets import AnchorTargetConfig

__all__ = ["AnchorSetting", "AnchorSetup", "agree_with_model"]


@dataclass(frozen=True)
class AnchorSetup:
    """What the collate needs to compute anchor targets (``None``: not known yet)."""

    anchor_generator: AnchorGenerator | None = None
    target_config: AnchorTargetConfig | None = None
    box_coder: BoxCoder | None = None
    size_divisibility: int | None = None
    sampling_seed: int | None = None


class AnchorSetting:
    """One value of a data module's anchor setup (``anchor_generator``, ``sampling_seed``, ...).

    Reading gives the value in use (``owner.anchor_setup``): the model's once the data module is
    attached to one. Assigning gives the user's own (``owner.given_anchor_setup``, also in use until
    the next model is attached), which every model must agree with. Keeping the two apart lets one
    data module serve several models in turn: each resolves from what the user gave.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.anchor_setup, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.given_anchor_setup = replace(obj.given_anchor_setup, **{self.name: value})
        obj.anchor_setup = replace(obj.anchor_setup, **{self.name: value})


def _same_anchors(a: AnchorGenerator, b: AnchorGenerator) -> bool:
    """Whether two generators produce the same anchors (strides, layout and cell anchors)."""
    if a is b:
        return True
    if a.strides != b.strides or a.anchor_stride != b.anchor_stride or a.offset != b.offset:
        return False
    cells_a, cells_b = a.cell_anchors, b.cell_anchors
    return len(cells_a) == len(cells_b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(cells_a, cells_b)
    )


def _same_setting(a: object, b: object) -> bool:
    """Equal dataclasses (target config) or equal attribute dicts (box coder)."""
    if a is b or a == b:
        return True
    return type(a) is type(b) and vars(a) == vars(b)


def _describe_anchors(g: AnchorGenerator) -> str:
    return (f"AnchorGenerator(sizes={g.sizes}, aspect_ratios={g.aspect_ratios}, strides={g.strides}, "
            f"offset={g.offset}, anchor_stride={g.anchor_stride})")


def _proposer(module: Any) -> Any:
    """The model's proposal network: its ``rpn``, else its one ``RegionProposer`` submodule (a
    user's module may name it otherwise); ``None`` when there is none or several."""
    named = getattr(module, "rpn", None)
    if named is not None:
        return named
    found = [m for m in module.modules() if isinstance(m, RegionProposer)] if isinstance(module, nn.Module) else []
    return found[0] if len(found) == 1 else None


def _model_value(module: Any, proposer: Any, name: str) -> Any:
    """``module.{name}`` (``RPNModule`` exposes its RPN's), else its proposal network's."""
    value = getattr(module, name, None)
    return getattr(proposer, name, None) if value is None else value


def agree_with_model(ours: AnchorSetup, module: Any) -> AnchorSetup:
    """``ours`` with every value the model ``module`` has taken from it; a disagreement is a ``ValueError``.

    Each value is the module's attribute, else its proposal network's (``module.rpn``, or its one
    ``RegionProposer``): a user's module that exposes only the anchors still gets its RPN's
    target rule in the workers. The sampling seed is the model RPN's ``seed`` unless ``ours``
    sets one; a size divisibility of ours stays when it is a multiple of the model's.
    """
    setup = ours
    proposer = _proposer(module)
    model_anchors = _model_value(module, proposer, "anchor_generator")
    if model_anchors is not None:
        if ours.anchor_generator is not None and not _same_anchors(ours.anchor_generator, model_anchors):
            raise ValueError(
                "RPNDataModule: data.anchor_generator "
                f"{_describe_anchors(ours.anchor_generator)} disagrees with the model's "
                f"{_describe_anchors(model_anchors)}; leave it unset to use the model's"
            )
        setup = replace(setup, anchor_generator=model_anchors)
    for name in ("target_config", "box_coder"):
        model_value = _model_value(module, proposer, name)
        value = getattr(ours, name)
        if model_value is None:
            continue
        if value is not None and not _same_setting(value, model_value):
            raise ValueError(f"RPNDataModule: data.{name}={vars(value)!r} disagrees with the model's "
                             f"{vars(model_value)!r}; leave it unset to use the model's")
        setup = replace(setup, **{name: model_value})
    model_div = getattr(module, "size_divisibility", None)
    if model_div is not None:
        if ours.size_divisibility is None:
            setup = replace(setup, size_divisibility=int(model_div))
        elif ours.size_divisibility % int(model_div):
            raise ValueError(f"RPNDataModule: data.size_divisibility={ours.size_divisibility} is not a "
                             f"multiple of the model's size_divisibility={int(model_div)}")
    model_seed = getattr(proposer, "seed", None)
    if ours.sampling_seed is None and model_seed is not None:
        setup = replace(setup, sampling_seed=int(model_seed))
    return setup
