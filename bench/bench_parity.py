"""Training parity with torchvision's RPN, step by step, on the dense-scene training batches.

The full version of ``tests/test_training_parity.py``: ``configs/scenes.yaml``'s model and data
(ResNet-18 FPN from scratch, random 256-px crops of dense scenes, worker-side targets, AdamW
with warm-up + cosine, gradient-norm clip 10) trained through Lightning, the same batches
replayed through torchvision's ``RegionProposalNetwork`` in a plain loop from the same initial
weights, with our sampled anchors injected into torchvision's sampler
(:func:`lightning_rpn.training.torchvision_reference.compare_training`).

Two runs: our recipe set equal to torchvision's (smooth L1 beta 1/9, contiguous memory
format), where every quantity must agree to float tolerance, then our defaults (L1 box loss,
channels-last), which shows what each default changes. Prints the worst difference of every
quantity over all steps.

    .venv/bin/python bench/bench_parity.py --steps 40
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import seed_everything

from lightning_rpn import RPNDataModule, RPNModule
from lightning_rpn.training.torchvision_reference import compare_training

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "scenes.yaml"
EQUAL = {"box_loss": "smooth_l1", "smooth_l1_beta": 1 / 9, "channels_last": False}


def _run(steps: int, overrides: dict, seed: int) -> dict[str, float]:
    config = yaml.safe_load(CONFIG.read_text())
    model = {**config["model"], **overrides}
    data = {**config["data"], "num_workers": 0}
    seed_everything(seed)
    module = RPNModule(**model)
    report = compare_training(module, RPNDataModule(**data), steps=steps,
                              gradient_clip_val=config["trainer"]["gradient_clip_val"])
    return report.worst()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    equal = _run(options.steps, EQUAL, options.seed)
    defaults = _run(options.steps, {}, options.seed)
    print(f"\nworst difference over {options.steps} steps (counts for discrete quantities, "
          f"relative max |ours - torchvision| for the others)")
    print(f"{'quantity':<22}{'recipes set equal':>20}{'our defaults':>20}")
    for key in equal:
        print(f"{key:<22}{equal[key]:>20.3g}{defaults[key]:>20.3g}")
    exact = ("anchors", "labels_differ", "matched_boxes", "sampled_differ", "regression_targets")
    ok = all(equal[key] == 0 for key in exact) and all(
        value < 1e-4 for key, value in equal.items() if key not in exact)
    print("\nrecipes set equal:", "identical within float tolerance" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
