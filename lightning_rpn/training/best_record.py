"""A ``ModelCheckpoint``'s best and k-th best, derived from its scores as Lightning derives them.

Lightning keeps ``best_k_models`` (file -> score) and, beside it, the best file and score and the
k-th best (the score a new checkpoint must beat once ``save_top_k`` files are kept). Records
repaired after the fact (an interrupted write of a best file, a moved run folder) must derive
those again from the scores left.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["derive_best"]


def derive_best(scores: dict[Any, Any], mode: str, save_top_k: int) -> dict[str, Any]:
    """``best_model_path``, ``best_model_score``, ``kth_best_model_path`` and ``kth_value`` from
    ``scores`` (file -> score) for a callback of ``mode`` (``"min"`` / ``"max"``) keeping
    ``save_top_k`` files (-1: all): with fewer files than that there is no k-th best to beat
    (Lightning's starting values)."""
    best, worst = (min, max) if mode == "min" else (max, min)
    best_path = best(scores, key=scores.get) if scores else ""
    derived = {"best_model_path": best_path, "best_model_score": scores[best_path] if scores else None}
    if scores and (save_top_k == -1 or len(scores) >= save_top_k):
        kth_path = worst(scores, key=scores.get)
        derived.update(kth_best_model_path=kth_path, kth_value=scores[kth_path])
    else:
        derived.update(kth_best_model_path="", kth_value=torch.tensor(torch.inf if mode == "min" else -torch.inf))
    return derived
