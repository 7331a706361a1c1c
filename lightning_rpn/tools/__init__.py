"""Tools over a trained or configured model: anchor coverage analysis and optimisation, export,
the torchvision adapter, and the built-in config files.

May import every layer below (``core``, ``data``, ``evaluation``, ``training``); only the CLI
(``lightning_rpn.cli``) imports tools.
"""
