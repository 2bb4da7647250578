"""`loomrun ui` in a real browser with 64 replicas, against the same with 2 in this run:
the page's update rate (frames a second its WebSocket delivered and it drew), and the CPU
that Chromium (all its processes) and the `loomrun ui` server spent, as a share of one
core. The replicas are torch-free workers (benchmarks/stepper.py) stepping 20 times a
second. Needs Debian's chromium and chromium-driver (`make system`) and selenium.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loomrun.launch import free_port

HERE = Path(__file__).resolve().parent
LOOMRUN = [sys.executable, "-m", "loomrun.cli"]
SECONDS = 20.0
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def tree(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def measure(replicas: int, env: dict) -> tuple[float, float, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    job = f"uibench{replicas}-{os.getpid()}"
    started = []
    profile = tempfile.mkdtemp(prefix="loomrun-bench-chromium-")
    try:
        started.append(subprocess.Popen(
            [*LOOMRUN, "--replicas", str(replicas), "--job", job, str(HERE / "stepper.py")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))  # fmt: skip

        def listed() -> bool:
            out = subprocess.run(
                [*LOOMRUN, "ls", "--json"], env=env, capture_output=True, text=True
            )
            return out.returncode == 0 and job in out.stdout

        wait(listed, 180, f"job {job} on the broker")
        ui = subprocess.Popen([*LOOMRUN, "ui", "--job", job], env=env, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)  # fmt: skip
        started.append(ui)
        url = re.search(r"http://\S+", ui.stdout.readline())[0]
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,1600",
                     f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(flag)
        service = Service(shutil.which("chromedriver"))
        browser = webdriver.Chrome(service=service, options=options)
        try:
            browser.get(url)
            count = "return document.querySelectorAll('#replicas tr[data-replica]').length"
            wait(lambda: browser.execute_script(count) == replicas, 180, f"{replicas} rows")
            wait(lambda: browser.execute_script("return window.loomrun.charts.loss"), 60, "curves")
            chromium = tree(service.process.pid)
            frames = browser.execute_script("return window.loomrun.frames")
            cpu, server = cpu_seconds(chromium), cpu_seconds([ui.pid])
            began = time.monotonic()
            time.sleep(SECONDS)
            elapsed = time.monotonic() - began
            chromium = tree(service.process.pid)
            rate = (browser.execute_script("return window.loomrun.frames") - frames) / elapsed
            return (rate, (cpu_seconds(chromium) - cpu) / elapsed,
                    (cpu_seconds([ui.pid]) - server) / elapsed)  # fmt: skip
        finally:
            browser.quit()
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            proc.wait(60)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        print("ui_browser: skipped, chromium and chromium-driver are not installed (make system)")
        return
    state = tempfile.mkdtemp(prefix="loomrun-bench-state-")
    env = {**os.environ, "XDG_STATE_HOME": state,
           "LOOMRUN_NATS": f"nats://127.0.0.1:{free_port()}"}  # fmt: skip
    try:
        small = measure(2, env)
        large = measure(64, env)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    for name, (rate, browser, server) in (("2 replicas", small), ("64 replicas", large)):
        print(f"{name:12s} page updates {rate:4.1f}/s (at most 10)  chromium {browser:6.1%} of a "
              f"core  loomrun ui {server:6.1%}")  # fmt: skip
    print(
        f"64 / 2 replicas: chromium CPU {large[1] / max(small[1], 1e-9):.1f}x, "
        f"server CPU {large[2] / max(small[2], 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
