"""examples/pbt.py, live on 4 replicas of examples/train.py (a learning rate far too low
for the task), as the README runs it: every 200 steps the worst replica takes the best
one's state and its lr halved or doubled, with no restart. Its best replica ends at least as good
as the best of the same 4 seeds unsteered (by a margin), and the page (in chromium, where
it is installed) draws each exploit as a marker on the loss curves."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import EXAMPLES, run_loomrun, wait_for
from jobs import job_id, wait_ready
from pages import ARTIFACTS, chromium_session, start_ui

TASK = ("--steps", "2400", "--lr", "0.0001", "--print-every", "100000")
REPLICAS = ("r0", "r1", "r2", "r3")


def finals(text: str) -> dict[str, float]:
    found = dict(re.findall(r"^\[(r\d)\] final loss (\S+)", text, re.M))
    assert sorted(found) == list(REPLICAS), text[-2000:]
    return {replica: float(loss) for replica, loss in found.items()}


@pytest.mark.slow
def test_pbt_beats_the_best_unsteered_seed_and_the_page_shows_its_exploits(procs, tmp_path):
    job, out = job_id("pbt"), tmp_path / "pbt.out"
    with out.open("w") as sink:
        sup = procs.start("--replicas", 4, "--job", job, EXAMPLES / "train.py", *TASK,
                          "--step-time", "0.005", stdout=sink)  # fmt: skip
    wait_ready(job, REPLICAS)
    url, _, _ = start_ui(procs, "--job", job)
    controller = subprocess.Popen(
        [sys.executable, EXAMPLES / "pbt.py", "--job", job, "--every", "200", "--poll", "0.05",
         "--factors", "0.5", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if shutil.which("chromium") and shutil.which("chromedriver"):
            page(url)
        said, errors = controller.communicate(timeout=300)
    finally:
        controller.kill()
    assert controller.returncode == 0 and "Traceback" not in errors, errors
    assert sup.wait(timeout=120) == 0
    exploits = re.findall(r"copied (r\d)'s state of step (\d+) at step (\d+)", said)
    assert len(exploits) >= 5, said

    steered = finals(out.read_text())
    alone = run_loomrun("--replicas", 4, "--no-broker", "--job", job_id("pbt-ref"),
                        EXAMPLES / "train.py", *TASK, timeout=300)  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    unsteered = finals(alone.stdout)
    print(f"pbt: best {min(steered.values()):.4f}; the same seeds unsteered: best "
          f"{min(unsteered.values()):.4f}")  # fmt: skip
    # Better by a margin: a replica never exploited trains as it would unsteered, so a tie
    # is what a PBT whose copies did nothing would give.
    # (0.018-0.026 against 0.059 in this session's runs, on a loaded machine too)
    assert min(steered.values()) < 0.75 * min(unsteered.values()), (steered, unsteered)


def page(url: str) -> None:
    """The page draws each exploit as a marker (a copy's, never a share's)."""
    with chromium_session() as browser:
        browser.get(url)
        state = lambda expression: browser.execute_script(f"return {expression}")  # noqa: E731
        wait_for(
            lambda: state("window.loomrun.markers.filter((m) => m.name === 'copy').length") >= 3,
            120, what="three exploits drawn on the page",
        )  # fmt: skip
        copies = state("window.loomrun.markers.filter((m) => m.name === 'copy')")
        assert all(m["outcome"] == "applied" and m["new"]["from"] for m in copies), copies
        assert state("window.loomrun.markers.some((m) => m.name === 'share')") is False
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "pbt.png"))
