"""The pure-tensor core: boxes, box coder, anchors, matching, sampling, targets, head, loss,
proposals, the RPN (and its cascade variant), sliding windows, backbones, and the config objects
that declare every default once.

Imports torch / torchvision / numpy / numba only, and other ``core`` modules: never Lightning,
torchmetrics, nor the ``data``, ``evaluation``, ``training`` or ``tools`` layers. Safe in
DataLoader workers and in plain PyTorch code.
"""
