"""Run a benchmark's measuring function in a fresh Python process and read back its JSON result.

Peak memory (``VmHWM``) and caches are per process: a measurement run in the benchmark's own
process would count what earlier rows allocated. The child imports the benchmark module from
``bench/`` (which imports this checkout's ``lightning_rpn``, see ``_checkout``).
"""

import json
import os
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))


def run_in_fresh_process(module: str, call: str, threads: int) -> dict:
    """``module.call`` (e.g. ``"measure(256, 50, 5)"``, which must return a JSON-able value) in a
    new interpreter with ``threads`` torch threads; its result."""
    code = (f"import json, sys, torch; torch.set_num_threads({threads}); sys.path.insert(0, {BENCH!r}); "
            f"import {module}; print(json.dumps({module}.{call}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
