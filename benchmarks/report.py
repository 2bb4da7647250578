"""`make bench`: run every benchmark in this folder and write BENCHMARKS.md.

Each script prints its figures as ratios against a baseline it measured in the same run
(the machine is shared and noisy). The report holds, per script, the command that
reproduces it and what it printed, under a header naming the machine (cores, Python,
torch). A script that fails is reported as such, with its last lines, and the others still
run; the exit code is then 1 and the last line names the scripts that failed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = [
    ("launch.py", "start-up: loomrun against torchrun and plain python"),
    ("poll.py", "the step boundary: loomrun.step(), a torch.optim step, loss.backward()"),
    ("overhead.py", "a training loop of 1 ms steps, loomrun against python"),
    ("latency.py", "a change, from issue to acknowledged apply (API, CLI, fan-out, DDP)"),
    ("watch_render.py", "the terminal view's frame at 64 and 2 replicas"),
    ("records.py", "the change ledger and the metric history: time and memory"),
    ("ui_browser.py", "loomrun ui in headless chromium at 64 and 2 replicas"),
    ("scale.py", "64 replicas on one supervisor: CPU, freshness, set fan-out"),
    ("snapshot.py", "snapshot, rollback and save of a 9.4 M-parameter model with AdamW"),
    ("rules.py", "a rule's firing: from a one-step spike to its change applied"),
    ("statecopy.py", "loomrun copy of a 9.4 M-parameter model: shared memory, object store"),
    ("group.py", "a 64-rank process group: one set, applied at one common step"),
]
TIMEOUT = 1200


def machine() -> str:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    model = ""
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{os.cpu_count()} cores ({model or platform.processor() or 'unknown CPU'}), "
        f"Python {platform.python_version()}, torch {torch_version}, {platform.system()} "
        f"{platform.release()}"
    )


def main() -> int:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (benchmarks/report.py) on {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Machine: {machine()}.",
        "",
        "Each figure is printed next to its baseline, measured in the same run, and as a ratio;",
        "targets are in parentheses. Run one again with the command under its heading.",
        "",
    ]
    failed = []
    for name, what in SCRIPTS:
        command = f"python benchmarks/{name}"
        print(f"== {command}", flush=True)
        started = time.monotonic()
        try:
            result = subprocess.run(
                [sys.executable, str(HERE / name)], cwd=ROOT, capture_output=True, text=True,
                timeout=TIMEOUT,
            )  # fmt: skip
            out, code = result.stdout.strip(), result.returncode
            err = result.stderr.strip()
        except subprocess.TimeoutExpired:
            out, code, err = "", -1, f"timed out after {TIMEOUT} s"
        seconds = time.monotonic() - started
        print(out or err, flush=True)
        lines += [f"## {what}", "", f"`{command}` ({seconds:.0f} s)", "", "```"]
        if code == 0:
            lines += out.splitlines()
        else:
            failed.append(name)
            tail = (err or out).splitlines()[-15:]
            lines += [f"FAILED (exit {code}); its last lines:", *tail]
            print(f"!! {name} failed (exit {code})", flush=True)
        lines += ["```", ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
