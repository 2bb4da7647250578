"""The stress suite's records and figures: each trial records what it found (through the
`trial` fixture of conftest.py), and `make stress` writes the figures to STRESS.md.

LOOMRUN_STRESS_SCALE (default 1) scales every kind's number of trials, for a quick look;
the figures say how many ran."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("LOOMRUN_STRESS_SCALE", "1"))


def trials(count: int) -> list[int]:
    """The trial numbers of a kind of `count` trials, scaled."""
    return list(range(max(1, round(count * SCALE))))


@dataclass
class Kind:
    title: str
    run: int = 0
    failed: list[str] = field(default_factory=list)
    leftovers: int = 0
    lost: int = 0  # answers a client got that the ledger lacks, or holds twice
    cleanups: list[float] = field(default_factory=list)
    moments: list[str] = field(default_factory=list)


RESULTS: dict[str, Kind] = {}
STARTED = time.time()


@dataclass
class Trial:
    """One trial's record; the test fills it in as it goes."""

    kind: Kind
    number: int
    left: list[str] = field(default_factory=list)
    cleanup: float | None = None
    lost: int = 0
    moment: str | None = None


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def _commit() -> str:
    """The commit the suite ran on, and whether its tree had changes."""
    try:
        found = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return found.stdout.strip() or "unknown"


def write_report() -> None:
    if RESULTS:
        (ROOT / "STRESS.md").write_text(report())


def report() -> str:
    lines = [
        "# Stress suite: what it ran and what it found",
        "",
        "Written by `make stress` (tests/stress/); each trial starts from a fresh state",
        "directory and a free port, and afterwards looks for what any process of it left:",
        "processes (by their XDG_STATE_HOME), shared-memory segments, broker users of dead",
        "processes, held locks (tests/leftovers.py). The flood trials also hold every answer",
        "a client got against the change ledger's two copies, on disk and in the broker: an",
        "answer missing from either is lost (tests/stress/test_flood.py).",
        "",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M', time.gmtime(STARTED))} UTC, "
        f"{(time.time() - STARTED) / 60:.1f} min",
        f"- Code: {_commit()}",
        f"- Machine: {_machine()}",
        f"- Scale: {SCALE:g} (LOOMRUN_STRESS_SCALE)",
        "- Again: `make stress`",
        "",
        "| trials | kind | failed | with leftovers | answers lost | slowest cleanup |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for kind in RESULTS.values():
        slowest = f"{max(kind.cleanups):.2f} s" if kind.cleanups else "-"
        lines.append(
            f"| {kind.run} | {kind.title} | {len(kind.failed)} | {kind.leftovers} | "
            f"{kind.lost} | {slowest} |"
        )
    for kind in RESULTS.values():
        if kind.failed:
            lines += ["", f"## Failed: {kind.title}", ""]
            lines += [f"- {failure}" for failure in kind.failed]
        if kind.moments:
            lines += ["", f"## Moments of the kills: {kind.title}", ""]
            lines += [f"- {moment}" for moment in kind.moments]
    return "\n".join(lines) + "\n"
