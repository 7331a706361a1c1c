"""Evaluation without Lightning: the proposal-recall metric (a torchmetrics ``Metric``) and
proposal files (COCO JSON, detectron2 pickle readers / writers).

May import ``core`` and ``data``; never Lightning, ``training`` or ``tools``.
"""
