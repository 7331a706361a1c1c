"""Training with Lightning, the only layer (with the CLI on top) that imports it: ``RPNModule``,
its optimisation and schedules, callbacks, ``RPNDataModule``, the proposal-writing callback and
the torchvision reference loop.

May import ``core``, ``data`` and ``evaluation``; never ``tools``.
"""
