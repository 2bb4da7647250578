"""Start-up cost of a launch: loomrun against torchrun and plain python, in one run.

Median wall time of several launches of noop.py (which imports torch and exits), with two
workers for the launchers. Prints the ratios; the target is loomrun <= 0.6x torchrun.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOOP = str(HERE / "noop.py")
BIN = Path(sys.executable).parent


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    commands = {
        "python": [sys.executable, NOOP],
        "loomrun": [str(BIN / "loomrun"), "--replicas", "2", NOOP],
        "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", "2", NOOP],
    }
    for command in commands.values():  # warm the page cache once for each
        subprocess.run(command, check=True, capture_output=True)
    # Interleave the launchers run by run, so a noisy neighbour hurts them alike.
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, command in commands.items():
            samples[name].append(median_seconds(command, 1))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        print(f"{name:9s} median {value:6.3f} s over {args.runs} runs")
    print(f"loomrun / torchrun = {medians['loomrun'] / medians['torchrun']:.2f}  (target <= 0.6)")
    print(f"loomrun / python   = {medians['loomrun'] / medians['python']:.2f}")


if __name__ == "__main__":
    main()
