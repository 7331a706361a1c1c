"""Import this checkout's ``lightning_rpn``, not whichever one the environment installed.

``python bench/X.py`` puts ``bench/`` first on ``sys.path``, not the checkout, so without this
a benchmark run from a second checkout (a ``git worktree`` of an older commit, a copy) would
measure the package that the environment's editable install points to. Each benchmark imports
this module before ``lightning_rpn``.
"""

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(CHECKOUT)]:
    sys.path.insert(0, str(CHECKOUT))
