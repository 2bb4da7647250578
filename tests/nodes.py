"""Several supervisors of one job started on this machine as its nodes (a static master,
as on a cluster without c10d), each as a process of its own. No conftest import: the
stress suite, which has a conftest.py of its own, uses this too."""

from __future__ import annotations

import subprocess
import sys


def start_nodes(env: dict, job: str, script, *args, nproc: int = 1, extra=(), master: int):
    """Node 0 and node 1 of `job`, started one right after the other: (their processes)."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "loomrun.cli", "--nnodes", "2", "--node-rank", str(rank),
             "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
             str(master), "--job", job, *map(str, extra), str(script), *map(str, args)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip


def stepping(job: str, replica: str, past: int = 5) -> bool:
    """The replica has taken more than `past` steps, as its mailbox says (read only)."""
    from loomrun.mailbox import Mailbox, find_segment

    path = find_segment(job, replica)
    if path is None:
        return False
    box = Mailbox.attach(path)
    try:
        return box.step[0] > past
    finally:
        box.close()
