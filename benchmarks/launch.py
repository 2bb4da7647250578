"""Start-up cost of a launch: loomrun against torchrun and plain python, in one run.

Median wall time of several launches of noop.py (which imports torch and exits), with two
workers for the launchers. Prints the ratios (targets: loomrun <= 0.5x torchrun, <= 1.1x
python), and the floor under any launcher of two workers: two pythons started at once,
with no launcher at all. On a 2-core machine the two torch imports contend, so that floor
is itself above one python.
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


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def two_at_once(command: list[str]) -> float:
    started = time.perf_counter()
    both = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(2)]
    if any(p.wait() != 0 for p in both):
        raise SystemExit(f"{command} failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=15)
    args = parser.parse_args()
    commands = {
        "python": [sys.executable, NOOP],
        "loomrun": [str(BIN / "loomrun"), "--replicas", "2", NOOP],
        "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", "2", NOOP],
    }
    for command in commands.values():  # warm the page cache once for each
        subprocess.run(command, check=True, capture_output=True)
    # Interleave the launchers run by run, so a noisy neighbour hurts them alike.
    samples: dict[str, list[float]] = {name: [] for name in [*commands, "python x2"]}
    for _ in range(args.runs):
        for name, command in commands.items():
            samples[name].append(seconds(command))
        samples["python x2"].append(two_at_once(commands["python"]))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        print(f"{name:9s} median {value:6.3f} s over {args.runs} runs")
    ratio = medians["loomrun"] / medians["torchrun"]
    print(f"loomrun / torchrun  = {ratio:.2f}  (target <= 0.5)")
    print(f"loomrun / python    = {medians['loomrun'] / medians['python']:.2f}  (target <= 1.1)")
    floor = medians["python x2"]
    # The target: loomrun --replicas 2 against the floor, in pairs run back to back.
    pairs = []
    for _ in range(args.pairs):
        alone = two_at_once(commands["python"])
        pairs.append(seconds(commands["loomrun"]) / alone)
    print(
        f"loomrun --replicas 2 / two pythons at once = {statistics.median(pairs):.3f} "
        f"(the median of {args.pairs} pairs; target <= 1.05)"
    )
    print(
        f"the floor, two pythons at once: {floor / medians['python']:.2f} x python, "
        f"{floor / medians['torchrun']:.2f} x torchrun; loomrun over it: "
        f"{medians['loomrun'] / floor:.2f} x ({(medians['loomrun'] - floor) * 1000:.0f} ms)"
    )


if __name__ == "__main__":
    main()
