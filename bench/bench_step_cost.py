"""Training-step cost of the dense-scene rows of ``bench_quality.py``, against the plain RPN.

Each row is ``bench_quality``'s (``configs/scenes.yaml`` plus the row's ``--model.*`` flags,
``defaults`` being the plain RPN), built through the real CLI with the same seed. Two figures:

- the median wall time of a training step (forward, backward, AdamW step) on the same crops,
  the rows taking turns in one process so that machine load falls on all of them alike, with
  torchvision's ``RegionProposalNetwork`` in its plain loop (the ``defaults`` weights) as a
  further reference;
- each row's peak resident memory over a few training steps, in a process of its own (a
  process's peak would otherwise be its largest row's), and how far it rises above the memory
  before those steps (Linux: ``/proc/self/status``, the peak reset through ``clear_refs``).

Prints both with the ratios to ``defaults``. Run it alone, with ``OMP_NUM_THREADS`` equal to
``--threads``:

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_step_cost.py --threads 1 \\
        --rows cascade_centre_0.2 cascade_centre_0.2_train_iteration
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import bench_quality  # this folder's module (the script's folder is on the path)

from lightning_rpn.training.torchvision_loop import TorchvisionLoop

PLAIN = "defaults"


def build(row: str, workdir: Path):
    """The row's ``RPNModule`` in training mode and its data module (set up for fit)."""
    args = [*bench_quality._config_args(0, 300, workdir, None), "--trainer.logger", "false",
            *bench_quality.ABLATIONS[row]]
    cli = bench_quality._cli(args)
    cli.datamodule.setup("fit")
    return cli.model.train(), cli.datamodule


def training_batches(data, count: int) -> list:
    """``count`` training batches, from as many epochs as that takes (the scenes' is 2 batches)."""
    batches: list = []
    while len(batches) < count:
        batches += [batch for _, batch in zip(range(count - len(batches)), data.train_dataloader())]
    return batches


def training_step(module, optimizer: torch.optim.Optimizer, batch) -> None:
    _, losses = module(batch)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()


def torchvision_step(loop: TorchvisionLoop, batch) -> None:
    loop.step(batch.images, batch.image_sizes, batch.gt_boxes)


def step_times(rows: list[str], batches: int, rounds: int, workdir: Path) -> dict[str, list[float]]:
    """Seconds of each training step, every row (and torchvision) taking its turn each round;
    the first round warms up and is left out."""
    steps = {}
    crops = None
    for row in rows:
        module, data = build(row, workdir)
        if crops is None:
            crops = training_batches(data, batches)
        steps[row] = partial(training_step, module, torch.optim.AdamW(module.parameters(), lr=1e-4))
        if row == PLAIN:
            steps["torchvision"] = partial(torchvision_step, TorchvisionLoop.from_module(module))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds + 1):
        for name, step in steps.items():
            for batch in crops:
                start = time.perf_counter()
                step(batch)
                if round_index:
                    times[name].append(time.perf_counter() - start)
    return times


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (Linux) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def training_memory_mb(row: str, steps: int, threads: int) -> dict[str, float]:
    """``peak_rss_mb``: the peak resident memory of a process that builds ``row`` and trains it
    ``steps`` steps, during those steps; ``steps_mb``: how far above the memory before them."""
    result = subprocess.run([sys.executable, __file__, "--peak-rss-of", row, "--peak-steps", str(steps),
                             "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["cascade_centre_0.2", "cascade_centre_0.2_train_iteration"],
                        choices=list(bench_quality.ABLATIONS), help=f"compared with {PLAIN!r} (always run)")
    parser.add_argument("--batches", type=int, default=3, help="crops batches, the same for every row")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over them, after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak-steps", type=int, default=3)
    parser.add_argument("--peak-rss-of", default=None, help=argparse.SUPPRESS)  # the child process
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if options.peak_rss_of is not None:
            module, data = build(options.peak_rss_of, Path(tmp))
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
            batches = training_batches(data, options.peak_steps)
            before = _status_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
            for batch in batches:
                training_step(module, optimizer, batch)
            print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "steps_mb": _status_mb("VmHWM") - before}))
            return
        rows = [PLAIN, *(row for row in options.rows if row != PLAIN)]
        times = step_times(rows, options.batches, options.rounds, Path(tmp))
    memory = {row: training_memory_mb(row, options.peak_steps, options.threads) for row in rows}
    plain_time, plain_memory = _median(times[PLAIN]), memory[PLAIN]
    print(f"\n{'row':<44}{'step (ms)':>10}{'x plain':>9}{'peak RSS (MB)':>15}{'steps (MB)':>12}{'x plain':>9}")
    for name, values in times.items():
        step = _median(values)
        columns = f"{1000 * step:>10.0f}{step / plain_time:>9.2f}"
        if name in memory:
            used = memory[name]
            columns += (f"{used['peak_rss_mb']:>15.0f}{used['steps_mb']:>12.0f}"
                        f"{used['steps_mb'] / plain_memory['steps_mb']:>9.2f}")
        print(f"{name:<44}{columns}")
    print(f"(step: median of {len(times[PLAIN])} steps per row, {options.threads} thread(s); memory: a process "
          f"per row over {options.peak_steps} steps, its peak and how far that is above the memory before the "
          f"steps; torchvision: its RegionProposalNetwork in a plain loop)")


if __name__ == "__main__":
    main()
