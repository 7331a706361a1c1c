"""How the compiled CPU kernels are compiled: numba, on first call, cached on disk.

DataLoader workers and later runs load the cached machine code instead of compiling again
(:func:`~lightning_rpn.core.cpu_kernels.load_kernels` loads it before workers fork).
"""

from __future__ import annotations

import numba

__all__ = ["jit"]

jit = numba.njit(cache=True, nogil=True)
"""The decorator of every kernel: compiled on first call, cached on disk, releasing the GIL."""
