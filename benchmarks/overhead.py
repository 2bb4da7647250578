"""Steps per second of ~1 ms CPU training steps under `loomrun --replicas 1` against plain python.

Both run in this one invocation, interleaved, so a noisy machine slows them alike; each
figure is the median of the rounds. Target: loomrun / python >= 0.98.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

LOOP = str(Path(__file__).resolve().parent / "step_loop.py")
LOOMRUN = str(Path(sys.executable).parent / "loomrun")


def steps_per_sec(command: list[str]) -> float:
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"steps_per_sec (\S+)", out)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    loop_args = [LOOP, "--steps", str(args.steps)]
    commands = {
        "python": [sys.executable, *loop_args],
        "loomrun": [LOOMRUN, "--replicas", "1", *loop_args],
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            samples[name].append(steps_per_sec(command))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        print(f"{name:8s} {value:8.1f} steps/s (median of {args.rounds})")
    print(f"loomrun / python = {medians['loomrun'] / medians['python']:.3f}  (target >= 0.98)")


if __name__ == "__main__":
    main()
